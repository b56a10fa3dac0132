//! The `appliance.toml` file as written by operators: one field per section, each
//! section's type defined beside the code it configures (`deny_unknown_fields`
//! everywhere, so a typo is an error that names the key).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::environments::{DiscoverySection, EnvironmentSection};
use super::tokens::TokensSection;
use crate::bmc::config::BmcSection;
use crate::controller::config::KubernetesSection;
use crate::core::config::{PolicySection, WindowsSection};
use crate::dhcp::config::DhcpSection;
use crate::http::config::HttpSection;
use crate::ipxe::config::TemplatesSection;
use crate::plugins::config::PluginsSection;
use crate::tftp::config::TftpSection;

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
    /// On SIGTERM, how long HTTP connections and TFTP transfers in flight may take to
    /// finish before they are cut, seconds (default 20; at most 600).
    pub drain_secs: Option<u64>,
    pub tokens: TokensSection,
    pub policy: PolicySection,
    pub windows: WindowsSection,
    pub audit: crate::audit::AuditSection,
    pub discovery: DiscoverySection,
    /// Boot environments by name.
    pub environments: BTreeMap<String, EnvironmentSection>,
    pub templates: TemplatesSection,
    pub plugins: PluginsSection,
    pub dhcp: DhcpSection,
    pub kubernetes: KubernetesSection,
    pub bmc: BmcSection,
}
