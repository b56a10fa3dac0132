//! The inventory's records: a [`Server`] and what is kept about its boots.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::bmc::{BmcSettings, BootSetting, PowerState};
use crate::registration::Hardware;

/// Boots kept in a server's history.
pub const BOOT_HISTORY_LEN: usize = 20;
/// Power actions kept in a server's history.
pub const POWER_HISTORY_LEN: usize = 20;

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
    /// How to power the machine: its BMC, as the operator configured it (the password
    /// is sealed in a table of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<BmcSettings>,
    /// What the appliance knows and did about the machine's power.
    #[serde(default)]
    pub power: PowerRecord,
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
    /// The server's part in a cluster: claimed, installed, released, wiped.
    #[serde(default)]
    pub provisioning: Provisioning,
}

/// Where a server stands in a cluster's life. Free: no claim and not dirty. Claimed: a
/// Cluster API machine holds it and its configuration is staged for `/configdata`.
/// Released: the claim is gone and, until the wipe environment reports, it is dirty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Provisioning {
    #[serde(default)]
    pub claim: Option<Claim>,
    /// Used since its last wipe: never given to another machine until wiped.
    #[serde(default)]
    pub dirty: bool,
    /// Released with a wipe asked for (unix seconds): the next boot runs the wipe
    /// environment.
    #[serde(default)]
    pub wipe_requested_at: Option<u64>,
}

impl Provisioning {
    /// Free to be claimed by a new machine.
    pub fn is_free(&self) -> bool {
        self.claim.is_none() && !self.dirty
    }
}

/// The Cluster API machine holding a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// `namespace/name` of the MetalMachine.
    pub machine: String,
    /// Its uid: a machine deleted and made again under the same name is another claim.
    pub uid: String,
    #[serde(default)]
    pub cluster: Option<String>,
    pub claimed_at: u64,
    /// When the machine was sent into its install environment (next boot PXE, power
    /// cycled): done once per claim, even across restarts.
    #[serde(default)]
    pub powered_at: Option<u64>,
    /// When the install environment first fetched the configuration.
    #[serde(default)]
    pub config_served_at: Option<u64>,
    /// When the installation was known to be done…
    #[serde(default)]
    pub installed_at: Option<u64>,
    /// …and how: `reported` (the install environment said so) or `rebooted` (it booted
    /// again after fetching its configuration, as Talos does once installed).
    #[serde(default)]
    pub installed_by: Option<String>,
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

/// The power side of a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PowerRecord {
    /// Power state as last read from the BMC.
    #[serde(default)]
    pub state: Option<PowerState>,
    /// Unix seconds of that reading.
    #[serde(default)]
    pub checked_at: Option<u64>,
    /// The driver that served the last operation.
    #[serde(default)]
    pub driver: Option<String>,
    /// The next boot asked for, re-sent before every power-on.
    #[serde(default)]
    pub next_boot: Option<BootSetting>,
    /// The latest operations, oldest first.
    #[serde(default)]
    pub history: VecDeque<PowerEvent>,
}

/// One power operation as it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerEvent {
    pub at: u64,
    /// `power on`, `bootdev pxe`, `status`, …
    pub operation: String,
    pub ok: bool,
    /// Why it failed: a stable kind (`credentials`, `timeout`, `not_settled`, …)…
    #[serde(default)]
    pub reason: Option<String>,
    /// …and the words.
    #[serde(default)]
    pub message: Option<String>,
    pub attempts: u32,
    pub took_ms: u64,
    #[serde(default)]
    pub driver: Option<String>,
}

impl PowerRecord {
    /// Appends an operation to the bounded history.
    pub fn push(&mut self, event: PowerEvent) {
        self.history.push_back(event);
        while self.history.len() > POWER_HISTORY_LEN {
            self.history.pop_front();
        }
    }
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
