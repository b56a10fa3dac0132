//! Appliance configuration: `appliance.toml`, validated into [`Config`].
//!
//! [`file`] holds the serde types that mirror the file. [`Config::from_file`] turns them
//! into the validated form the appliance runs on: relative paths resolved against the
//! config file's folder, ranges checked, environment assets checked against their pinned
//! sha256, templates compiled. Every error names the key, the line when it has one, and
//! what was expected.

pub mod file;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::files::CacheLimits;
use crate::ipxe::{ScriptKind, Template, TemplateError, Templates};
use crate::tftp::TftpSettings;
pub use file::{BootFilesSection as BootFiles, ConfigFile, DhcpMode, LocalDiskMethod, Unaccepted};

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
    #[error(transparent)]
    Template(#[from] TemplateError),
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

/// A validated boot environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub kernel: PathBuf,
    pub initrds: Vec<PathBuf>,
    pub cmdline: Template,
}

impl Environment {
    /// Every file of the environment, kernel first.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.kernel).chain(self.initrds.iter())
    }

    /// The file served as `/env/<name>/<file_name>`.
    pub fn file_named(&self, file_name: &str) -> Option<&PathBuf> {
        self.files()
            .find(|p| p.file_name().is_some_and(|n| n == file_name))
    }
}

/// Where a token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
    /// Generated on first start into this file in the data folder.
    Generated(PathBuf),
}

impl TokenSource {
    /// Reads (or for `Generated`, creates on first use) the token.
    pub fn resolve(&self) -> std::io::Result<String> {
        match self {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => Ok(std::fs::read_to_string(p)?.trim().to_string()),
            TokenSource::Generated(p) => match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
                _ => {
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let token = crate::random_token();
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(p)?;
                    f.write_all(token.as_bytes())?;
                    f.sync_all()?;
                    tracing::info!(path = %p.display(), "generated a new token");
                    Ok(token)
                }
            },
        }
    }
}

/// Built-in boot policy settings.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub unaccepted: Unaccepted,
    pub default_environment: Option<String>,
    pub local_disk_method: LocalDiskMethod,
    pub local_disk_method_by_arch: BTreeMap<String, LocalDiskMethod>,
}

/// `[windows]`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowsConfig {
    /// How long a provisioning window stays open.
    pub length: Duration,
    /// Honest retries of a used secret, from the address that used it.
    pub retries: u32,
    /// How long after its first use a secret may be retried.
    pub retry_for: Duration,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig {
            length: Duration::from_secs(900),
            retries: 2,
            retry_for: Duration::from_secs(120),
        }
    }
}

impl PolicyConfig {
    /// The local-disk method for a machine architecture.
    pub fn local_disk_method(&self, arch: &str) -> LocalDiskMethod {
        self.local_disk_method_by_arch
            .get(arch)
            .copied()
            .unwrap_or(self.local_disk_method)
    }
}

/// Validated plugin settings.
#[derive(Debug, Clone)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub order: Vec<String>,
    pub timeout: Duration,
    /// Deadline of one BMC driver step.
    pub driver_timeout: Duration,
    pub memory_bytes: u64,
    pub max_instances: u32,
    pub pooling: bool,
    pub reuse_instances: bool,
    /// Plugin name to lower-case hex sha256.
    pub pins: BTreeMap<String, String>,
    /// Plugin name to its table as sorted key/value strings (strings as they are, other
    /// scalars as TOML text, arrays and tables as JSON).
    pub config: BTreeMap<String, Vec<(String, String)>>,
    /// Where compiled plugins are cached.
    pub cache_dir: PathBuf,
}

impl PluginsConfig {
    /// Settings for `dir` with every default (used by `arges plugin` commands).
    pub fn with_defaults(dir: PathBuf, cache_dir: PathBuf) -> Self {
        let d = file::PluginsSection::default();
        PluginsConfig {
            dir,
            order: d.order,
            timeout: Duration::from_millis(d.timeout_ms),
            driver_timeout: Duration::from_millis(d.driver_timeout_ms),
            memory_bytes: d.memory_bytes,
            max_instances: d.max_instances,
            pooling: d.pooling,
            reuse_instances: d.reuse_instances,
            pins: BTreeMap::new(),
            config: BTreeMap::new(),
            cache_dir,
        }
    }
}

