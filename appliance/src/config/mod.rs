//! Appliance configuration: `appliance.toml`, assembled from its sections into
//! [`Config`].
//!
//! Each subsystem owns its section beside its code (`tftp::config`, `http::config`,
//! `dhcp::config`, `bmc::config`, `plugins::config`, `controller::config`,
//! `core::config`, `ipxe::config`), a serde type that mirrors the file and a check
//! (`TryFrom`, or `from_section` where the assembly must hand it a folder) that says
//! what is wrong as an [`Invalid`] key and message. This module reads the file
//! ([`file`](mod@file)), settles what depends on the command line and the data folder (listen
//! addresses, folders, tokens: [`tokens`]), checks what spans sections
//! ([`environments`]), and adds the file's name and the line to every error.
//!
//! [`Config::from_source`] does no I/O beyond reading template files: tests and
//! `arges check-config` get the same answers on any host. What the host decides
//! ([`Config::load`] and [`Config::defaults`]: the pinned assets' hashes, Debian's iPXE
//! folder when none is named, the host name as the default Kubernetes identity) is read
//! after, by [`Config::settle`].

pub mod environments;
pub mod file;
pub mod tokens;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use crate::bmc::config::BmcConfig;
pub use crate::controller::config::{KubernetesConfig, is_label_value};
pub use crate::core::config::{LocalDiskMethod, PolicyConfig, Unaccepted, WindowsConfig};
pub use crate::dhcp::config::{BootFiles, DhcpConfig, DhcpMode};
use crate::files::CacheLimits;
pub use crate::http::config::HttpConfig;
use crate::ipxe::{TemplateError, Templates};
pub use crate::plugins::config::{PluginsConfig, plugin_table};
use crate::tftp::TftpSettings;
use crate::tftp::config::TftpConfig;
pub use environments::{AssetPin, Environment, check_sha256};
pub use file::ConfigFile;
pub use tokens::TokenSource;

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{origin}: {key}{line}: {message}")]
    Invalid {
        origin: String,
        key: String,
        line: LineHint,
        message: String,
    },
    /// A section's check, not yet placed in its file (the assembly places it).
    #[error(transparent)]
    Section(#[from] Invalid),
    #[error(transparent)]
    Template(#[from] TemplateError),
}

impl ConfigError {
    /// A section's error with the file's name and the key's line.
    fn placed(self, origin: &str, src: &str) -> ConfigError {
        match self {
            ConfigError::Section(Invalid { key, message }) => ConfigError::Invalid {
                origin: origin.to_string(),
                line: LineHint(locate(src, &key)),
                key,
                message,
            },
            other => other,
        }
    }
}

/// A value of a section that does not hold: its dotted key and what is wrong. Sections
/// say this; the assembly adds the file and the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// " (line N)" when the key was found in the source.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineHint(pub Option<usize>);

impl fmt::Display for LineHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " (line {n})"),
            None => Ok(()),
        }
    }
}

/// Finds the line defining a dotted `key` (`tftp.max_blksize`, `environments.x.kernel`).
/// Serde has already accepted the file, so a simple header-and-key scan is enough.
fn locate(src: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            table = h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim()
                .replace(['"', ' '], "");
            if table == key {
                return Some(i + 1);
            }
            continue;
        }
        if let Some((k, _)) = t.split_once('=') {
            let k = k.trim().trim_matches('"');
            let full = if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            };
            if full == key {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Debian's `ipxe` package puts its binaries here.
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: HttpConfig,
    /// The HTTPS listeners' certificate and key; made there on first start when the
    /// config names none (`tls_generate`).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_generate: bool,
    pub tftp_listen: Vec<SocketAddr>,
    pub tftp_root: PathBuf,
    /// Where iPXE binaries missing from the TFTP root are found.
    pub ipxe_dir: Option<PathBuf>,
    pub tftp: TftpSettings,
    pub cache: CacheLimits,
    pub assets_dir: PathBuf,
    pub data_dir: PathBuf,
    /// On a stop, how long work in flight may take to finish.
    pub drain: std::time::Duration,
    pub plugins: PluginsConfig,
    pub registration_token: TokenSource,
    pub admin_token: TokenSource,
    pub policy: PolicyConfig,
    pub windows: WindowsConfig,
    pub audit: crate::audit::AuditConfig,
    pub discovery_environment: String,
    pub wipe_environment: String,
    pub environments: BTreeMap<String, Environment>,
    /// Files whose sha256 the config pins ([`Config::settle`] checks them).
    pub asset_pins: Vec<AssetPin>,
    pub templates: Templates,
    pub dhcp: DhcpConfig,
    pub kubernetes: Option<KubernetesConfig>,
    pub bmc: BmcConfig,
}

