//! Each machine's boots as the appliance witnessed them: every step (proxyDHCP answer,
//! TFTP transfer, boot script, file fetch, registration, configuration served, done
//! report, power operation) with its time, grouped into boots, by MAC.
//!
//! Kept in memory and bounded (machines, boots per machine, steps per boot): it answers
//! "where is this boot now, where did it stop, and how long did each step take". A
//! snapshot goes to `DATA/timeline.json` when it changed (at most every
//! [`SNAPSHOT_EVERY`]) and at the stop, and is read back at the start, so a restart
//! keeps the machines' recent boots. TFTP and file fetches know a client only
//! by its address, so their steps wait under that address until a step that knows both
//! (a proxyDHCP request on the PXE port, a boot script asked for with its MAC) ties the
//! address to a machine; a machine that never gets that far still shows, by address.
//!
//! A boot starts with the firmware's proxyDHCP answer (iPXE's own DHCP continues it), a
//! power operation that starts the machine, or any step after [`BOOT_IDLE`] of quiet.
//!
//! No crate keeps such a thing: it is a map of small ring buffers behind one mutex,
//! touched a handful of times per boot and never per packet.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::inventory::now_ms;

/// Quiet this long ends a boot: the next step starts another.
pub const BOOT_IDLE: Duration = Duration::from_secs(10 * 60);
/// Boots kept per machine.
pub const BOOTS_PER_MACHINE: usize = 8;
/// Steps kept per boot; later ones are counted in `dropped`.
pub const STEPS_PER_BOOT: usize = 64;
/// Machines (and unbound addresses) remembered; the longest quiet is forgotten first.
pub const MAX_MACHINES: usize = 16_384;
/// How often a changed timeline is written to disk.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

/// One thing the appliance did for, or saw of, a machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// proxyDHCP answered: which client (`pxe`, `ipxe`, `http`), which firmware, and the
    /// boot file it was told.
    Dhcp {
        client: String,
        firmware: String,
        boot_file: String,
    },
    /// A TFTP read, finished or not.
    Tftp {
        file: String,
        blksize: u16,
        window: u16,
        bytes: u64,
        retransmits: u64,
        millis: u64,
        outcome: String,
    },
    /// `/boot.ipxe` answered: the action and the policy (plugin) that chose it.
    BootScript { action: String, by: String },
    /// A file over HTTP (`/env/…`, `/assets/…`): status, bytes sent, time to the last byte.
    Fetch {
        path: String,
        status: u16,
        bytes: u64,
        millis: u64,
    },
    /// The agent registered (or re-registered) the machine.
    Registered { uuid: String },
    /// Its configuration was handed out, to the address that asked.
    ConfigServed { to: String },
    /// The install environment reported it was done.
    Done,
    /// A BMC operation on the machine.
    Power { operation: String, ok: bool },
}

