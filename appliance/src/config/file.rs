//! The `appliance.toml` file as written by operators: every section, every default.
//!
//! These types mirror the file one to one (`deny_unknown_fields`, so a typo is an error
//! that names the key); [`super::Config`] is what the rest of the appliance uses, made from
//! these by validation.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

/// Whether this process runs as root (so may bind ports below 1024).
pub fn is_root() -> bool {
    // /proc/self/status is always readable by the process itself.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    pub http: HttpSection,
    pub tftp: TftpSection,
    /// Folder of boot assets (kernels, initrds) served over HTTP.
    pub assets_dir: Option<PathBuf>,
    /// Folder of the inventory and generated secrets.
    pub data_dir: Option<PathBuf>,
    pub tokens: TokensSection,
    pub policy: PolicySection,
    pub windows: WindowsSection,
    pub discovery: DiscoverySection,
    /// Boot environments by name.
    pub environments: BTreeMap<String, EnvironmentSection>,
    pub templates: TemplatesSection,
    pub plugins: PluginsSection,
    pub dhcp: DhcpSection,
    pub kubernetes: KubernetesSection,
    pub bmc: BmcSection,
}

/// `[bmc]`: how BMC operations are queued, retried and confirmed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BmcSection {
    /// One exchange with a BMC, milliseconds.
    pub exchange_timeout_ms: u64,
    /// Tries of one step that failed for a reason that may pass.
    pub attempts: u32,
    /// First pause before a retry (doubled each time), milliseconds.
    pub backoff_ms: u64,
    /// How long a power change may take to show, seconds.
    pub settle_s: u64,
    /// Pause between power-state polls, milliseconds.
    pub poll_ms: u64,
    /// Operations queued for one BMC before more are refused.
    pub queue_limit: usize,
    /// The key that seals stored BMC passwords (default: `bmc-credentials.key` in the
    /// data folder, created on first use).
    pub key_file: Option<PathBuf>,
}

impl Default for BmcSection {
    fn default() -> Self {
        let d = crate::bmc::manager::ManagerSettings::default();
        BmcSection {
            exchange_timeout_ms: d.exchange_timeout.as_millis() as u64,
            attempts: d.attempts,
            backoff_ms: d.backoff.as_millis() as u64,
            settle_s: d.settle.as_secs(),
            poll_ms: d.poll.as_millis() as u64,
            queue_limit: d.queue_limit,
            key_file: None,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Base URL machines use to reach the appliance; by default taken from each request's
    /// Host header.
    pub public_url: Option<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            public_url: None,
        }
    }
}

/// `[tftp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpSection {
    /// Addresses to listen on; port 69 when run as root, 6969 otherwise.
    pub listen: Vec<SocketAddr>,
    /// Folder served read-only.
    pub root: Option<PathBuf>,
    pub max_transfers: usize,
    pub max_transfers_per_client: usize,
    /// First retransmission timeout, milliseconds.
    pub timeout_ms: u64,
    /// Backoff ceiling, milliseconds.
    pub max_timeout_ms: u64,
    pub retries: u32,
    /// Largest block size granted, 8..=65464.
    pub max_blksize: u32,
    /// Largest RFC 7440 window granted, 1..=1024.
    pub max_windowsize: u32,
    /// Files up to this size are served from memory.
    pub cache_file_bytes: u64,
    /// Memory the file cache may use in all.
    pub cache_total_bytes: u64,
    /// Folder of iPXE binaries served (over TFTP and at `/boot/` over HTTP) when the root
    /// does not hold the name asked for. Default: Debian's `ipxe` package folder,
    /// `/usr/lib/ipxe`, when it exists.
    pub ipxe_dir: Option<PathBuf>,
}

impl Default for TftpSection {
    fn default() -> Self {
        let s = crate::tftp::TftpSettings::default();
        let c = crate::files::CacheLimits::default();
        let port = if is_root() { 69 } else { 6969 };
        TftpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            root: None,
            max_transfers: s.max_transfers,
            max_transfers_per_client: s.max_transfers_per_client,
            timeout_ms: s.timeout.as_millis() as u64,
            max_timeout_ms: s.max_timeout.as_millis() as u64,
            retries: s.retries,
            max_blksize: u32::from(s.max_blksize),
            max_windowsize: u32::from(s.max_windowsize),
            cache_file_bytes: c.file_bytes,
            cache_total_bytes: c.total_bytes,
            ipxe_dir: None,
        }
    }
}

/// `[tokens]`: each token inline, from a file, or (neither) generated once into the data
/// folder.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokensSection {
    pub registration: Option<String>,
    pub registration_file: Option<PathBuf>,
    pub admin: Option<String>,
    pub admin_file: Option<PathBuf>,
}

/// What a registered but not yet accepted machine boots.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unaccepted {
    /// Boot from local disk until accepted.
    #[default]
    LocalDisk,
    /// Run discovery again (refreshes the hardware record).
    Discover,
}