/// Command-line overrides of the common settings.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub http: Vec<SocketAddr>,
    pub tftp: Vec<SocketAddr>,
    pub tftp_root: Option<PathBuf>,
    pub assets_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub plugins_dir: Option<PathBuf>,
    pub dhcp: Option<DhcpMode>,
    pub dhcp_interfaces: Vec<String>,
    pub kubeconfig: Option<PathBuf>,
    /// Cluster API objects watched in this namespace only (`Some("")`: every one).
    pub watch_namespace: Option<String>,
    pub public_url: Option<String>,
}

impl Config {
    /// Reads `path`, validates it and settles it on this host.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let origin = path.display().to_string();
        Self::from_source(&origin, &src, &base, overrides)?.settle(&origin, &src)
    }

    /// The embedded defaults (paths under the current folder), with `overrides` applied,
    /// settled on this host.
    pub fn defaults(overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::from_source("<defaults>", "", Path::new(""), overrides)?.settle("<defaults>", "")
    }

    /// Parses and validates a config text; relative paths resolve against `base`. No
    /// host I/O: see [`Config::settle`].
    pub fn from_source(
        origin: &str,
        src: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(src).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        Self::assemble(base, file, overrides).map_err(|e| e.placed(origin, src))
    }

    /// What validation leaves to the host, read now: every pinned asset's sha256,
    /// Debian's iPXE folder when the file names none and it exists, and the host name
    /// (`ARGES_IDENTITY`, else the kernel's) as the Kubernetes identity when the file
    /// gives none.
    pub fn settle(mut self, origin: &str, src: &str) -> Result<Config, ConfigError> {
        let place = |e: Invalid| ConfigError::from(e).placed(origin, src);
        for pin in &self.asset_pins {
            check_sha256(&pin.path, &pin.sha256).map_err(|m| place(Invalid::new(&pin.key, m)))?;
        }
        if self.ipxe_dir.is_none() {
            let debian = Path::new(DEBIAN_IPXE_DIR);
            self.ipxe_dir = debian.is_dir().then(|| debian.to_path_buf());
        }
        if let Some(k) = &mut self.kubernetes
            && k.identity.is_empty()
        {
            let host = match std::env::var(IDENTITY_ENV) {
                Ok(name) => name,
                Err(_) => std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default(),
            };
            k.identity = identity_from_host_name(&host);
            crate::controller::config::check_identity(&k.identity).map_err(place)?;
        }
        // In a pod, its own namespace (where its Lease's Role is, wherever clusterctl's
        // --target-namespace put it), whatever the file says.
        if let Some(k) = &mut self.kubernetes
            && k.kubeconfig.is_none()
            && let Ok(ns) = std::env::var(NAMESPACE_ENV)
            && !ns.is_empty()
        {
            if !crate::controller::config::is_dns_label(&ns) {
                return Err(place(Invalid::new(
                    "kubernetes.namespace",
                    format!("{NAMESPACE_ENV}={ns:?} is not a namespace name"),
                )));
            }
            k.namespace = ns;
        }
        Ok(self)
    }

    /// Each section's check, and what the command line and the data folder settle.
    fn assemble(base: &Path, mut f: ConfigFile, o: &Overrides) -> Result<Config, ConfigError> {
        let resolve = |p: &Path| {
            if p.is_absolute() || base.as_os_str().is_empty() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let folder = |flag: &Option<PathBuf>, file: &Option<PathBuf>, default: PathBuf| {
            flag.clone()
                .unwrap_or_else(|| file.as_deref().map(resolve).unwrap_or(default))
        };
        let data_dir = folder(&o.data_dir, &f.data_dir, "arges-data".into());
        let under_data = |name: &str| data_dir.join(name);
        let tftp_root = folder(&o.tftp_root, &f.tftp.root, under_data("tftp"));
        let assets_dir = folder(&o.assets_dir, &f.assets_dir, under_data("assets"));
        let plugins_dir = folder(&o.plugins_dir, &f.plugins.dir, under_data("plugins"));

        // The command line's word beats the file's.
        if !o.http.is_empty() {
            f.http.listen = o.http.clone();
        }
        if let Some(url) = &o.public_url {
            f.http.public_url = Some(url.clone());
        }
        if !o.tftp.is_empty() {
            f.tftp.listen = o.tftp.clone();
        }
        if let Some(mode) = o.dhcp {
            f.dhcp.mode = mode;
        }
        if !o.dhcp_interfaces.is_empty() {
            f.dhcp.interfaces = o.dhcp_interfaces.clone();
        }

        let drain = f.drain_secs.unwrap_or(20);
        if drain > 600 {
            return Err(Invalid::new("drain_secs", format!("{drain} is above 600")).into());
        }
        let tftp = TftpConfig::try_from(&f.tftp)?;
        let http = HttpConfig::try_from(&f.http)?;
        let policy = PolicyConfig::try_from(&f.policy)?;
        let windows = WindowsConfig::try_from(&f.windows)?;
        let audit = crate::audit::AuditConfig::try_from(&f.audit)?;
        let registration_token = TokenSource::from_keys(
            &f.tokens.registration,
            &f.tokens.registration_file,
            "tokens.registration",
            under_data("registration.token"),
            resolve,
        )?;
        let admin_token = TokenSource::from_keys(
            &f.tokens.admin,
            &f.tokens.admin_file,
            "tokens.admin",
            under_data("admin.token"),
            resolve,
        )?;
        if let (TokenSource::Inline(a), TokenSource::Inline(r)) =
            (&admin_token, &registration_token)
            && a == r
        {
            return Err(Invalid::new(
                "tokens.admin",
                "is the registration token too: every machine's agent would hold the admin API's key",
            )
            .into());
        }
        let envs = environments::environments(
            &f.environments,
            &f.discovery,
            policy.default_environment.as_ref(),
            &assets_dir,
        )?;
        let templates = Templates::from_section(&f.templates, resolve)?;
        let plugins = PluginsConfig::from_section(
            &f.plugins,
            plugins_dir,
            folder(&None, &f.plugins.cache_dir, under_data("plugin-cache")),
            folder(
                &None,
                &f.plugins.cache_key_file,
                under_data("plugin-cache.key"),
            ),
        )?;
        let dhcp = DhcpConfig::try_from(&f.dhcp)?;
        let bmc = BmcConfig {
            manager: crate::bmc::manager::ManagerSettings::try_from(&f.bmc)?,
            key_file: folder(&None, &f.bmc.key_file, under_data("bmc-credentials.key")),
        };
        let kubeconfig = o
            .kubeconfig
            .clone()
            .or_else(|| f.kubernetes.kubeconfig.as_deref().map(resolve));
        let kubernetes = KubernetesConfig::from_section(
            &f.kubernetes,
            kubeconfig,
            o.watch_namespace.as_deref(),
        )?;

        let tls_generate = f.http.tls_cert_file.is_none();
        let tls_cert = folder(
            &None,
            &f.http.tls_cert_file,
            under_data("tls/appliance.crt"),
        );
        let tls_key = folder(&None, &f.http.tls_key_file, under_data("tls/appliance.key"));
        Ok(Config {
            http,
            tls_cert,
            tls_key,
            tls_generate,
            tftp_listen: f.tftp.listen.clone(),
            tftp_root,
            ipxe_dir: f.tftp.ipxe_dir.as_deref().map(resolve),
            tftp: tftp.settings,
            cache: tftp.cache,
            assets_dir,
            data_dir,
            drain: std::time::Duration::from_secs(drain),
            plugins,
            registration_token,
            admin_token,
            policy,
            windows,
            audit,
            discovery_environment: envs.discovery,
            wipe_environment: envs.wipe,
            environments: envs.by_name,
            asset_pins: envs.pins,
            templates,
            dhcp,
            kubernetes,
            bmc,
        })
    }
}

