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
    /// The MetalMachine claim (its uid) whose `spec.bmc` this is: lent for that claim
    /// only, and forgotten when it is released. `None`: the server's own (the Server's
    /// `spec.bmc` or the admin API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc_lent_to: Option<String>,
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
    /// The latest provisioning window: when the appliance expected this machine to boot,
    /// and who claimed it (its secrets are kept apart, hashed, in the inventory).
    #[serde(default)]
    pub window: Option<Window>,
    /// A window tripped or a secret replayed: no secrets for this server until an
    /// operator arms it again.
    #[serde(default)]
    pub alarm: Option<Alarm>,
    /// Kubernetes mode: the last `spec.arm` value acted on (a new one opens a window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_key: Option<String>,
    /// Registrations refused for this server, latest last (bounded).
    #[serde(default)]
    pub refusals: VecDeque<Refusal>,
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
    /// …and how.
    #[serde(default)]
    pub installed_by: Option<InstalledBy>,
    /// The machine's Cluster is paused (as `clusterctl move` does before copying it to
    /// another management cluster and deleting it here): the sweep never releases a
    /// paused claim, whose machine may be gone from this cluster only.
    #[serde(default)]
    pub paused: bool,
    /// The uid of the Server object the claim was last taken through: one management
    /// cluster's copy. After `clusterctl move` the new cluster's copy takes the claim
    /// back; the old cluster's sweep, which sees only its own copy, then leaves it alone.
    #[serde(default)]
    pub server_object: Option<String>,
}

impl Claim {
    /// Whether `other` names the same machine: its `namespace/name` and its claim uid
    /// (which survives `clusterctl move`).
    pub fn same_holder(&self, machine: &str, uid: &str) -> bool {
        self.machine == machine && self.uid == uid
    }
}

/// How the appliance learnt that a claimed machine's installation is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstalledBy {
    /// The install environment said so (`POST /configdata/done` with its token).
    Reported,
    /// It booted again after fetching its configuration, as Talos does once installed.
    Rebooted,
}

impl InstalledBy {
    /// The serde name, for metric labels and log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            InstalledBy::Reported => "reported",
            InstalledBy::Rebooted => "rebooted",
        }
    }
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

/// One entry of the audit log: who did what to what, from where, when, and how it
/// ended. Append-only; `seq` is given when it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuditEntry {
    #[serde(default)]
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `admin` (the admin token), `kubernetes <user> (console)`, `kubernetes
    /// manager=<field manager>` (a change to a Server, e.g. `kubernetes
    /// manager=kubectl-patch`), `machine <uuid>`, `appliance`, or `unknown` for a
    /// credential that proved nothing.
    pub who: String,
    /// The address the request came from, when there was one.
    #[serde(default)]
    pub from: Option<String>,
    /// What was done or asked: `admin POST /api/v1/servers/x/accept`,
    /// `config_served`, `registration_refused`, …
    pub action: String,
    /// The server it was about.
    #[serde(default)]
    pub server: Option<String>,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    #[serde(default)]
    pub detail: Option<String>,
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
    /// Why it failed…
    #[serde(default)]
    pub reason: Option<crate::bmc::PowerFailure>,
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

/// Refusals kept on a server.
pub const REFUSALS_LEN: usize = 10;
/// Uses of a window's secret kept on the window.
pub const SECRET_USES_LEN: usize = 10;

/// A provisioning window: a span in which the appliance expects this server to boot,
/// because it powered the machine on through its BMC or an operator armed it. Its first
/// matching requester is the claimant, the only one ever handed the boot's secret; any
/// other requester trips it. It closes when the secret is used, at `expires_at`, or when
/// it trips.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Random, for logs and to tie a secret to its window.
    pub id: String,
    pub opened_at: u64,
    pub expires_at: u64,
    /// `power on`, `power cycle`, `armed by the admin API`, `armed by spec.arm`, …
    pub opened_by: String,
    /// The first matching `/boot.ipxe` requester.
    #[serde(default)]
    pub claimant: Option<Requester>,
    /// What was handed to the claimant (never the secret itself), and when.
    #[serde(default)]
    pub issued: Option<SecretKind>,
    #[serde(default)]
    pub issued_at: Option<u64>,
    /// Each use of the secret, oldest first (bounded).
    #[serde(default)]
    pub uses: Vec<SecretUse>,
    #[serde(default)]
    pub closed: Option<WindowClose>,
}

impl Window {
    /// Still open at `now`: not closed and not past its deadline.
    pub fn is_open(&self, now: u64) -> bool {
        self.closed.is_none() && now < self.expires_at
    }

