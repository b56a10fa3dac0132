//! The command line: `arges run`, `check-config`, `doctor`, `agent`, `loadtest`, `plugin`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Arges: turns bare machines into Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "arges", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (embedded defaults without --config).
    Run(RunArgs),
    /// Validate a config file and print what it resolves to.
    CheckConfig {
        /// The appliance.toml to check.
        file: PathBuf,
    },
    /// Print the CustomResourceDefinitions of Kubernetes mode (YAML).
    #[cfg(feature = "kubernetes")]
    Crds,
    /// Print the Cluster API provider components for clusterctl
    /// (infrastructure-components.yaml).
    #[cfg(feature = "kubernetes")]
    Components,
    /// Say what this head node lacks before machines can boot from it.
    Doctor {
        /// appliance.toml; without it, the embedded defaults.
        #[arg(long, short, env = "ARGES_CONFIG")]
        config: Option<PathBuf>,
        /// proxyDHCP mode to check for, as `arges run --dhcp`.
        #[arg(long, value_name = "MODE")]
        dhcp: Option<arges::config::DhcpMode>,
    },
    /// Register this machine with an appliance (runs in the discovery environment).
    Agent(AgentArgs),
    /// A boot storm against a running appliance on this machine (loopback only).
    Loadtest(LoadtestArgs),
    /// Inspect and try boot-policy plugins.
    #[cfg(feature = "plugins")]
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Power control through a running appliance's admin API.
    Bmc(BmcArgs),
    /// Provisioning windows through a running appliance's admin API.
    Server(ServerArgs),
}

/// `arges plugin`
#[cfg(feature = "plugins")]
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin and say what it is, or exactly why it cannot be used (an import the
    /// host does not provide, an export the contract lacks).
    Check {
        /// The .wasm component.
        file: PathBuf,
    },
    /// Dry run: one decision for one machine's facts, and the time it took.
    Decide {
        /// The .wasm component.
        file: PathBuf,
        /// The machine, as a YAML, JSON or TOML file.
        #[arg(long, value_name = "FILE", long_help = FACTS_HELP)]
        facts: PathBuf,
        /// A key of the plugin's config table, as KEY=VALUE (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Deadline of the call, milliseconds (the appliance's default).
        #[arg(long, default_value_t = 50)]
        timeout_ms: u64,
    },
    /// Runs a table of cases (a machine's facts and the decision it must get) and prints
    /// a pass/fail line per case with the decision and its time; fails if any case does.
    Test {
        /// The .wasm component.
        file: PathBuf,
        /// The cases, as a YAML, JSON or TOML file.
        #[arg(long, value_name = "FILE", long_help = CASES_HELP)]
        cases: PathBuf,
        /// A key of the plugin's config table, as KEY=VALUE (repeatable; over the file's).
        #[arg(long = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Deadline of each call, milliseconds (the appliance's default).
        #[arg(long, default_value_t = 50)]
        timeout_ms: u64,
    },
    /// Writes a new boot-policy project: a small buildable starter with its build
    /// script, a README, the contract and a cases file.
    New {
        /// The plugin's name: its file will be NAME.wasm and its config table
        /// [plugins.config.NAME].
        name: String,
        /// The language of the starter.
        #[arg(long, value_enum)]
        lang: StarterLang,
        /// Where to write it (default: ./NAME); it must not exist or be empty.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The languages `arges plugin new` has a starter for.
#[cfg(feature = "plugins")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StarterLang {
    /// Rust with wit-bindgen (cargo, target wasm32-wasip2).
    Rust,
    /// Python with componentize-py.
    Python,
    /// JavaScript with componentize-js.
    Js,
}

#[cfg(feature = "plugins")]
impl std::fmt::Display for StarterLang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StarterLang::Rust => "Rust",
            StarterLang::Python => "Python",
            StarterLang::Js => "JavaScript",
        })
    }
}