impl Step {
    /// Its kind, as the API names it (`dhcp`, `tftp`, `boot_script`, `fetch`,
    /// `registered`, `config_served`, `done`, `power`).
    pub fn name(&self) -> &'static str {
        match self {
            Step::Dhcp { .. } => "dhcp",
            Step::Tftp { .. } => "tftp",
            Step::BootScript { .. } => "boot_script",
            Step::Fetch { .. } => "fetch",
            Step::Registered { .. } => "registered",
            Step::ConfigServed { .. } => "config_served",
            Step::Done => "done",
            Step::Power { .. } => "power",
        }
    }

    /// Its kind and what it was about, in a few words (a Server's `lastBoot`).
    pub fn summary(&self) -> String {
        let about = match self {
            Step::Dhcp { client, .. } => client.clone(),
            Step::Tftp { file, outcome, .. } => format!("{file} {outcome}"),
            Step::BootScript { action, by } => format!("{action} by {by}"),
            Step::Fetch { path, status, .. } => format!("{path} {status}"),
            Step::Power { operation, ok } => {
                format!("{operation}{}", if *ok { "" } else { " failed" })
            }
            Step::Registered { .. } | Step::ConfigServed { .. } | Step::Done => {
                return self.name().into();
            }
        };
        format!("{} {about}", self.name())
    }

    /// What happened, in words with its figures (the console).
    pub fn describe(&self) -> String {
        match self {
            Step::Dhcp {
                client, boot_file, ..
            } => format!("proxyDHCP → {client}: {boot_file}"),
            Step::Tftp {
                file,
                bytes,
                millis,
                outcome,
                blksize,
                window,
                retransmits,
            } => format!(
                "TFTP {file}: {outcome}, {bytes} B in {millis} ms (blksize {blksize}, window {window}, {retransmits} retransmits)"
            ),
            Step::BootScript { action, by } => format!("/boot.ipxe: {action} (by {by})"),
            Step::Fetch {
                path,
                status,
                bytes,
                millis,
            } => format!("GET {path}: {status}, {bytes} B in {millis} ms"),
            Step::Registered { uuid } => format!("registered as {uuid}"),
            Step::ConfigServed { to } => format!("configuration served to {to}"),
            Step::Done => "install reported done".into(),
            Step::Power { operation, ok } => {
                format!("BMC {operation}{}", if *ok { "" } else { " (failed)" })
            }
        }
    }

    /// Whether this step begins a boot of its own.
    fn starts_boot(&self) -> bool {
        match self {
            // The firmware's request; iPXE's own DHCP is part of the boot it started.
            Step::Dhcp { client, .. } => client != "ipxe",
            Step::Power { operation, ok } => {
                *ok && matches!(
                    operation.as_str(),
                    "power on" | "power cycle" | "power reset"
                )
            }
            _ => false,
        }
    }
}

/// A step with its time (milliseconds since the Unix epoch) and the gap since the step
/// before it in the same boot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Witnessed {
    pub at_ms: u64,
    pub gap_ms: u64,
    #[serde(flatten)]
    pub step: Step,
}

/// One boot: its steps in time order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    pub started_ms: u64,
    pub last_ms: u64,
    pub steps: Vec<Witnessed>,
    /// Steps past [`STEPS_PER_BOOT`], not kept.
    pub dropped: u32,
}

impl Boot {
    fn new(at_ms: u64) -> Boot {
        Boot {
            started_ms: at_ms,
            last_ms: at_ms,
            ..Boot::default()
        }
    }

    fn add(&mut self, at_ms: u64, step: Step) {
        if self.steps.len() >= STEPS_PER_BOOT {
            self.dropped = self.dropped.saturating_add(1);
            self.last_ms = self.last_ms.max(at_ms);
            return;
        }
        // Steps folded in from an address may be older than the last one: keep order.
        let pos = self.steps.partition_point(|s| s.at_ms <= at_ms);
        self.steps.insert(
            pos,
            Witnessed {
                at_ms,
                gap_ms: 0,
                step,
            },
        );
        let mut prev = self.started_ms.min(at_ms);
        self.started_ms = prev;
        for s in &mut self.steps {
            s.gap_ms = s.at_ms.saturating_sub(prev);
            prev = s.at_ms;
        }
        self.last_ms = self.last_ms.max(at_ms);
    }

    /// Whether this boot already went past proxyDHCP (a firmware request then starts a
    /// new one; before that, it is the same firmware asking again).
    fn went_past_dhcp(&self) -> bool {
        self.steps
            .iter()
            .any(|s| !matches!(s.step, Step::Dhcp { .. } | Step::Power { .. }))
    }

    /// Milliseconds from its start to its last step.
    pub fn duration_ms(&self) -> u64 {
        self.last_ms.saturating_sub(self.started_ms)
    }

    /// Its last step, if any.
    pub fn last_step(&self) -> Option<&Witnessed> {
        self.steps.last()
    }
}