/// The variable that names the host when the file gives no identity: in a pod, the
/// node's name (deploy/mgmt sets it from `spec.nodeName`).
const IDENTITY_ENV: &str = "ARGES_IDENTITY";

/// The variable naming an in-cluster appliance's own namespace (deploy/mgmt sets it from
/// the pod's `metadata.namespace`).
const NAMESPACE_ENV: &str = "ARGES_NAMESPACE";

/// A host's name as an identity: its first DNS label, lower case (`Rack-1.dc.example` is
/// `rack-1`), since a node or host name may be a full domain name and an identity is a
/// label value.
fn identity_from_host_name(host: &str) -> String {
    host.trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::time::Duration;

    #[test]
    fn a_host_name_becomes_its_first_label() {
        assert_eq!(identity_from_host_name("Rack-1.dc.example.com\n"), "rack-1");
        assert_eq!(identity_from_host_name("vm"), "vm");
    }

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::from_source(
            "appliance.toml",
            src,
            Path::new("/etc/arges"),
            &Overrides::default(),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults(&Overrides::default()).unwrap();
        assert_eq!(c.http.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert!(c.environments.contains_key("discovery"));
        assert_eq!(c.tftp_root, PathBuf::from("arges-data/tftp"));
        assert!(matches!(c.admin_token, TokenSource::Generated(_)));
    }

    #[test]
    fn bmc_settings_are_checked_and_resolved() {
        let c = parse("[bmc]\nattempts = 5\nbackoff_ms = 250\nsettle_s = 90\n").unwrap();
        assert_eq!(c.bmc.manager.attempts, 5);
        assert_eq!(c.bmc.manager.backoff, Duration::from_millis(250));
        assert_eq!(c.bmc.manager.settle, Duration::from_secs(90));
        // Beside the inventory, in the data folder.
        assert_eq!(c.bmc.key_file, c.data_dir.join("bmc-credentials.key"));
        for bad in [
            "attempts = 0",
            "attempts = 99",
            "poll_ms = 1",
            "queue_limit = 0",
        ] {
            let e = parse(&format!("[bmc]\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains("bmc"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("[tftp]\nmax_blksize = 1468\nblocksize = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("blocksize"), "{e}");
    }

    #[test]
    fn out_of_range_names_key_and_line() {
        let e = parse("# c\n[tftp]\nmax_blksize = 70000\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "appliance.toml: tftp.max_blksize (line 3): 70000 is out of range: expected 8 to 65464"
        );
    }

    #[test]
    fn wrong_type_is_explained() {
        let e = parse("[http]\nlisten = \"8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("listen"), "{e}");
    }

    #[test]
    fn environments_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"kernel").unwrap();
        let good = hex::encode(Sha256::digest(b"kernel"));
        let src = format!(
            "assets_dir = \"{}\"\n[policy]\ndefault_environment = \"talos\"\n[environments.talos]\nkernel = {{ path = \"vmlinuz\", sha256 = \"{good}\" }}\ninitrds = [\"initramfs.xz\"]\ncmdline = \"talos.config={{{{ appliance.url }}}}/configdata\"\n",
            dir.path().display()
        );
        let c = parse(&src).unwrap();
        assert_eq!(
            c.environments["talos"].initrds,
            vec![dir.path().join("initramfs.xz")]
        );
        assert!(
            c.environments.contains_key("discovery"),
            "discovery stays available"
        );
        let bad = src.replace(&good, &"0".repeat(64));
        let unsettled = parse(&bad).expect("validation reads no asset");
        let e = unsettled
            .settle("appliance.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environments.talos.kernel (line 5)") && e.contains("expected 0000"),
            "{e}"
        );
        let e = parse("[policy]\ndefault_environment = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy.default_environment (line 2)"), "{e}");
        let e = parse("[environments.x]\nkernel = \"k\"\ncmdline = \"{{ a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("environments.x.cmdline"), "{e}");
    }

    #[test]
    fn broken_configs_name_the_key_and_line() {
        for (src, wants) in [
            (
                "[http]\nlisten = [\"127.0.0.1:8080\"]\n\n[tftp]\nwindowsize = 4\n",
                &["line 5", "windowsize", "max_windowsize"][..],
            ),
            (
                "[tftp]\nmax_blksize = 4\n",
                &["tftp.max_blksize (line 2)", "expected 8 to 65464"][..],
            ),
            (
                "[http]\nlisten = [\"not an address\"]\n",
                &["line 2", "listen"][..],
            ),
            (
                "[policy]\nunaccepted = \"reboot\"\n",
                &["line 2", "local-disk", "discover"][..],
            ),
            ("[environments.x]\ncmdline = \"a\"\n", &["kernel"][..]),
            (
                "[dhcp]\nmode = \"relay\"\n",
                &["line 2", "mode", "off", "proxy"][..],
            ),
            (
                "[dhcp.boot_files]\nbios = \"../undionly.kpxe\"\n",
                &["dhcp.boot_files.bios (line 2)", "not a file name"][..],
            ),
            (
                "[dhcp]\nboot_script = \"boot.ipxe\"\n",
                &["dhcp.boot_script (line 2)", "starting with /"][..],
            ),
            (
                "[environments.x]\nkernel = { path = \"k\", sha256 = \"abc\" }\n",
                &["environments.x.kernel (line 2)", "64 hex digits"][..],
            ),
            (
                "[discovery]\nenvironment = \"disco\"\n",
                &["discovery.environment (line 2)", "not defined"][..],
            ),
            (
                "[windows]\nsecs = 7200\n",
                &["windows.secs (line 2)", "3600"][..],
            ),
            (
                "[plugins.pins]\ndeny = \"abc\"\n",
                &["plugins.pins.deny (line 2)", "64 hex digits"][..],
            ),
            (
                "[kubernetes]\nkubeconfig = \"kc\"\nidentity = \"Rack 1\"\n",
                &["kubernetes.identity (line 3)", "label value"][..],
            ),
            (
                "[bmc]\nattempts = 0\n",
                &["bmc.attempts (line 2)", "1 to 20"][..],
            ),
        ] {
            let err = parse(src).expect_err(src).to_string();
            for want in wants {
                assert!(
                    err.contains(want),
                    "error for {src:?} lacks {want:?}:\n{err}"
                );
            }
        }
    }

    #[test]
    fn tokens() {
        let e = parse("[tokens]\nadmin = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens.admin (line 2)"), "{e}");
        let same =
            "[tokens]\nregistration = \"0123456789abcdef0\"\nadmin = \"0123456789abcdef0\"\n";
        let e = parse(same).unwrap_err().to_string();
        assert!(
            e.contains("tokens.admin (line 3)") && e.contains("registration token too"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.tok");
        std::fs::write(&short, "abc\n").unwrap();
        let e = TokenSource::File(short).resolve().unwrap_err().to_string();
        assert!(e.contains("3 characters; at least 16"), "{e}");
        let c = parse("[tokens]\nadmin_file = \"admin.tok\"\n").unwrap();
        assert_eq!(
            c.admin_token,
            TokenSource::File("/etc/arges/admin.tok".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let g = TokenSource::Generated(dir.path().join("sub/t"));
        let first = g.resolve().unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(g.resolve().unwrap(), first, "a generated token is kept");
    }
}