/// Flattens a plugin's TOML table into the strings the `config` import hands out.
pub fn plugin_table(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    serde_json::to_string(v).unwrap_or_default()
                }
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// Validated proxyDHCP settings.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub listen: Vec<SocketAddr>,
    pub pxe_listen: Vec<SocketAddr>,
    pub interfaces: Vec<String>,
    pub server_address: Option<std::net::Ipv4Addr>,
    pub ipxe_user_classes: Vec<String>,
    pub boot_script: String,
    pub boot_files: BootFiles,
}

/// Validated Kubernetes-mode settings; `None` in [`Config`] when the mode is off.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// `None`: in-cluster (service account).
    pub kubeconfig: Option<PathBuf>,
    pub identity: String,
    pub namespace: String,
    /// Released servers are wiped (else powered off and free at once).
    pub wipe_on_release: bool,
}

/// Whether `s` is a valid Kubernetes label value (and DNS-label-like: no dots).
pub fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Debian's `ipxe` package puts its binaries here.
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_listen: Vec<SocketAddr>,
    pub public_url: Option<String>,
    pub tftp_listen: Vec<SocketAddr>,
    pub tftp_root: PathBuf,
    /// Where iPXE binaries missing from the TFTP root are found.
    pub ipxe_dir: Option<PathBuf>,
    pub tftp: TftpSettings,
    pub cache: CacheLimits,
    pub assets_dir: PathBuf,
    pub data_dir: PathBuf,
    pub plugins: PluginsConfig,
    pub registration_token: TokenSource,
    pub admin_token: TokenSource,
    pub policy: PolicyConfig,
    pub windows: WindowsConfig,
    pub discovery_environment: String,
    pub wipe_environment: String,
    pub environments: BTreeMap<String, Environment>,
    pub templates: Templates,
    pub dhcp: DhcpConfig,
    pub kubernetes: Option<KubernetesConfig>,
    pub bmc: BmcConfig,
}