/// What is known of one machine (or of an address not yet tied to one).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Its MAC, or `None` while only its address is known.
    pub mac: Option<String>,
    pub uuid: Option<String>,
    pub address: Option<IpAddr>,
    pub boots: VecDeque<Boot>,
}

impl Machine {
    fn last_ms(&self) -> u64 {
        self.boots.back().map_or(0, |b| b.last_ms)
    }

    fn witness(&mut self, at_ms: u64, step: Step) {
        let current = self.boots.back();
        let idle =
            current.is_none_or(|b| at_ms.saturating_sub(b.last_ms) >= BOOT_IDLE.as_millis() as u64);
        let fresh = match &step {
            Step::Dhcp { .. } if step.starts_boot() => current.is_none_or(Boot::went_past_dhcp),
            _ => step.starts_boot(),
        };
        if idle || fresh {
            if self.boots.len() >= BOOTS_PER_MACHINE {
                self.boots.pop_front();
            }
            self.boots.push_back(Boot::new(at_ms));
        }
        if let Some(b) = self.boots.back_mut() {
            b.add(at_ms, step);
        }
    }

    /// Steps of another record (an address's), each into the boot it happened in.
    fn fold(&mut self, other: Machine) {
        for boot in other.boots {
            for s in boot.steps {
                let into = self
                    .boots
                    .iter_mut()
                    .rev()
                    .find(|b| b.started_ms <= s.at_ms);
                match into {
                    Some(b) => b.add(s.at_ms, s.step),
                    None => self.witness(s.at_ms, s.step),
                }
            }
        }
    }
}

/// Where a step goes.
#[derive(Clone, Debug)]
pub enum Who<'a> {
    Mac(&'a str),
    Address(IpAddr),
    /// A registered machine by its UUID (its MACs when the timeline has not met it).
    Uuid(&'a str, &'a [String]),
}

#[derive(Default)]
struct State {
    /// By MAC, or by `ip:<address>` for an address not tied to a MAC yet.
    machines: HashMap<String, Machine>,
    mac_of_address: HashMap<IpAddr, String>,
    mac_of_uuid: HashMap<String, String>,
}

/// The timeline of every machine; cheap to share (`Arc`).
#[derive(Default)]
pub struct Timeline {
    state: Mutex<State>,
    /// Bumped by every change; the snapshot writer compares it with what it wrote.
    changes: AtomicU64,
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timeline")
    }
}

fn address_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

impl State {
    fn entry(&mut self, key: String) -> &mut Machine {
        if !self.machines.contains_key(&key) && self.machines.len() >= MAX_MACHINES {
            // The machine quiet the longest goes (a rack is hundreds of machines; a flood
            // of forged MACs must not grow this).
            if let Some(oldest) = self
                .machines
                .iter()
                .min_by_key(|(_, m)| m.last_ms())
                .map(|(k, _)| k.clone())
            {
                self.machines.remove(&oldest);
            }
        }
        self.machines.entry(key).or_default()
    }

    /// Ties `ip` to `mac`, moving what the address saw into the machine's boots.
    fn bind(&mut self, ip: IpAddr, mac: &str) {
        if self.mac_of_address.get(&ip).is_some_and(|m| m == mac) {
            return;
        }
        if self.mac_of_address.len() >= MAX_MACHINES {
            self.mac_of_address.clear();
        }
        self.mac_of_address.insert(ip, mac.to_string());
        let pending = self.machines.remove(&address_key(ip));
        let machine = self.entry(mac.to_string());
        machine.mac = Some(mac.to_string());
        machine.address = Some(ip);
        if let Some(p) = pending {
            machine.fold(p);
        }
    }

