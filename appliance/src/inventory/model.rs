//! The inventory's records: a [`Server`] and what is kept about its boots.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::registration::Hardware;

/// Boots kept in a server's history.
pub const BOOT_HISTORY_LEN: usize = 20;

/// One bare-metal machine known to the appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Inventory id: the SMBIOS UUID, or `<uuid>-<mac>` when the UUID is shared.
    pub id: String,
    pub uuid: String,
    /// MAC addresses, normalised; with the UUID they identify the machine.
    pub macs: Vec<String>,
    pub hardware: Hardware,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub accepted: bool,
    #[serde(default)]
    pub cordoned: bool,
    /// Environment to boot once accepted.
    #[serde(default)]
    pub environment: Option<String>,
    /// BMC address (reported by the agent or set by the operator).
    #[serde(default)]
    pub bmc_address: Option<String>,
    /// Another machine reported the same UUID: identified by UUID and MACs together.
    #[serde(default)]
    pub uuid_conflict: bool,
    /// Whether a configuration blob is stored for `/configdata`.
    #[serde(default)]
    pub has_config: bool,
    /// Unix seconds.
    pub registered_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub boot_history: VecDeque<BootRecord>,
    /// The grant of the latest boot script, which `/configdata` checks.
    #[serde(default)]
    pub last_boot: Option<BootGrant>,
}

/// One boot decision as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    pub at: u64,
    pub action: String,
    #[serde(default)]
    pub environment: Option<String>,
    pub source: Option<IpAddr>,
}

/// What a machine was handed with its boot script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootGrant {
    /// One-time token placed on the kernel command line.
    pub token: String,
    /// Address the boot script was fetched from.
    pub source: Option<IpAddr>,
    pub issued_at: u64,
}

impl Server {
    /// Appends a boot to the bounded history.
    pub fn push_boot(&mut self, record: BootRecord) {
        self.boot_history.push_back(record);
        while self.boot_history.len() > BOOT_HISTORY_LEN {
            self.boot_history.pop_front();
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