/// `[bmc]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct BmcConfig {
    pub manager: crate::bmc::manager::ManagerSettings,
    /// The key sealing stored BMC passwords.
    pub key_file: PathBuf,
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
    pub public_url: Option<String>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_source(&path.display().to_string(), &src, &base, overrides)
    }

    /// The embedded defaults (paths under the current folder), with `overrides` applied.
    pub fn defaults(overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::from_source("<defaults>", "", Path::new(""), overrides)
    }

    /// Parses and validates a config text; relative paths resolve against `base`.
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
        Self::validate(origin, src, base, file, overrides)
    }

    fn validate(
        origin: &str,
        src: &str,
        base: &Path,
        mut f: ConfigFile,
        o: &Overrides,
    ) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            line: LineHint(locate(src, key)),
            message,
        };
        let resolve = |p: &Path| {
            if p.is_absolute() || base.as_os_str().is_empty() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let data_dir = o.data_dir.clone().unwrap_or_else(|| {
            f.data_dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| "arges-data".into())
        });
        let under_data = |name: &str| data_dir.join(name);
        let tftp_root = o.tftp_root.clone().unwrap_or_else(|| {
            f.tftp
                .root
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| under_data("tftp"))
        });
        let assets_dir = o.assets_dir.clone().unwrap_or_else(|| {
            f.assets_dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| under_data("assets"))
        });
        let plugins_dir = o.plugins_dir.clone().unwrap_or_else(|| {
            f.plugins
                .dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| under_data("plugins"))
        });

        let t = &f.tftp;
        if !(8..=65464).contains(&t.max_blksize) {
            return Err(invalid(
                "tftp.max_blksize",
                format!("{} is out of range: expected 8 to 65464", t.max_blksize),
            ));
        }
        if !(1..=1024).contains(&t.max_windowsize) {
            return Err(invalid(
                "tftp.max_windowsize",
                format!("{} is out of range: expected 1 to 1024", t.max_windowsize),
            ));
        }
        for (key, v) in [
            ("tftp.max_transfers", t.max_transfers),
            ("tftp.max_transfers_per_client", t.max_transfers_per_client),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if t.timeout_ms == 0 || t.max_timeout_ms < t.timeout_ms {
            return Err(invalid(
                "tftp.timeout_ms",
                "must be at least 1 and not above tftp.max_timeout_ms".into(),
            ));
        }
        let http_listen = if o.http.is_empty() {
            f.http.listen.clone()
        } else {
            o.http.clone()
        };
        let tftp_listen = if o.tftp.is_empty() {
            t.listen.clone()
        } else {
            o.tftp.clone()
        };
        if http_listen.is_empty() {
            return Err(invalid("http.listen", "needs at least one address".into()));
        }
        if let Some(url) = &o.public_url {
            f.http.public_url = Some(url.clone());
        }
        if let Some(url) = &f.http.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "http.public_url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }

        if f.policy.boot_token_ttl_secs.is_some() {
            return Err(invalid(
                "policy.boot_token_ttl_secs",
                "was replaced by [windows] secs: a machine's secrets now go out only in a provisioning window the appliance opens (default 900 seconds; see SECURITY.md)".into(),
            ));
        }
        let w = &f.windows;
        if !(30..=3600).contains(&w.secs) {
            return Err(invalid(
                "windows.secs",
                format!("{} is outside 30 to 3600 seconds", w.secs),
            ));
        }
        if w.retries > 10 {
            return Err(invalid("windows.retries", "must be 0 to 10".into()));
        }
        if w.retry_secs > w.secs {
            return Err(invalid(
                "windows.retry_secs",
                format!("must not exceed windows.secs ({})", w.secs),
            ));
        }
        let windows = WindowsConfig {
            length: Duration::from_secs(w.secs),
            retries: w.retries,
            retry_for: Duration::from_secs(w.retry_secs),
        };

        let token = |inline: &Option<String>,
                     path: &Option<PathBuf>,
                     key: &str,
                     generated: &str| match (inline, path) {
            (Some(_), Some(_)) => Err(invalid(
                key,
                format!("set either {key} or {key}_file, not both"),
            )),
            (Some(t), None) if t.len() < 16 => {
                Err(invalid(key, "must be at least 16 characters".into()))
            }
            (Some(t), None) => Ok(TokenSource::Inline(t.clone())),
            (None, Some(p)) => Ok(TokenSource::File(resolve(p))),
            (None, None) => Ok(TokenSource::Generated(under_data(generated))),
        };
        let registration_token = token(
            &f.tokens.registration,
            &f.tokens.registration_file,
            "tokens.registration",
            "registration.token",
        )?;
        let admin_token = token(
            &f.tokens.admin,
            &f.tokens.admin_file,
            "tokens.admin",
            "admin.token",
        )?;

        let discovery = f.discovery.environment.clone();
        if f.environments.is_empty()
            || (discovery == "discovery" && !f.environments.contains_key("discovery"))
        {
            f.environments
                .entry("discovery".into())
                .or_insert_with(file::default_discovery_environment);
        }
        let mut environments = BTreeMap::new();
        for (name, e) in &f.environments {
            let key = format!("environments.{name}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    &key,
                    format!("environment name {name:?} may only hold letters, digits, - and _"),
                ));
            }
            let cmdline = Template::parse(&format!("{key}.cmdline"), &e.cmdline)?;
            let mut paths = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (i, asset) in std::iter::once(&e.kernel)
                .chain(e.initrds.iter())
                .enumerate()
            {
                let akey = if i == 0 {
                    format!("{key}.kernel")
                } else {
                    format!("{key}.initrds")
                };
                let path = if asset.path().is_absolute() {
                    asset.path().clone()
                } else {
                    assets_dir.join(asset.path())
                };
                let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                    return Err(invalid(
                        &akey,
                        format!("{} has no file name", path.display()),
                    ));
                };
                if !seen.insert(file_name.to_string()) {
                    return Err(invalid(
                        &akey,
                        format!("two files of the environment are named {file_name:?}"),
                    ));
                }
                if let Some(want) = asset.sha256() {
                    check_sha256(&path, want).map_err(|m| invalid(&akey, m))?;
                }
                paths.push(path);
            }
            let kernel = paths.remove(0);
            environments.insert(
                name.clone(),
                Environment {
                    name: name.clone(),
                    kernel,
                    initrds: paths,
                    cmdline,
                },
            );
        }
        let wipe_environment = f
            .discovery
            .wipe_environment
            .clone()
            .unwrap_or_else(|| discovery.clone());
        for (key, env) in [
            ("discovery.environment", Some(&discovery)),
            ("discovery.wipe_environment", Some(&wipe_environment)),
            (
                "policy.default_environment",
                f.policy.default_environment.as_ref(),
            ),
        ] {
            if let Some(env) = env
                && !environments.contains_key(env)
            {
                return Err(invalid(
                    key,
                    format!("names environment {env:?}, which is not defined under [environments]"),
                ));
            }
        }

        let mut templates = Templates::builtin();
        let tf = &f.templates;
        for (kind, path) in [
            (ScriptKind::Discover, &tf.discover),
            (ScriptKind::Environment, &tf.environment),
            (ScriptKind::LocalDisk, &tf.local_disk),
            (ScriptKind::Wipe, &tf.wipe),
            (ScriptKind::Deny, &tf.deny),
        ] {
            if let Some(p) = path {
                templates.load(kind, &resolve(p))?;
            }
        }

        let p = &f.plugins;
        if p.timeout_ms == 0 || p.timeout_ms > 10_000 {
            return Err(invalid(
                "plugins.timeout_ms",
                format!("{} is out of range: expected 1 to 10000", p.timeout_ms),
            ));
        }
        if p.memory_bytes < 1 << 20 {
            return Err(invalid(
                "plugins.memory_bytes",
                "must be at least 1048576 (1 MiB)".into(),
            ));
        }
        if p.max_instances == 0 {
            return Err(invalid(
                "plugins.max_instances",
                "must be at least 1".into(),
            ));
        }
        let mut pins = BTreeMap::new();
        for (name, sha) in &p.pins {
            let sha = sha.trim().to_ascii_lowercase();
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    &format!("plugins.pins.{name}"),
                    format!("{sha:?} is not 64 hex digits"),
                ));
            }
            pins.insert(name.clone(), sha);
        }
        let plugins = PluginsConfig {
            dir: plugins_dir,
            order: p.order.clone(),
            timeout: Duration::from_millis(p.timeout_ms),
            driver_timeout: Duration::from_millis(p.driver_timeout_ms),
            memory_bytes: p.memory_bytes,
            max_instances: p.max_instances,
            pooling: p.pooling,
            reuse_instances: p.reuse_instances,
            pins,
            config: p
                .config
                .iter()
                .map(|(k, t)| (k.clone(), plugin_table(t)))
                .collect(),
            cache_dir: p
                .cache_dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| under_data("plugin-cache")),
        };

        let dhcp = Self::validate_dhcp(&f.dhcp, o, &invalid)?;
        let b = &f.bmc;
        if b.attempts == 0 || b.attempts > 20 {
            return Err(invalid("bmc.attempts", "must be 1 to 20".into()));
        }
        if b.exchange_timeout_ms < 10 || b.poll_ms < 10 || b.queue_limit == 0 {
            return Err(invalid(
                "bmc",
                "exchange_timeout_ms and poll_ms are at least 10, queue_limit at least 1".into(),
            ));
        }
        let bmc = BmcConfig {
            manager: crate::bmc::manager::ManagerSettings {
                exchange_timeout: Duration::from_millis(b.exchange_timeout_ms),
                attempts: b.attempts,
                backoff: Duration::from_millis(b.backoff_ms),
                settle: Duration::from_secs(b.settle_s),
                poll: Duration::from_millis(b.poll_ms),
                queue_limit: b.queue_limit,
                ..Default::default()
            },
            key_file: b
                .key_file
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| under_data("bmc-credentials.key")),
        };
        let k = &f.kubernetes;
        let kubeconfig = o
            .kubeconfig
            .clone()
            .or_else(|| k.kubeconfig.as_deref().map(resolve));
        let kubernetes = if kubeconfig.is_some() || k.in_cluster {
            if kubeconfig.is_some() && k.in_cluster {
                return Err(invalid(
                    "kubernetes.in_cluster",
                    "set either kubernetes.kubeconfig or kubernetes.in_cluster, not both".into(),
                ));
            }
            let identity = k.identity.clone().unwrap_or_else(hostname);
            if !is_label_value(&identity) {
                return Err(invalid(
                    "kubernetes.identity",
                    format!(
                        "{identity:?} is not a label value (letters, digits, - and _, at most 63, alphanumeric at both ends)"
                    ),
                ));
            }
            if !is_label_value(&k.namespace) {
                return Err(invalid(
                    "kubernetes.namespace",
                    format!("{:?} is not a namespace name", k.namespace),
                ));
            }
            Some(KubernetesConfig {
                kubeconfig,
                identity,
                namespace: k.namespace.clone(),
                wipe_on_release: k.release == file::Release::Wipe,
            })
        } else {
            None
        };
        let ipxe_dir = f.tftp.ipxe_dir.as_deref().map(resolve).or_else(|| {
            let debian = Path::new(DEBIAN_IPXE_DIR);
            debian.is_dir().then(|| debian.to_path_buf())
        });

        Ok(Config {
            http_listen,
            public_url: f
                .http
                .public_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string()),
            tftp_listen,
            tftp_root,
            ipxe_dir,
            tftp: TftpSettings {
                max_transfers: t.max_transfers,
                max_transfers_per_client: t.max_transfers_per_client,
                timeout: Duration::from_millis(t.timeout_ms),
                max_timeout: Duration::from_millis(t.max_timeout_ms),
                retries: t.retries,
                max_blksize: t.max_blksize as u16,
                max_windowsize: t.max_windowsize as u16,
            },
            cache: CacheLimits {
                file_bytes: t.cache_file_bytes,
                total_bytes: t.cache_total_bytes,
            },
            assets_dir,
            data_dir,
            plugins,
            registration_token,
            admin_token,
            policy: PolicyConfig {
                unaccepted: f.policy.unaccepted,
                default_environment: f.policy.default_environment.clone(),
                local_disk_method: f.policy.local_disk_method,
                local_disk_method_by_arch: f.policy.local_disk_method_by_arch.clone(),
            },
            windows,
            discovery_environment: discovery,
            wipe_environment,
            environments,
            templates,
            dhcp,
            kubernetes,
            bmc,
        })
    }

    fn validate_dhcp(
        d: &file::DhcpSection,
        o: &Overrides,
        invalid: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<DhcpConfig, ConfigError> {
        let mode = o.dhcp.unwrap_or(d.mode);
        let interfaces = if o.dhcp_interfaces.is_empty() {
            d.interfaces.clone()
        } else {
            o.dhcp_interfaces.clone()
        };
        for name in &interfaces {
            // IFNAMSIZ is 16 with the NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(invalid(
                    "dhcp.interfaces",
                    format!("{name:?} is not an interface name"),
                ));
            }
        }
        if mode == DhcpMode::Proxy && d.listen.is_empty() && d.pxe_listen.is_empty() {
            return Err(invalid(
                "dhcp.listen",
                "proxy mode needs at least one address in dhcp.listen or dhcp.pxe_listen".into(),
            ));
        }
        if !d.boot_script.starts_with('/') || d.boot_script.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(
                "dhcp.boot_script",
                format!(
                    "{:?} must be a path starting with / and hold no spaces",
                    d.boot_script
                ),
            ));
        }
        if d.ipxe_user_classes.iter().any(String::is_empty) {
            return Err(invalid(
                "dhcp.ipxe_user_classes",
                "an empty user class would match every client".into(),
            ));
        }
        let b = &d.boot_files;
        for (key, name) in [
            ("dhcp.boot_files.bios", &b.bios),
            ("dhcp.boot_files.uefi_i386", &b.uefi_i386),
            ("dhcp.boot_files.uefi_x86_64", &b.uefi_x86_64),
            ("dhcp.boot_files.uefi_arm64", &b.uefi_arm64),
        ] {
            if crate::files::sanitize(name).is_err() || name.len() > 120 {
                return Err(invalid(
                    key,
                    format!("{name:?} is not a file name inside the TFTP root"),
                ));
            }
        }
        Ok(DhcpConfig {
            mode,
            listen: d.listen.clone(),
            pxe_listen: d.pxe_listen.clone(),
            interfaces,
            server_address: d.server_address,
            ipxe_user_classes: d.ipxe_user_classes.clone(),
            boot_script: d.boot_script.clone(),
            boot_files: d.boot_files.clone(),
        })
    }
}

/// Checks a file against a pinned hex sha256, streaming it (assets can be hundreds of MB).
pub fn check_sha256(path: &Path, want: &str) -> Result<(), String> {
    let want = want.trim().to_ascii_lowercase();
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("sha256 {want:?} is not 64 hex digits"));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read;
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = hex::encode(h.finalize());
    if got != want {
        return Err(format!(
            "{} has sha256 {got}, expected {want}",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.http_listen, vec!["127.0.0.1:8080".parse().unwrap()]);
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
        let e = parse(&bad).unwrap_err().to_string();
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
    fn tokens() {
        let e = parse("[tokens]\nadmin = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokens.admin (line 2)"), "{e}");
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