    fn key_of(&self, who: &Who<'_>) -> String {
        match who {
            Who::Mac(mac) => (*mac).to_string(),
            Who::Address(ip) => self
                .mac_of_address
                .get(ip)
                .cloned()
                .unwrap_or_else(|| address_key(*ip)),
            Who::Uuid(uuid, macs) => self
                .mac_of_uuid
                .get(*uuid)
                .cloned()
                // The MAC that booted most recently, else the first.
                .or_else(|| {
                    macs.iter()
                        .filter_map(|m| self.machines.get(m).map(|r| (r.last_ms(), m)))
                        .max()
                        .map(|(_, m)| m.clone())
                })
                .or_else(|| macs.first().cloned())
                .unwrap_or_else(|| format!("uuid:{uuid}")),
        }
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state for a change, counted for the snapshot writer while the lock is held:
    /// a snapshot that reads the count under the lock holds every change it counts.
    fn change(&self) -> std::sync::MutexGuard<'_, State> {
        let guard = self.lock();
        self.changes.fetch_add(1, Ordering::Relaxed);
        guard
    }

    /// Records `step` for `who`, now.
    pub fn witness(&self, who: Who<'_>, step: Step) {
        self.witness_at(who, now_ms(), step);
    }

    /// Records `step` for `who` at `at_ms` (for steps timed at their start).
    pub fn witness_at(&self, who: Who<'_>, at_ms: u64, step: Step) {
        let mut s = self.change();
        let key = s.key_of(&who);
        if let Who::Uuid(u, _) = &who
            && !key.starts_with("uuid:")
            && (s.mac_of_uuid.len() < MAX_MACHINES || s.mac_of_uuid.contains_key(*u))
        {
            s.mac_of_uuid.insert((*u).to_string(), key.clone());
        }
        let by_mac = !key.starts_with("ip:") && !key.starts_with("uuid:");
        let m = s.entry(key.clone());
        if by_mac && m.mac.is_none() {
            m.mac = Some(key);
        }
        match &who {
            Who::Mac(mac) => m.mac = Some((*mac).to_string()),
            Who::Address(ip) => m.address = m.address.or(Some(*ip)),
            Who::Uuid(u, _) => m.uuid = Some((*u).to_string()),
        }
        m.witness(at_ms, step);
    }

    /// Ties `ip` to `mac` (and `uuid`, when known): later steps seen by address go to
    /// the machine, and those already seen move into its boots.
    pub fn bind(&self, ip: IpAddr, mac: &str, uuid: Option<&str>) {
        let mut s = self.change();
        s.bind(ip, mac);
        if let Some(u) = uuid {
            if s.mac_of_uuid.len() < MAX_MACHINES || s.mac_of_uuid.contains_key(u) {
                s.mac_of_uuid.insert(u.to_string(), mac.to_string());
            }
            s.entry(mac.to_string()).uuid = Some(u.to_string());
        }
    }

    /// The latest boot of the machine with any of `macs` (a server's).
    pub fn last_boot(&self, macs: &[String]) -> Option<Boot> {
        let s = self.lock();
        macs.iter()
            .filter_map(|m| s.machines.get(m)?.boots.back())
            .max_by_key(|b| b.started_ms)
            .cloned()
    }

    /// The boots of the machine with any of `macs` (a server's), oldest first.
    pub fn boots_of(&self, macs: &[String]) -> Vec<Boot> {
        let s = self.lock();
        let mut boots: Vec<Boot> = macs
            .iter()
            .filter_map(|m| s.machines.get(m))
            .flat_map(|m| m.boots.iter().cloned())
            .collect();
        boots.sort_by_key(|b| b.started_ms);
        boots
    }

    /// One machine's record by MAC (or `ip:<address>`).
    pub fn machine(&self, key: &str) -> Option<Machine> {
        self.lock().machines.get(key).cloned()
    }

    /// Every machine seen, the most recently active first, at most `limit`.
    pub fn recent(&self, limit: usize) -> Vec<Machine> {
        let s = self.lock();
        let mut all: Vec<&Machine> = s.machines.values().collect();
        all.sort_by_key(|m| std::cmp::Reverse(m.last_ms()));
        all.into_iter().take(limit).cloned().collect()
    }