#[cfg(feature = "plugins")]
const FACTS_HELP: &str = "The machine, as a YAML, JSON or TOML file (by its extension; \
YAML or JSON without one). Every field may be left out: a missing one has the value an \
unregistered machine has (no labels, all-zero hardware). Names are written as in \
wit/plugin.wit (client-address) or with underscores (client_address).

  uuid: 4c4c4544-0000-0000-0000-000000000001
  mac: 52:54:00:00:00:01
  arch: x86_64
  client-address: 10.0.0.7          # default 192.0.2.10
  inventory:
    registered: true
    server-id: 4c4c4544-0000-0000-0000-000000000001
    accepted: true
    cordoned: false
    environment: talos
    labels: {rack: r1}              # or as in the WIT: [[rack, r1]]
  hardware:
    vendor: Dell Inc.
    product: PowerEdge R640
    cpus: 32
    memory-bytes: 137438953472
    disks: 2
    nics: 4";

#[cfg(feature = "plugins")]
const CASES_HELP: &str = "The cases, as a YAML, JSON or TOML file: the plugin's config \
table (as [plugins.config.NAME] in appliance.toml) and a list of cases, each a machine's \
facts (as `arges plugin decide --facts` takes them) and what it must get: an action \
(pass, discover, environment, local-disk, wipe, script, deny, or error for a failing \
call), an action and its exact value (`environment talos`), or a table with the action \
and a part of its value.

  config:
    environment: talos
  cases:
    - name: a quarantined machine is refused
      facts: {inventory: {labels: {quarantine: \"true\"}}}
      expect: deny
    - name: an accepted machine installs talos
      facts: {inventory: {registered: true, accepted: true}}
      expect: environment talos
    - facts: {mac: \"52:54:00:00:00:01\"}
      expect: {action: deny, contains: deny list}";

/// `arges run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// appliance.toml; without it, embedded defaults (loopback, high ports, ./arges-data).
    #[arg(long, short, env = "ARGES_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address (repeatable); replaces the config's.
    #[arg(long = "http", value_name = "ADDR")]
    pub http: Vec<SocketAddr>,
    /// TFTP listen address (repeatable); replaces the config's.
    #[arg(long = "tftp", value_name = "ADDR")]
    pub tftp: Vec<SocketAddr>,
    /// Folder served over TFTP.
    #[arg(long, value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// Folder of boot assets served over HTTP.
    #[arg(long, value_name = "DIR")]
    pub assets: Option<PathBuf>,
    /// Folder of the inventory and generated tokens.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Folder of WebAssembly plugins.
    #[arg(long, value_name = "DIR")]
    pub plugins: Option<PathBuf>,
    /// The URL machines reach this appliance at (`http.public_url`).
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// proxyDHCP: `off` or `proxy` (answers PXE clients beside the site's DHCP server).
    #[arg(long, value_name = "MODE")]
    pub dhcp: Option<arges::config::DhcpMode>,
    /// Answer DHCP only on this interface (repeatable; default: every interface).
    #[arg(long = "dhcp-interface", value_name = "NAME")]
    pub dhcp_interface: Vec<String>,
    /// Kubernetes mode: run the controller against this kubeconfig's cluster.
    #[arg(long, value_name = "FILE", env = "ARGES_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: watch Cluster API objects in this namespace only (empty: every
    /// namespace, the default); `kubernetes.watch_namespace`.
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Write the bound addresses here as JSON once serving.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// `arges agent`
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Appliance base URL; default: arges.appliance= on the kernel command line.
    #[arg(long)]
    pub appliance: Option<String>,
    /// Registration token; default: arges.token= on the kernel command line.
    #[arg(long, env = "ARGES_REGISTRATION_TOKEN")]
    pub token: Option<String>,
    /// The sha256 of the appliance's HTTPS certificate, for an https:// appliance URL;
    /// default: arges.pin= on the kernel command line.
    #[arg(long)]
    pub pin: Option<String>,
    /// discover or wipe; default: arges.mode= on the kernel command line, else discover.
    #[arg(long)]
    pub mode: Option<String>,
    /// Kernel command line to read arges.* parameters from.
    #[arg(long, default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,
    /// Root under which /sys and /proc are read.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// SMBIOS UUID to report instead of the firmware's.
    #[arg(long)]
    pub uuid: Option<String>,
    /// IPMI device for the BMC address.
    #[arg(long, default_value = "/dev/ipmi0")]
    pub ipmi_device: String,
    /// Seconds to keep trying to reach the appliance.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the collected facts as JSON and exit without registering.
    #[arg(long)]
    pub dry_run: bool,
}

/// `arges loadtest`
#[derive(Debug, Args)]
pub struct LoadtestArgs {
    /// The appliance's HTTP address (loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The appliance's TFTP address (loopback).
    #[arg(long, default_value = "127.0.0.1:6969")]
    pub tftp: SocketAddr,
    /// Registration token.
    #[arg(long, env = "ARGES_REGISTRATION_TOKEN")]
    pub token: String,
    /// File fetched over TFTP first, as firmware fetches iPXE.
    #[arg(long, default_value = "ipxe.efi")]
    pub file: String,
    /// Machines in the storm.
    #[arg(long, default_value_t = 100)]
    pub machines: u32,
    /// Machines booting at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Stop after this many seconds whatever is left.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How to reach a running appliance's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The appliance's admin API.
    #[arg(long, env = "ARGES_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Admin token; default: `admin.token` in --data-dir.
    #[arg(long, env = "ARGES_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// The appliance's data folder, where it keeps its generated admin token (and its
    /// certificate, trusted for an https:// URL when no --pin is given).
    #[arg(long, default_value = "arges-data")]
    pub data_dir: std::path::PathBuf,
    /// The sha256 of the admin API's TLS certificate (an https:// URL).
    #[arg(long, env = "ARGES_PIN")]
    pub pin: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `arges bmc`
#[derive(Debug, Args)]
pub struct BmcArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(subcommand)]
    pub command: BmcCommand,
}

/// `arges server`
#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(subcommand)]
    pub command: ServerCommand,
}

/// What `arges server` does.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Open a provisioning window (and clear an alarm): the machine's next boot, within
    /// `[windows] secs`, gets its secrets. For machines without a BMC, and after an alarm.
    Arm { server: String },
    /// Close the server's window and revoke its secret.
    Disarm { server: String },
    /// The server's window and alarm.
    Show { server: String },
    /// The server's boots as the appliance witnessed them, step by step with the gaps
    /// between steps (the last `--last` boots).
    Boots {
        server: String,
        #[arg(long, default_value_t = 1)]
        last: usize,
    },
}