/// How "boot from local disk" is told to the firmware.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalDiskMethod {
    /// iPXE `exit`: the firmware tries its next boot device (most BIOS, many UEFI).
    #[default]
    Exit,
    /// iPXE `sanboot` of the first disk (firmware that loops back to the network on exit).
    Sanboot,
    /// Answer `/boot.ipxe` with HTTP 404 so iPXE fails and the firmware moves on.
    #[serde(rename = "http-404")]
    Http404,
}

impl LocalDiskMethod {
    /// The method's name in config and templates.
    pub fn name(self) -> &'static str {
        match self {
            LocalDiskMethod::Exit => "exit",
            LocalDiskMethod::Sanboot => "sanboot",
            LocalDiskMethod::Http404 => "http-404",
        }
    }
}

/// `[policy]`: the built-in boot policy.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    pub unaccepted: Unaccepted,
    /// Environment for accepted machines that have none of their own.
    pub default_environment: Option<String>,
    pub local_disk_method: LocalDiskMethod,
    /// Per-architecture override of `local_disk_method` (keys: `x86_64`, `i386`, `arm64`, …).
    pub local_disk_method_by_arch: BTreeMap<String, LocalDiskMethod>,
    /// Replaced by `[windows] secs`; kept only to say so clearly.
    #[serde(default, skip_serializing)]
    pub boot_token_ttl_secs: Option<u64>,
}

/// `[windows]`: provisioning windows, the only spans in which a machine is handed its
/// secrets (see `SECURITY.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsSection {
    /// How long a window stays open after the appliance powers a machine on (or an
    /// operator arms it), seconds: the boot must claim it and use its secret by then.
    pub secs: u64,
    /// Honest retries of a used secret (a configuration fetch or a registration whose
    /// answer was lost), each from the address that used it first.
    pub retries: u32,
    /// How long after its first use a secret may be retried, seconds.
    pub retry_secs: u64,
}

impl Default for WindowsSection {
    fn default() -> Self {
        WindowsSection {
            secs: 900,
            retries: 2,
            retry_secs: 120,
        }
    }
}

/// `[discovery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySection {
    /// The environment unknown machines boot to register.
    pub environment: String,
    /// The environment a wipe boots (default: the discovery one, with `arges.mode=wipe`).
    pub wipe_environment: Option<String>,
}

impl Default for DiscoverySection {
    fn default() -> Self {
        DiscoverySection {
            environment: "discovery".into(),
            wipe_environment: None,
        }
    }
}

/// A file of an environment: a path (relative to the assets folder), optionally pinned.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AssetEntry {
    Path(PathBuf),
    Pinned {
        path: PathBuf,
        /// Hex sha256 the file must have; checked at load.
        sha256: Option<String>,
    },
}

impl AssetEntry {
    pub fn path(&self) -> &PathBuf {
        match self {
            AssetEntry::Path(p) | AssetEntry::Pinned { path: p, .. } => p,
        }
    }
    pub fn sha256(&self) -> Option<&str> {
        match self {
            AssetEntry::Path(_) => None,
            AssetEntry::Pinned { sha256, .. } => sha256.as_deref(),
        }
    }
}

/// `[environments.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSection {
    pub kernel: AssetEntry,
    #[serde(default)]
    pub initrds: Vec<AssetEntry>,
    /// Kernel command line, a template (see the `ipxe` module for the variables).
    #[serde(default)]
    pub cmdline: String,
}

/// `[templates]`: files replacing the built-in iPXE templates.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct TemplatesSection {
    pub discover: Option<PathBuf>,
    pub environment: Option<PathBuf>,
    pub local_disk: Option<PathBuf>,
    pub wipe: Option<PathBuf>,
    pub deny: Option<PathBuf>,
}

/// The discovery environment every default config has.
pub fn default_discovery_environment() -> EnvironmentSection {
    EnvironmentSection {
        kernel: AssetEntry::Path("discovery/vmlinuz".into()),
        initrds: vec![AssetEntry::Path("discovery/initramfs.img".into())],
        cmdline: DEFAULT_DISCOVERY_CMDLINE.into(),
    }
}

/// Kernel command line of the default discovery environment.
pub const DEFAULT_DISCOVERY_CMDLINE: &str = "console=tty0 console=ttyS0,115200 \
arges.appliance={{ appliance.url }} arges.token={{ registration_token }} arges.mode={{ action }}";