    /// The time from the start of the current boot of any of `macs` to now, while that
    /// boot has not registered yet: once per boot (the boot-to-registration figure; a
    /// retried registration is not counted again).
    pub fn since_boot_start(&self, macs: &[String]) -> Option<Duration> {
        let now = now_ms();
        let s = self.lock();
        macs.iter()
            .filter_map(|m| s.machines.get(m)?.boots.back())
            .filter(|b| now.saturating_sub(b.last_ms) < BOOT_IDLE.as_millis() as u64)
            .filter(|b| {
                !b.steps
                    .iter()
                    .any(|w| matches!(w.step, Step::Registered { .. }))
            })
            .map(|b| Duration::from_millis(now.saturating_sub(b.started_ms)))
            .max()
    }

    /// Reads the snapshot at `path` back (machines and the ties of their addresses and
    /// UUIDs), returning how many machines it held; a missing file is an empty timeline,
    /// and one that cannot be read is moved aside to `timeline.json.bad`. Called before
    /// anything is witnessed: what it reads replaces what is there.
    pub fn load(&self, path: &Path) -> Result<usize, SnapshotError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SnapshotError::Io(path.to_path_buf(), e)),
        };
        let machines: Vec<Machine> = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                // Kept aside for a look, not overwritten by the next snapshot.
                let _ = std::fs::rename(path, path.with_extension("json.bad"));
                return Err(SnapshotError::Format(path.to_path_buf(), e));
            }
        };
        let mut s = self.lock();
        let mut n = 0;
        for m in machines.into_iter().take(MAX_MACHINES) {
            let key = match (&m.mac, m.address, &m.uuid) {
                (Some(mac), _, _) => mac.clone(),
                (None, Some(ip), _) => address_key(ip),
                (None, None, Some(uuid)) => format!("uuid:{uuid}"),
                (None, None, None) => continue,
            };
            n += 1;
            if let (Some(mac), Some(ip)) = (&m.mac, m.address) {
                s.mac_of_address.insert(ip, mac.clone());
            }
            if let (Some(mac), Some(uuid)) = (&m.mac, &m.uuid) {
                s.mac_of_uuid.insert(uuid.clone(), mac.clone());
            }
            s.machines.insert(key, m);
        }
        Ok(n)
    }

    /// Writes every machine to `path` (a temporary file, owner-only since it names
    /// machines and their addresses, synced, then renamed: a crash leaves the old snapshot
    /// or the new one). Returns the machines written and the change count they hold.
    pub fn save(&self, path: &Path) -> Result<(usize, u64), SnapshotError> {
        let (machines, changes) = {
            let s = self.lock();
            let machines: Vec<Machine> = s.machines.values().cloned().collect();
            (machines, self.changes.load(Ordering::Relaxed))
        };
        let io = |e| SnapshotError::Io(path.to_path_buf(), e);
        let bytes = serde_json::to_vec(&machines)
            .map_err(|e| SnapshotError::Format(path.to_path_buf(), e))?;
        crate::sealing::write_private(path, &bytes).map_err(io)?;
        Ok((machines.len(), changes))
    }

    /// Writes a snapshot to `path` whenever the timeline changed, at most every
    /// [`SNAPSHOT_EVERY`], and a last one when `cancel` fires.
    pub async fn keep_snapshot(
        self: std::sync::Arc<Self>,
        path: PathBuf,
        cancel: CancellationToken,
    ) {
        let mut written = self.changes.load(Ordering::Relaxed);
        loop {
            let stop = tokio::select! {
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(SNAPSHOT_EVERY) => false,
            };
            let now = self.changes.load(Ordering::Relaxed);
            if now != written {
                let (me, p) = (std::sync::Arc::clone(&self), path.clone());
                match tokio::task::spawn_blocking(move || me.save(&p)).await {
                    Ok(Ok((n, held))) => {
                        written = held;
                        tracing::debug!(machines = n, path = %path.display(), "boot timeline saved");
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot save the boot timeline; trying again later")
                    }
                    Err(e) => tracing::error!(error = %e, "the boot timeline writer failed"),
                }
            }
            if stop {
                return;
            }
        }
    }
}