    /// `open`, `claimed`, `used`, `expired`, `tripped`, `disarmed`, `replaced` or
    /// `power-failed`.
    pub fn state(&self, now: u64) -> &'static str {
        match &self.closed {
            Some(c) => c.why.name(),
            None if now >= self.expires_at => "expired",
            None if self.claimant.is_some() => "claimed",
            None => "open",
        }
    }

    /// The first use of the secret for `what`.
    pub fn first_use(&self, what: &str) -> Option<&SecretUse> {
        self.uses.iter().find(|u| u.what == what)
    }

    /// Records a use of the secret.
    pub fn push_use(&mut self, use_: SecretUse) {
        self.uses.push(use_);
        if self.uses.len() > SECRET_USES_LEN {
            self.uses.remove(0);
        }
    }
}

/// How a window ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowClose {
    pub at: u64,
    pub why: CloseReason,
}

/// Why a window closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloseReason {
    /// Its secret was used (configuration fetched, registration made).
    Used,
    /// A second requester, or a replayed secret: see the server's alarm.
    Tripped,
    /// An operator closed it.
    Disarmed,
    /// A newer window took its place.
    Replaced,
    /// The power-on that opened it failed.
    PowerFailed,
}

impl CloseReason {
    /// The reason's name in the API, in metrics and in Kubernetes.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Used => "used",
            CloseReason::Tripped => "tripped",
            CloseReason::Disarmed => "disarmed",
            CloseReason::Replaced => "replaced",
            CloseReason::PowerFailed => "power-failed",
        }
    }
}

/// Who asked for a server's boot: what its firmware said and where it asked from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub source: IpAddr,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    pub at: u64,
}

impl Requester {
    /// The same machine as `other`, as far as the network shows: same address, same MAC.
    pub fn same_as(&self, other: &Requester) -> bool {
        self.source == other.source && self.mac == other.mac
    }
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (mac {}, uuid {})",
            self.source,
            self.mac.as_deref().unwrap_or("none"),
            self.uuid.as_deref().unwrap_or("none")
        )
    }
}

/// The kinds of secret a boot can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// The token `/configdata` and `/configdata/done` need (an environment boot).
    ConfigToken,
    /// The registration secret of a discover boot: may change this server's record.
    DiscoverSecret,
    /// The registration secret of a wipe boot: its report marks the server clean.
    WipeSecret,
}

impl SecretKind {
    /// The kind's name in the API and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            SecretKind::ConfigToken => "config-token",
            SecretKind::DiscoverSecret => "discover-secret",
            SecretKind::WipeSecret => "wipe-secret",
        }
    }
}

/// One use of a window's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretUse {
    pub at: u64,
    pub source: IpAddr,
    /// `configdata`, `done`, `registration` or `wipe-report`.
    pub what: String,
}

/// What tripped a server's window; stands until an operator arms the server again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    pub at: u64,
    pub kind: AlarmKind,
    /// The window it happened in.
    pub window: String,
    /// The claimant, when there was one.
    #[serde(default)]
    pub first: Option<Requester>,
    /// The requester that tripped it.
    pub second: Requester,
    pub message: String,
}

/// Kinds of alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// A second machine asked for the server's boot in its window.
    SecondRequester,
    /// A secret of the window was presented from another address than its user's.
    SecretReplayed,
}

impl AlarmKind {
    /// The kind's name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::SecondRequester => "second_requester",
            AlarmKind::SecretReplayed => "secret_replayed",
        }
    }

    /// The kind as a Kubernetes reason.
    pub fn reason(self) -> &'static str {
        match self {
            AlarmKind::SecondRequester => "SecondRequester",
            AlarmKind::SecretReplayed => "SecretReplayed",
        }
    }
}

/// A registration refused for a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub at: u64,
    pub source: IpAddr,
    pub reason: String,
}

/// A window's secret as the inventory keeps it (apart from the server record, which
/// the admin API shows): its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The window the secret belongs to.
    pub window: String,
    pub kind: SecretKind,
    /// Hex sha256 of the secret.
    pub sha256: String,
    /// Where the claimant asked from.
    pub source: IpAddr,
}

impl Server {
    /// Where the server stands in a cluster's life (`kubectl get servers`, the console):
    /// `Alarm`, `Installed`, `Installing`, `Claimed`, `Wiping`, `Dirty` or `Available`.
    pub fn phase(&self) -> &'static str {
        let p = &self.provisioning;
        if self.alarm.is_some() {
            return "Alarm";
        }
        match &p.claim {
            Some(c) if c.installed_at.is_some() => "Installed",
            Some(c) if c.powered_at.is_some() || c.config_served_at.is_some() => "Installing",
            Some(_) => "Claimed",
            None if p.wipe_requested_at.is_some() => "Wiping",
            None if p.dirty => "Dirty",
            None => "Available",
        }
    }

    /// Records a refused registration in the bounded list.
    pub fn push_refusal(&mut self, refusal: Refusal) {
        self.refusals.push_back(refusal);
        while self.refusals.len() > REFUSALS_LEN {
            self.refusals.pop_front();
        }
    }

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

/// Milliseconds since the Unix epoch (the timeline's and the audit log's clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