/// What `arges bmc` does.
#[derive(Debug, Subcommand)]
pub enum BmcCommand {
    /// Read the power state and next boot from the server's BMC.
    Status { server: String },
    /// Change the server's power: on, off, soft-off, cycle or reset.
    Power { server: String, action: String },
    /// Set the next boot: pxe, disk, bios or cdrom (once and UEFI unless told).
    Bootdev {
        server: String,
        device: String,
        /// Keep it for every boot, not just the next.
        #[arg(long)]
        persistent: bool,
        /// Legacy BIOS boot instead of UEFI.
        #[arg(long)]
        legacy: bool,
    },
    /// Configure the server's BMC (the password is sealed at rest and never shown).
    Set {
        server: String,
        /// `host` or `host:port`.
        #[arg(long)]
        address: String,
        /// ipmi or redfish.
        #[arg(long, default_value = "ipmi")]
        protocol: String,
        #[arg(long)]
        username: String,
        /// A file holding the password (or set ARGES_BMC_PASSWORD).
        #[arg(long, value_name = "FILE")]
        password_file: Option<std::path::PathBuf>,
        /// Pin a driver instead of choosing by probe.
        #[arg(long)]
        driver: Option<String>,
        /// Redfish: CA certificates (PEM) to check the BMC against.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// Redfish: the sha256 of the BMC certificate (DER), hex.
        #[arg(long)]
        pin_sha256: Option<String>,
        /// Redfish: accept any certificate (warned about on every use).
        #[arg(long)]
        insecure: bool,
    },
}