/// Why a timeline snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a boot timeline: {1}")]
    Format(PathBuf, #[source] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "52:54:00:00:00:01";

    fn dhcp(client: &str) -> Step {
        Step::Dhcp {
            client: client.into(),
            firmware: "bios".into(),
            boot_file: "undionly.kpxe".into(),
        }
    }

    fn tftp(file: &str) -> Step {
        Step::Tftp {
            file: file.into(),
            blksize: 1456,
            window: 8,
            bytes: 70_000,
            retransmits: 0,
            millis: 12,
            outcome: "complete".into(),
        }
    }

    fn names(b: &Boot) -> Vec<String> {
        b.steps
            .iter()
            .map(|s| {
                serde_json::to_value(s).unwrap()["step"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn a_network_boot_reads_as_one_boot_in_order_with_its_gaps() {
        let t = Timeline::new();
        let ip: IpAddr = "10.0.0.50".parse().unwrap();
        t.witness_at(Who::Mac(MAC), 1_000, dhcp("pxe"));
        t.witness_at(Who::Mac(MAC), 1_010, dhcp("pxe"));
        // The ROM's TFTP read comes by address only.
        t.witness_at(Who::Address(ip), 1_200, tftp("undionly.kpxe"));
        t.witness_at(Who::Mac(MAC), 1_500, dhcp("ipxe"));
        // iPXE asks for its script with its MAC: the address is the machine's.
        t.bind(ip, MAC, Some("uuid-1"));
        let script = Step::BootScript {
            action: "discover".into(),
            by: "default".into(),
        };
        t.witness_at(Who::Mac(MAC), 1_600, script);
        t.witness_at(
            Who::Address(ip),
            2_600,
            Step::Fetch {
                path: "/env/discovery/vmlinuz".into(),
                status: 200,
                bytes: 9,
                millis: 400,
            },
        );
        t.witness_at(
            Who::Uuid("uuid-1", &[]),
            9_000,
            Step::Registered {
                uuid: "uuid-1".into(),
            },
        );
        let boots = t.boots_of(&[MAC.to_string()]);
        assert_eq!(boots.len(), 1, "{boots:#?}");
        let b = &boots[0];
        assert_eq!(
            names(b),
            [
                "dhcp",
                "dhcp",
                "tftp",
                "dhcp",
                "boot_script",
                "fetch",
                "registered"
            ]
        );
        let gaps: Vec<u64> = b.steps.iter().map(|s| s.gap_ms).collect();
        assert_eq!(gaps, [0, 10, 190, 300, 100, 1000, 6400]);
        assert_eq!(b.duration_ms(), 8_000);
        assert!(
            t.machine("ip:10.0.0.50").is_none(),
            "the address was folded in"
        );
        assert_eq!(t.machine(MAC).unwrap().uuid.as_deref(), Some("uuid-1"));
    }

    #[test]
    fn the_firmware_asking_again_after_its_boot_went_on_starts_a_new_boot() {
        let t = Timeline::new();
        t.witness_at(Who::Mac(MAC), 0, dhcp("pxe"));
        t.witness_at(
            Who::Mac(MAC),
            100,
            Step::BootScript {
                action: "install".into(),
                by: "default".into(),
            },
        );
        t.witness_at(Who::Mac(MAC), 60_000, dhcp("pxe"));
        // A power cycle starts one; a failed one does not.
        t.witness_at(
            Who::Mac(MAC),
            70_000,
            Step::Power {
                operation: "power cycle".into(),
                ok: false,
            },
        );
        t.witness_at(
            Who::Mac(MAC),
            80_000,
            Step::Power {
                operation: "power cycle".into(),
                ok: true,
            },
        );
        // Quiet past BOOT_IDLE: the next step is another boot.
        let later = 80_000 + BOOT_IDLE.as_millis() as u64;
        t.witness_at(Who::Mac(MAC), later, Step::Done);
        let boots = t.boots_of(&[MAC.to_string()]);
        assert_eq!(boots.len(), 4, "{boots:#?}");
        assert_eq!(names(&boots[1]), ["dhcp", "power"]);
    }

    #[test]
    fn boot_to_registration_is_measured_once_per_boot() {
        let t = Timeline::new();
        let macs = [MAC.to_string()];
        t.witness(Who::Mac(MAC), dhcp("pxe"));
        assert!(t.since_boot_start(&macs).is_some(), "a boot under way");
        let registered = Step::Registered { uuid: "u".into() };
        t.witness(Who::Uuid("u", &macs), registered);
        assert!(
            t.since_boot_start(&macs).is_none(),
            "a retried registration"
        );
        assert_eq!(t.last_boot(&macs).map(|b| b.steps.len()), Some(2));
    }

    #[test]
    fn a_snapshot_brings_boots_and_ties_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timeline.json");
        let t = Timeline::new();
        assert_eq!(t.load(&path).unwrap(), 0, "no snapshot yet");
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        t.witness_at(Who::Mac(MAC), 1_000, dhcp("pxe"));
        t.bind(ip, MAC, Some("uuid-9"));
        t.witness_at(Who::Address("10.0.0.10".parse().unwrap()), 1_100, tftp("x"));
        // Known by UUID only (a BMC operation before any boot): kept too.
        t.witness_at(Who::Uuid("uuid-only", &[]), 1_200, Step::Done);
        assert_eq!(t.save(&path).unwrap().0, 3);
        let back = Timeline::new();
        assert_eq!(back.load(&path).unwrap(), 3);
        assert!(back.machine("uuid:uuid-only").is_some());
        assert_eq!(
            back.boots_of(&[MAC.to_string()]),
            t.boots_of(&[MAC.to_string()])
        );
        // The address and the UUID still lead to the machine.
        back.witness_at(Who::Address(ip), 2_000, tftp("undionly.kpxe"));
        back.witness_at(Who::Uuid("uuid-9", &[]), 3_000, Step::Done);
        assert_eq!(
            names(&back.boots_of(&[MAC.to_string()])[0]),
            ["dhcp", "tftp", "done"]
        );
        assert!(back.machine("ip:10.0.0.10").is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"{").unwrap();
        let e = Timeline::new().load(&path).unwrap_err().to_string();
        assert!(e.contains("is not a boot timeline"), "{e}");
        assert!(path.with_extension("json.bad").exists(), "kept aside");
    }

    #[test]
    fn bounds_hold_for_boots_steps_and_machines() {
        let t = Timeline::new();
        for i in 0..(BOOTS_PER_MACHINE as u64 + 3) {
            t.witness_at(Who::Mac(MAC), i * 1_000_000_000, dhcp("pxe"));
        }
        assert_eq!(t.boots_of(&[MAC.to_string()]).len(), BOOTS_PER_MACHINE);
        for i in 0..(STEPS_PER_BOOT as u64 + 5) {
            t.witness_at(Who::Mac(MAC), 1 << 50 | i, Step::Done);
        }
        let last = t.boots_of(&[MAC.to_string()]).pop().unwrap();
        assert_eq!(last.steps.len(), STEPS_PER_BOOT);
        assert_eq!(last.dropped, 5);
        let many = Timeline::new();
        for i in 0..(MAX_MACHINES as u64 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(i as u32));
            many.witness_at(Who::Address(ip), i, tftp("x"));
        }
        assert_eq!(many.lock().machines.len(), MAX_MACHINES);
        // The oldest went first.
        assert!(many.machine("ip:0.0.0.0").is_none());
        assert_eq!(many.recent(1)[0].last_ms(), MAX_MACHINES as u64 + 9);
    }
}