/// `[plugins]`: WebAssembly plugins (boot policies and BMC drivers).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Folder of `.wasm` components; each file's name (without `.wasm`) is the plugin's name.
    pub dir: Option<PathBuf>,
    /// Where compiled plugins are cached (default: `plugin-cache` in the data folder).
    pub cache_dir: Option<PathBuf>,
    /// Plugins asked first, in this order; the others follow by name.
    pub order: Vec<String>,
    /// Deadline of one decision, milliseconds.
    pub timeout_ms: u64,
    /// Deadline of one BMC driver step (it waits on the BMC), milliseconds.
    pub driver_timeout_ms: u64,
    /// Memory one plugin instance may use, bytes.
    pub memory_bytes: u64,
    /// Instances of one plugin running at once.
    pub max_instances: u32,
    /// Use wasmtime's pooling allocator (faster instantiation; reserves address space).
    pub pooling: bool,
    /// Reuse an instance for later calls after a clean one (off: a fresh instance per call).
    pub reuse_instances: bool,
    /// Plugin name to the hex sha256 its file must have.
    pub pins: BTreeMap<String, String>,
    /// Each plugin's own table, readable through the `config` import.
    pub config: BTreeMap<String, toml::Table>,
}

impl Default for PluginsSection {
    fn default() -> Self {
        PluginsSection {
            dir: None,
            cache_dir: None,
            order: Vec::new(),
            timeout_ms: 50,
            driver_timeout_ms: 30_000,
            memory_bytes: 64 << 20,
            max_instances: 32,
            pooling: true,
            reuse_instances: true,
            pins: BTreeMap::new(),
            config: BTreeMap::new(),
        }
    }
}

/// Whether and how the appliance answers DHCP.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpMode {
    /// No DHCP at all (the site's DHCP server hands out boot options, or nothing boots
    /// from the network).
    #[default]
    Off,
    /// proxyDHCP beside the site's DHCP server: boot options only, never addresses.
    Proxy,
}

impl std::str::FromStr for DhcpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(DhcpMode::Off),
            "proxy" => Ok(DhcpMode::Proxy),
            other => Err(format!(
                "{other:?} is not a DHCP mode: expected off or proxy"
            )),
        }
    }
}

/// `[dhcp]`: proxyDHCP for network-boot clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpSection {
    pub mode: DhcpMode,
    /// Where DHCP broadcasts are received (the DHCP server port).
    pub listen: Vec<SocketAddr>,
    /// Where PXE clients send their ProxyDHCP requests (the PXE port).
    pub pxe_listen: Vec<SocketAddr>,
    /// Answer only requests arriving on these interfaces (empty: every interface).
    pub interfaces: Vec<String>,
    /// The address handed out as boot server; by default our address on the interface
    /// the request came in on.
    pub server_address: Option<Ipv4Addr>,
    /// DHCP user classes that mean "this client is iPXE already": it gets the boot-script
    /// URL instead of an iPXE binary.
    pub ipxe_user_classes: Vec<String>,
    /// Path and query of the boot-script URL handed to iPXE (iPXE expands `${...}`).
    pub boot_script: String,
    pub boot_files: BootFilesSection,
}

impl Default for DhcpSection {
    fn default() -> Self {
        DhcpSection {
            mode: DhcpMode::Off,
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 67))],
            pxe_listen: vec![SocketAddr::from(([0, 0, 0, 0], 4011))],
            interfaces: Vec::new(),
            server_address: None,
            ipxe_user_classes: vec!["iPXE".into()],
            boot_script: "/boot.ipxe?uuid=${uuid}&mac=${netX/mac}&arch=${buildarch}".into(),
            boot_files: BootFilesSection::default(),
        }
    }
}

/// `[dhcp.boot_files]`: the iPXE binary each firmware family loads, by file name in the
/// TFTP root (or the iPXE folder).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootFilesSection {
    /// Legacy BIOS PXE (architecture 0).
    pub bios: String,
    /// 32-bit x86 UEFI (6; 15 over HTTP).
    pub uefi_i386: String,
    /// x86-64 UEFI (7 and 9; 16 and 17 over HTTP).
    pub uefi_x86_64: String,
    /// 64-bit Arm UEFI (11; 19 over HTTP).
    pub uefi_arm64: String,
}

impl Default for BootFilesSection {
    fn default() -> Self {
        BootFilesSection {
            bios: "undionly.kpxe".into(),
            uefi_i386: "ipxe-i386.efi".into(),
            uefi_x86_64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
        }
    }
}

/// `[kubernetes]`: Kubernetes mode, with the appliance's controller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSection {
    /// Run the controller against the cluster of this kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Run the controller with the pod's service account (the in-cluster Deployment).
    pub in_cluster: bool,
    /// This appliance's name among those sharing the cluster (a label value): it marks
    /// the Servers it discovered and names its Lease. Default: the host name.
    pub identity: Option<String>,
    /// Namespace of the appliance's Lease, Events and default Secrets.
    pub namespace: String,
    /// What a Server released by its MetalMachine does: `wipe` (boot the wipe
    /// environment; free once it reports) or `power-off` (free at once).
    pub release: Release,
}

/// `[kubernetes] release`.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    #[default]
    Wipe,
    PowerOff,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        KubernetesSection {
            kubeconfig: None,
            in_cluster: false,
            identity: None,
            namespace: "arges-system".into(),
            release: Release::Wipe,
        }
    }
}
