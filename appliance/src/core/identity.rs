//! Who gets a secret: provisioning windows, their one claimant, and the single-use
//! secrets a boot carries (see `SECURITY.md` for the threat model).
//!
//! PXE gives a machine no identity of its own: its UUID and MACs are public facts. So a
//! secret (the token `/configdata` needs, the registration secret that may change a
//! server's record, the wipe report's secret) exists only inside a **window** the
//! appliance itself opened, because it powered the machine on through its BMC or an
//! operator armed the server. The first `/boot.ipxe` of the window that matches the
//! server (its UUID, a MAC the inventory knows, and the MAC proxyDHCP answered in the
//! window if it answered one) is the **claimant**: the only requester ever handed the
//! secret. Any other requester for the server while the window is open trips it: the
//! secret is revoked, the server stands in alarm (no secrets until an operator arms it
//! again), and the alarm is logged with both sources, counted and reported. A window
//! whose secret was used keeps watching until its deadline, so a thief that claimed and
//! used it first is found out when the real machine boots.
//!
//! A secret is stored only as its sha256, apart from the server record (so the admin
//! API can never show one), and is spent by its first use, which closes the window. An
//! honest retry (an answer lost on the way) may use it again, a bounded number of times,
//! shortly after, from the address that used it first; the same secret from any other
//! address is a replay and raises the alarm.
//!
//! Machines the inventory does not know yet boot discovery with a **boot-bound**
//! registration secret (kept in memory, bound to the boot's UUID, MAC and address): it
//! lets that machine register as a new server, never change an existing one.
//!
//! The rules are pure functions over a [`Server`]; the core runs them inside one
//! inventory write transaction, so a check and the write it allows are never split.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Core, CoreError, Result, ServerEvent, blocking, secret_eq};
use crate::config::WindowsConfig;
use crate::inventory::{
    Alarm, AlarmKind, CloseReason, Grant, InstalledBy, Requester, SecretKind, SecretUse, Server,
    Tx, Window, WindowClose, now,
};
use crate::metrics::Metrics;
use crate::registration::{RegistrationMode, ValidRegistration};

/// What a window made of one `/boot.ipxe` requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    /// No window is open: the machine boots as its life says, without a secret.
    Outside,
    /// The window's claimant (just now, or asking again): it gets the boot's secret.
    Claimant,
    /// This requester tripped the window.
    Tripped(Box<Alarm>),
    /// The server stands in alarm: no secrets until an operator arms it again.
    Alarmed,
}

/// What using a secret came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The first use: it is spent, and its window closed.
    First,
    /// An honest retry of a spent secret.
    Retry,
    /// Refused, without an alarm: (metric label, reason).
    Refused(&'static str, String),
    /// A replay from another address: the alarm was raised.
    Tripped(Alarm),
}

/// Whether `r` is the machine the server is, as far as a boot request can show: the
/// server's UUID, one of its MACs, and (if proxyDHCP answered any of its MACs in this
/// window) one of those.
fn matches(s: &Server, r: &Requester, dhcp_macs: &[String]) -> bool {
    let mac_known = r.mac.as_ref().is_some_and(|m| s.macs.contains(m));
    let mac_seen = dhcp_macs.is_empty() || r.mac.as_ref().is_some_and(|m| dhcp_macs.contains(m));
    r.uuid.as_deref() == Some(s.uuid.as_str()) && mac_known && mac_seen
}

/// Closes the server's window as tripped and puts it in alarm.
fn trip(
    s: &mut Server,
    kind: AlarmKind,
    first: Option<Requester>,
    second: Requester,
    message: String,
    now: u64,
) -> Alarm {
    let window = s.window.as_ref().map(|w| w.id.clone()).unwrap_or_default();
    if let Some(w) = &mut s.window
        && w.closed.is_none()
    {
        w.closed = Some(WindowClose {
            at: now,
            why: CloseReason::Tripped,
        });
    }
    let alarm = Alarm {
        at: now,
        kind,
        window,
        first,
        second,
        message,
    };
    s.alarm = Some(alarm.clone());
    alarm
}

/// The window rule: `r` asks for `s`'s boot at `now`.
pub(super) fn admit(s: &mut Server, r: &Requester, dhcp_macs: &[String], now: u64) -> Admission {
    if s.alarm.is_some() {
        return Admission::Alarmed;
    }
    let Some(w) = s.window.as_ref().filter(|w| now < w.expires_at) else {
        return Admission::Outside;
    };
    // A window whose secret was used still watches until its deadline: anyone but its
    // claimant asking then is a second machine, even though nothing is left to hand out
    // (the thief who fetched first is found out when the real machine boots).
    let used = match &w.closed {
        None => false,
        Some(c) if c.why == CloseReason::Used => true,
        Some(_) => return Admission::Outside,
    };
    match w.claimant.clone() {
        Some(c) if c.same_as(r) && used => Admission::Outside,
        Some(c) if c.same_as(r) => Admission::Claimant,
        Some(c) => {
            let message = format!(
                "a second machine asked for server {}'s boot in its provisioning window: {r}, after the claimant {c}",
                s.id
            );
            Admission::Tripped(Box::new(trip(
                s,
                AlarmKind::SecondRequester,
                Some(c),
                r.clone(),
                message,
                now,
            )))
        }
        None if matches(s, r, dhcp_macs) => {
            if let Some(w) = &mut s.window {
                w.claimant = Some(r.clone());
            }
            Admission::Claimant
        }
        None => {
            let message = format!(
                "{r} asked first for server {}'s boot in its provisioning window but is not that machine (uuid {}, macs {}{})",
                s.id,
                s.uuid,
                s.macs.join(" "),
                if dhcp_macs.is_empty() {
                    String::new()
                } else {
                    format!("; proxyDHCP answered {}", dhcp_macs.join(" "))
                }
            );
            Admission::Tripped(Box::new(trip(
                s,
                AlarmKind::SecondRequester,
                None,
                r.clone(),
                message,
                now,
            )))
        }
    }
}

/// The secret rule: the secret of `grant` is presented for `what` from `source` at `now`.
/// With `bound`, its first use must come from the claimant's address too.
pub(super) fn use_secret(
    s: &mut Server,
    grant: &Grant,
    what: &str,
    source: IpAddr,
    bound: bool,
    now: u64,
    rules: &WindowsConfig,
) -> Verdict {
    if s.alarm.is_some() {
        return Verdict::Refused(
            "alarm",
            format!(
                "server {} stands in alarm: nothing is handed out until an operator arms it again",
                s.id
            ),
        );
    }
    let id = s.id.clone();
    let Some(w) = s.window.as_mut().filter(|w| w.id == grant.window) else {
        return Verdict::Refused(
            "revoked",
            format!("this secret's window of server {id} is gone"),
        );
    };
    let first = w.first_use(what).cloned();
    match first {
        None if bound && source != grant.source => {
            let claimant = w.claimant.clone();
            let message = format!(
                "the registration secret of server {id} was presented from {source}, not by the machine it was handed to ({})",
                grant.source
            );
            let second = requester_at(source, now);
            Verdict::Tripped(trip(
                s,
                AlarmKind::SecretReplayed,
                claimant,
                second,
                message,
                now,
            ))
        }
        None if !w.is_open(now) => Verdict::Refused(
            "expired",
            format!(
                "the provisioning window of server {id} is {}: arm it again",
                w.state(now)
            ),
        ),
        None => {
            w.push_use(SecretUse {
                at: now,
                source,
                what: what.into(),
            });
            w.closed = Some(WindowClose {
                at: now,
                why: CloseReason::Used,
            });
            Verdict::First
        }
        Some(u) if u.source != source => {
            let message = format!(
                "the {} secret of server {id} was used by {} and presented again from {source}",
                what, u.source
            );
            let first = requester_at(u.source, u.at);
            let second = requester_at(source, now);
            Verdict::Tripped(trip(
                s,
                AlarmKind::SecretReplayed,
                Some(first),
                second,
                message,
                now,
            ))
        }
        Some(u) => {
            let retries = w.uses.iter().filter(|x| x.what == what).count() as u32 - 1;
            if retries >= rules.retries || now.saturating_sub(u.at) > rules.retry_for.as_secs() {
                return Verdict::Refused(
                    "spent",
                    format!("this secret of server {id} was used already"),
                );
            }
            w.push_use(SecretUse {
                at: now,
                source,
                what: what.into(),
            });
            Verdict::Retry
        }
    }
}

fn requester_at(source: IpAddr, at: u64) -> Requester {
    Requester {
        source,
        mac: None,
        uuid: None,
        at,
    }
}

/// Opens a fresh window on `s` (revoking whatever the last one handed out).
fn open_on(s: &mut Server, opened_by: &str, rules: &WindowsConfig, now: u64) -> Window {
    if let Some(w) = &mut s.window
        && w.closed.is_none()
    {
        w.closed = Some(WindowClose {
            at: now,
            why: CloseReason::Replaced,
        });
    }
    let mut id = [0u8; 8];
    // The OS RNG failing is unrecoverable for anything security-related.
    getrandom::fill(&mut id).expect("the operating system's random number generator failed");
    let w = Window {
        id: hex::encode(id),
        opened_at: now,
        expires_at: now + rules.length.as_secs(),
        opened_by: opened_by.into(),
        claimant: None,
        issued: None,
        issued_at: None,
        uses: Vec::new(),
        closed: None,
    };
    s.window = Some(w.clone());
    w
}

// ---- boot-bound registration secrets (machines not in the inventory) ----

/// A registration secret handed to a discover (or wipe) boot outside any window: it
/// proves only that the registering machine is the one that booted.
#[derive(Debug, Clone)]
struct BootBound {
    uuid: Option<String>,
    mac: Option<String>,
    source: IpAddr,
    expires: Instant,
    /// Uses so far and the first one's time.
    used: Option<(Instant, u32)>,
}

/// The boot-bound secrets handed out and not yet expired, by hash. In memory: an
/// appliance restart only makes a booting unknown machine boot again.
#[derive(Debug, Default)]
pub(super) struct BootSecrets {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_hash: HashMap<String, BootBound>,
    /// The hashes in the order they were minted. Every secret lives one window length,
    /// so the front is always the first to expire, and the first to give way when the
    /// bound is reached: minting stays O(1) however many are held.
    order: VecDeque<(Instant, String)>,
}

impl BootSecrets {
    /// Bound on secrets held (a rack is hundreds of machines; a flood is not).
    const MAX: usize = 16_384;

    /// A new secret for a boot of `uuid`/`mac` from `source`.
    fn mint(&self, uuid: Option<&str>, mac: Option<&str>, source: IpAddr, ttl: Duration) -> String {
        let secret = crate::random_token();
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held { by_hash, order } = &mut *held;
        while let Some((expires, hash)) = order.front()
            && (*expires <= now || by_hash.len() >= Self::MAX)
        {
            by_hash.remove(hash);
            order.pop_front();
        }
        let hash = crate::secret_hash(&secret);
        let expires = now + ttl;
        order.push_back((expires, hash.clone()));
        by_hash.insert(
            hash,
            BootBound {
                uuid: uuid.map(String::from),
                mac: mac.map(String::from),
                source,
                expires,
                used: None,
            },
        );
        secret
    }

    /// Whether `hash` is one of these secrets.
    fn knows(&self, hash: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .contains_key(hash)
    }

    /// Checks a registration against the boot-bound secret with `hash`: `None` when it
    /// is not one of these, else whether the registration may go on (as a new machine).
    fn check(
        &self,
        hash: &str,
        reg: &ValidRegistration,
        source: IpAddr,
        rules: &WindowsConfig,
    ) -> Option<std::result::Result<(), (&'static str, String)>> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let b = held.by_hash.get_mut(hash)?;
        let refuse = |label, why: String| Some(Err((label, why)));
        if b.source != source {
            return refuse(
                "forbidden",
                format!(
                    "this registration secret was handed to {}, not to {source}",
                    b.source
                ),
            );
        }
        if b.uuid.as_ref().is_some_and(|u| *u != reg.uuid) {
            return refuse(
                "forbidden",
                "this registration secret belongs to a boot of another UUID".into(),
            );
        }
        if let Some(mac) = &b.mac
            && !reg.macs.contains(mac)
        {
            return refuse(
                "forbidden",
                format!("the machine booted with MAC {mac} but does not report it"),
            );
        }
        match &mut b.used {
            None if now >= b.expires => {
                refuse("expired", "this registration secret expired".into())
            }
            None => {
                b.used = Some((now, 1));
                Some(Ok(()))
            }
            Some((first, n))
                if *n <= rules.retries && now.duration_since(*first) <= rules.retry_for =>
            {
                *n += 1;
                Some(Ok(()))
            }
            Some(_) => refuse("spent", "this registration secret was used already".into()),
        }
    }
}

// ---- the core's operations ----

/// How a registration proves itself.
#[derive(Debug, Clone, Copy)]
pub enum RegistrationProof<'a> {
    /// The shared registration token (agents an operator runs by hand).
    Shared,
    /// A per-boot secret from a discover or wipe script.
    Secret(&'a str),
}

/// What a registration came to in the inventory.
#[derive(Debug)]
pub(super) enum Registered {
    Created(Server),
    /// Changed with its window's secret; the flag says the wipe report counted.
    Updated(Server, bool),
    /// Nothing to change: the same machine, reporting the same.
    Unchanged(Server),
    /// Refused: (metric label, reason), and the server it was recorded on.
    Refused(&'static str, String, Option<Server>),
    /// A replayed secret raised the alarm.
    Tripped(Server, Alarm),
}

/// What a `/configdata` or done request came to.
enum ConfigAccess {
    Served {
        server: Box<Server>,
        sealed: Option<Vec<u8>>,
        retry: bool,
        first_for_claim: bool,
    },
    Refused(&'static str, String),
    Tripped(Box<Server>, Alarm),
}

/// The secrets one boot script carries.
#[derive(Debug, Default, Clone)]
pub(super) struct BootSecretsFor {
    /// For `/configdata` (`boot_token` in templates).
    pub config: Option<String>,
    /// For registration (`registration_token` in templates).
    pub registration: Option<String>,
}

impl Core {
    fn window_event(&self, event: &'static str) {
        Metrics::inc(&self.metrics.provisioning_windows, "event", event);
    }

    fn issued(&self, kind: &'static str) {
        Metrics::inc(&self.metrics.secrets_issued, "kind", kind);
    }

    /// Raises an alarm everywhere it must show: a log line with both sources, a
    /// metric, and the Kubernetes event (through the subscribers).
    fn raise(&self, s: &Server, alarm: &Alarm) {
        Metrics::inc(&self.metrics.identity_alarms, "kind", alarm.kind.name());
        self.window_event("tripped");
        tracing::warn!(
            id = %s.id,
            kind = alarm.kind.name(),
            window = %alarm.window,
            first = alarm.first.as_ref().map(|r| r.to_string()),
            second = %alarm.second,
            "{}; no secret goes out until an operator arms the server again",
            alarm.message
        );
        let _ = self
            .events
            .send(ServerEvent::Alarm(s.id.clone(), alarm.clone()));
        self.changed(&s.id);
    }

    /// The proxyDHCP answers to `macs` since `since` (unix seconds).
    fn dhcp_macs_since(&self, macs: &[String], since: u64) -> Vec<String> {
        let seen = self.dhcp_seen.lock().unwrap_or_else(|p| p.into_inner());
        macs.iter()
            .filter(|m| seen.get(*m).is_some_and(|t| *t >= since))
            .cloned()
            .collect()
    }

    /// Notes a proxyDHCP answer to `mac` (normalised), for the window's MAC rule.
    pub(super) fn note_dhcp(&self, mac: &str) {
        const MAX: usize = 16_384;
        let mut seen = self.dhcp_seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = now();
        if seen.len() >= MAX && !seen.contains_key(mac) {
            let horizon = now.saturating_sub(self.config.windows.length.as_secs());
            seen.retain(|_, t| *t >= horizon);
            if seen.len() >= MAX {
                return;
            }
        }
        seen.insert(mac.to_string(), now);
    }

    /// Opens a provisioning window on server `id`: its next boot within
    /// `[windows] secs` gets its secrets, if nobody else asks.
    pub async fn open_window(&self, id: &str, opened_by: &str) -> Result<Server> {
        self.window_op(id, opened_by, false).await
    }

    /// An operator arms server `id`: a window opens, and an alarm standing on it is
    /// cleared. A claimed server that is not installed yet starts its install boot over
    /// (the controller powers it into its install environment again, if it has a BMC).
    pub async fn arm(&self, id: &str, by: &str) -> Result<Server> {
        self.window_op(id, by, true).await
    }

    async fn window_op(&self, id: &str, opened_by: &str, arm: bool) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let (key, by, rules) = (id.to_string(), opened_by.to_string(), self.config.windows);
        let (s, cleared) = blocking(move || {
            Ok(inv.write(|t| {
                let mut s = t.require(&key)?;
                let cleared = if arm { s.alarm.take() } else { None };
                if arm
                    && let Some(c) = &mut s.provisioning.claim
                    && c.installed_at.is_none()
                {
                    c.powered_at = None;
                    c.config_served_at = None;
                }
                open_on(&mut s, &by, &rules, now());
                t.set_grant(&key, None)?;
                t.put(&mut s)?;
                Ok((s, cleared))
            })?)
        })
        .await?;
        self.window_event(if arm { "armed" } else { "opened" });
        let w = s.window.as_ref();
        tracing::info!(
            id = %s.id,
            window = w.map(|w| w.id.as_str()),
            by = opened_by,
            secs = self.config.windows.length.as_secs(),
            alarm_cleared = cleared.is_some(),
            "provisioning window opened"
        );
        self.changed(&s.id);
        Ok(s)
    }

    /// Closes server `id`'s window, if it is still `window` (or any, with `None`), and
    /// revokes its secret.
    pub async fn close_window(
        &self,
        id: &str,
        window: Option<&str>,
        why: CloseReason,
    ) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let (key, window) = (id.to_string(), window.map(String::from));
        let s = blocking(move || {
            Ok(inv.write(|t| {
                let mut s = t.require(&key)?;
                if let Some(w) = &mut s.window
                    && w.closed.is_none()
                    && window.as_ref().is_none_or(|id| *id == w.id)
                {
                    w.closed = Some(WindowClose { at: now(), why });
                    t.set_grant(&key, None)?;
                    t.put(&mut s)?;
                }
                Ok(s)
            })?)
        })
        .await?;
        self.window_event(why.name());
        self.changed(&s.id);
        Ok(s)
    }

    /// The window part of a known server's boot, with its record: the admission, and
    /// the secret for the claimant when `wants` one. Returns the server as stored, the
    /// admission, the window secret handed out, and whether the requester is the last
    /// window's claimant (for "booted again after fetching its configuration").
    pub(super) async fn admit_boot(
        &self,
        server: &Server,
        requester: Requester,
        wants: Option<SecretKind>,
        record: crate::inventory::BootRecord,
    ) -> Result<(Server, Admission, Option<String>, bool)> {
        let since = server.window.as_ref().map_or(u64::MAX, |w| w.opened_at);
        let dhcp_macs = self.dhcp_macs_since(&server.macs, since);
        let inv = Arc::clone(&self.inventory);
        let id = server.id.clone();
        let out = blocking(move || {
            Ok(inv.write(|t| {
                let mut s = t.require(&id)?;
                let now = requester.at;
                let admission = admit(&mut s, &requester, &dhcp_macs, now);
                let mut secret = None;
                match (&admission, wants) {
                    (Admission::Claimant, Some(kind)) => {
                        let token = crate::random_token();
                        if let Some(w) = &mut s.window {
                            w.issued = Some(kind);
                            w.issued_at = Some(now);
                            t.set_grant(
                                &id,
                                Some(&Grant {
                                    window: w.id.clone(),
                                    kind,
                                    sha256: crate::secret_hash(&token),
                                    source: requester.source,
                                }),
                            )?;
                        }
                        secret = Some(token);
                    }
                    (Admission::Tripped(_), _) => t.set_grant(&id, None)?,
                    _ => {}
                }
                let by_claimant = s
                    .window
                    .as_ref()
                    .and_then(|w| w.claimant.as_ref())
                    .is_some_and(|c| c.same_as(&requester));
                s.push_boot(record);
                t.put(&mut s)?;
                Ok((s, admission, secret, by_claimant))
            })?)
        })
        .await?;
        match &out.1 {
            Admission::Claimant if out.2.is_some() => {
                self.window_event("claimed");
                self.issued(wants.map_or("none", SecretKind::name));
                tracing::info!(id = %out.0.id, source = %requester_source(&out.0), secret = wants.map(SecretKind::name), "provisioning window claimed; secret handed out");
            }
            Admission::Tripped(alarm) => self.raise(&out.0, alarm),
            _ => {}
        }
        Ok(out)
    }

    /// A registration secret for a boot outside any window (an unknown machine, or a
    /// known one booting discovery unasked): it may register a new server, or the same
    /// server unchanged, and nothing else.
    pub(super) fn boot_bound_secret(
        &self,
        uuid: Option<&str>,
        mac: Option<&str>,
        source: IpAddr,
        wipe: bool,
    ) -> String {
        self.issued(if wipe { "boot-wipe" } else { "boot-discover" });
        self.boot_secrets
            .mint(uuid, mac, source, self.config.windows.length)
    }

    /// The configuration blob of the machine `uuid`, for the holder of its window's
    /// token only: the first fetch spends it; honest retries follow `use_secret`.
    pub async fn config_for(
        &self,
        uuid: &str,
        token: Option<&str>,
        source: IpAddr,
    ) -> Result<Vec<u8>> {
        let result = self.config_access(uuid, token, source, "configdata").await;
        let (label, result) = match result {
            Ok((s, sealed, retry, first_for_claim)) => {
                let opened = sealed
                    .ok_or_else(|| {
                        CoreError::NotFound(format!("server {} has no configuration", s.id))
                    })
                    .and_then(|b| {
                        self.sealer
                            .open_config(&s.id, &b)
                            .map_err(|e| CoreError::Internal(e.to_string()))
                    });
                if opened.is_ok() && first_for_claim {
                    self.step("config_served", "ok");
                }
                if opened.is_ok() {
                    tracing::info!(id = %s.id, %source, retry, "configuration served");
                }
                (
                    match &opened {
                        Ok(_) if retry => "retried",
                        Ok(_) => "served",
                        Err(e) => e.kind(),
                    },
                    opened,
                )
            }
            Err((label, e)) => (label, Err(e)),
        };
        Metrics::inc(&self.metrics.configdata, "result", label);
        result
    }

    /// The install environment of a claimed machine says it is done (`POST
    /// /configdata/done`, with its window's token, from where it fetched its
    /// configuration).
    pub async fn report_installed(
        &self,
        uuid: &str,
        token: Option<&str>,
        source: IpAddr,
    ) -> Result<Server> {
        let (server, ..) = self
            .config_access(uuid, token, source, "done")
            .await
            .map_err(|(label, e)| {
                self.step("installed", label);
                e
            })?;
        if server.provisioning.claim.is_none() {
            self.step("installed", "not_claimed");
            return Err(CoreError::Invalid(format!(
                "server {} is not claimed by a machine: nothing was being installed",
                server.id
            )));
        }
        self.mark_installed(&server.id, InstalledBy::Reported).await
    }

    /// Checks (and spends) the token for `what` (`configdata` or `done`): the server,
    /// its sealed blob (for `configdata`), whether this was a retry, and whether it was
    /// the claim's first fetch; or the metric label and error.
    async fn config_access(
        &self,
        uuid: &str,
        token: Option<&str>,
        source: IpAddr,
        what: &'static str,
    ) -> std::result::Result<(Server, Option<Vec<u8>>, bool, bool), (&'static str, CoreError)> {
        let denied = |label, why: String| (label, CoreError::Forbidden(why));
        let uuid = crate::registration::normalize_uuid(uuid)
            .ok_or_else(|| denied("forbidden", format!("{uuid:?} is not a UUID")))?;
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            tracing::warn!(%source, uuid, what, "refused: no token");
            return Err(denied(
                "no_token",
                "a token is required: the one on this machine's kernel command line, handed out in a provisioning window".into(),
            ));
        };
        let hash = crate::secret_hash(token);
        let inv = Arc::clone(&self.inventory);
        let rules = self.config.windows;
        let access =
            blocking(move || Ok(inv.write(|t| config_in(t, &uuid, &hash, source, what, &rules))?))
                .await
                .map_err(|e| (e.kind(), e))?;
        match access {
            ConfigAccess::Served {
                server,
                sealed,
                retry,
                first_for_claim,
            } => {
                if first_for_claim {
                    self.changed(&server.id);
                }
                if !retry {
                    self.window_event("used");
                }
                Ok((*server, sealed, retry, first_for_claim))
            }
            ConfigAccess::Refused(label, why) => {
                tracing::warn!(%source, what, reason = %why, "refused");
                Err(denied(label, why))
            }
            ConfigAccess::Tripped(s, alarm) => {
                self.raise(&s, &alarm);
                Err(denied(
                    "tripped",
                    format!("{}: the alarm is raised", alarm.message),
                ))
            }
        }
    }

    /// Registers a machine reported by the discovery agent: new machines with any proof;
    /// changes to a known server (its MACs, hardware, BMC address) and wipe reports only
    /// with the secret of that server's own discover or wipe boot.
    #[tracing::instrument(skip(self, req, proof), fields(uuid = %req.uuid, source = %source))]
    pub async fn register(
        &self,
        req: crate::registration::RegistrationRequest,
        proof: RegistrationProof<'_>,
        source: IpAddr,
    ) -> Result<crate::registration::RegistrationResponse> {
        let count =
            |label: &'static str| Metrics::inc(&self.metrics.registrations, "result", label);
        let hash = match proof {
            RegistrationProof::Shared => None,
            RegistrationProof::Secret(secret) => Some(crate::secret_hash(secret)),
        };
        // A secret nobody was handed is no credential: said before reading the rest.
        if let Some(hash) = &hash
            && !self.boot_secrets.knows(hash)
        {
            let inv = Arc::clone(&self.inventory);
            let h = hash.clone();
            if blocking(move || Ok(inv.grant_owner(&h)?)).await?.is_none() {
                count("unauthorized");
                tracing::warn!(%source, "registration with an unknown token refused");
                return Err(CoreError::Unauthorized(
                    "missing or wrong bearer token: neither the registration token nor a secret this appliance handed to a boot".into(),
                ));
            }
        }
        let reg = req.validate().map_err(|e| {
            count("invalid");
            tracing::warn!(%source, error = %e, "malformed registration refused");
            CoreError::Invalid(format!("invalid registration: {e}"))
        })?;
        let window_hash = match hash {
            None => None,
            Some(hash) => {
                match self
                    .boot_secrets
                    .check(&hash, &reg, source, &self.config.windows)
                {
                    Some(Ok(())) => None,
                    Some(Err((label, why))) => {
                        count(label);
                        tracing::warn!(%source, reason = %why, "registration refused");
                        return Err(CoreError::Forbidden(why));
                    }
                    None => Some(hash),
                }
            }
        };
        let inv = Arc::clone(&self.inventory);
        let rules = self.config.windows;
        let reg2 = reg.clone();
        let outcome = blocking(move || {
            Ok(inv.write(|t| register_in(t, &reg2, window_hash.as_deref(), source, &rules))?)
        })
        .await
        .inspect_err(|e| count(e.kind()))?;
        let (s, created, wiped) = match outcome {
            Registered::Created(s) => (s, true, false),
            Registered::Updated(s, wiped) => {
                self.window_event("used");
                (s, false, wiped)
            }
            Registered::Unchanged(s) => {
                count("unchanged");
                tracing::info!(id = %s.id, "machine registered again, unchanged");
                return Ok(self.registration_answer(&s, source, false));
            }
            Registered::Refused(label, why, server) => {
                count(label);
                tracing::warn!(%source, server = server.as_ref().map(|s| s.id.as_str()), reason = %why, "registration refused");
                if let Some(s) = &server {
                    self.changed(&s.id);
                }
                return Err(if label == "conflict" {
                    CoreError::Conflict(why)
                } else {
                    CoreError::Forbidden(why)
                });
            }
            Registered::Tripped(s, alarm) => {
                count("tripped");
                self.raise(&s, &alarm);
                return Err(CoreError::Forbidden(format!(
                    "{}: the alarm is raised",
                    alarm.message
                )));
            }
        };
        self.changed(&s.id);
        if wiped {
            self.step("wiped", "ok");
            tracing::info!(id = %s.id, "wipe done; server free");
        }
        if let Some(took) = self.boot_clock.finish(&s.macs) {
            self.metrics
                .boot_to_registration_seconds
                .observe(took.as_secs_f64());
            tracing::info!(id = %s.id, seconds = took.as_secs_f64(), "power-on to registered");
        }
        count(if created { "created" } else { "updated" });
        tracing::info!(id = %s.id, created, mode = reg.mode.name(), conflict = s.uuid_conflict, "machine registered");
        Ok(self.registration_answer(&s, source, wiped))
    }
}

fn requester_source(s: &Server) -> String {
    s.window
        .as_ref()
        .and_then(|w| w.claimant.as_ref())
        .map(|c| c.to_string())
        .unwrap_or_default()
}

/// `/configdata` (or its done report) inside the write transaction.
fn config_in(
    t: &Tx<'_>,
    uuid: &str,
    hash: &str,
    source: IpAddr,
    what: &'static str,
    rules: &WindowsConfig,
) -> crate::inventory::Result<ConfigAccess> {
    let now = now();
    for mut s in t.with_uuid(uuid)? {
        let Some(g) = t.grant(&s.id)? else { continue };
        if g.kind != SecretKind::ConfigToken || !secret_eq(&g.sha256, hash) {
            continue;
        }
        if what == "done" {
            return done_in(t, s, &g, source, now);
        }
        return Ok(
            match use_secret(&mut s, &g, what, source, false, now, rules) {
                Verdict::First | Verdict::Retry => {
                    let retry = s
                        .window
                        .as_ref()
                        .is_some_and(|w| w.uses.iter().filter(|u| u.what == what).count() > 1);
                    let first_for_claim = match &mut s.provisioning.claim {
                        Some(c) if c.config_served_at.is_none() => {
                            c.config_served_at = Some(now);
                            true
                        }
                        _ => false,
                    };
                    t.put(&mut s)?;
                    let sealed = t.config(&s.id)?;
                    ConfigAccess::Served {
                        server: Box::new(s),
                        sealed,
                        retry,
                        first_for_claim,
                    }
                }
                Verdict::Refused(label, why) => ConfigAccess::Refused(label, why),
                Verdict::Tripped(alarm) => {
                    t.set_grant(&s.id, None)?;
                    t.put(&mut s)?;
                    ConfigAccess::Tripped(Box::new(s), alarm)
                }
            },
        );
    }
    Ok(ConfigAccess::Refused(
        "forbidden",
        "this token opens no configuration of that machine (wrong, revoked, or of another window)"
            .into(),
    ))
}

/// The done report: the window's token, after its configuration was fetched, from the
/// address that fetched it.
fn done_in(
    t: &Tx<'_>,
    mut s: Server,
    g: &Grant,
    source: IpAddr,
    now: u64,
) -> crate::inventory::Result<ConfigAccess> {
    if s.alarm.is_some() {
        return Ok(ConfigAccess::Refused(
            "alarm",
            format!("server {} stands in alarm", s.id),
        ));
    }
    let Some(w) = s.window.as_mut().filter(|w| w.id == g.window) else {
        return Ok(ConfigAccess::Refused(
            "revoked",
            "this token's window is gone".into(),
        ));
    };
    let Some(fetch) = w.first_use("configdata").cloned() else {
        return Ok(ConfigAccess::Refused(
            "not_fetched",
            format!(
                "server {} has not fetched its configuration in this window: nothing was installed with it",
                s.id
            ),
        ));
    };
    if fetch.source != source {
        let message = format!(
            "the configuration token of server {} fetched from {} was presented with a done report from {source}",
            s.id, fetch.source
        );
        let alarm = trip(
            &mut s,
            AlarmKind::SecretReplayed,
            Some(requester_at(fetch.source, fetch.at)),
            requester_at(source, now),
            message,
            now,
        );
        t.set_grant(&s.id, None)?;
        t.put(&mut s)?;
        return Ok(ConfigAccess::Tripped(Box::new(s), alarm));
    }
    if w.first_use("done").is_none() {
        w.push_use(SecretUse {
            at: now,
            source,
            what: "done".into(),
        });
        t.put(&mut s)?;
    }
    Ok(ConfigAccess::Served {
        server: Box::new(s),
        sealed: None,
        retry: false,
        first_for_claim: false,
    })
}

/// A registration inside the write transaction. `window_hash`: the hash of a per-boot
/// secret that is none of the boot-bound ones (so it may be a window's); `None`: the
/// registration may create a server, or re-register one unchanged.
fn register_in(
    t: &Tx<'_>,
    reg: &ValidRegistration,
    window_hash: Option<&str>,
    source: IpAddr,
    rules: &WindowsConfig,
) -> crate::inventory::Result<Registered> {
    let now = now();
    let Some(hash) = window_hash else {
        return register_unproven(t, reg, source, now);
    };
    let mut found = None;
    for s in t.with_uuid(&reg.uuid)? {
        if let Some(g) = t.grant(&s.id)?
            && g.kind != SecretKind::ConfigToken
            && secret_eq(&g.sha256, hash)
        {
            found = Some((s, g));
            break;
        }
    }
    let Some((mut s, g)) = found else {
        return Ok(Registered::Refused(
            "forbidden",
            format!(
                "this registration secret was handed to the boot of another machine than {}",
                reg.uuid
            ),
            None,
        ));
    };
    let claimant_mac = s
        .window
        .as_ref()
        .and_then(|w| w.claimant.as_ref())
        .and_then(|c| c.mac.clone());
    match use_secret(&mut s, &g, "registration", source, true, now, rules) {
        Verdict::First | Verdict::Retry => {}
        Verdict::Refused(label, why) => return Ok(Registered::Refused(label, why, None)),
        Verdict::Tripped(alarm) => {
            t.set_grant(&s.id, None)?;
            t.put(&mut s)?;
            return Ok(Registered::Tripped(s, alarm));
        }
    }
    let wipe_report = reg.mode == RegistrationMode::Wipe;
    if wipe_report && g.kind != SecretKind::WipeSecret {
        return refuse_on(
            t,
            s,
            source,
            now,
            "refused",
            "a wipe report needs the secret of the wipe boot the appliance started; this is a discover boot's".into(),
        );
    }
    if let Some(mac) = claimant_mac
        && !reg.macs.contains(&mac)
    {
        return refuse_on(
            t,
            s,
            source,
            now,
            "refused",
            format!("the machine booted with MAC {mac} but does not report it"),
        );
    }
    let foreign: Vec<_> = t
        .resolve(reg)?
        .foreign_macs
        .into_iter()
        .filter(|(_, owner)| *owner != s.id)
        .collect();
    if let Some((mac, owner)) = foreign.first() {
        return refuse_on(
            t,
            s,
            source,
            now,
            "conflict",
            format!("MAC {mac} belongs to server {owner}"),
        );
    }
    let p = &mut s.provisioning;
    let wiped = wipe_report && p.claim.is_none() && p.wipe_requested_at.is_some();
    if wiped {
        p.wipe_requested_at = None;
        p.dirty = false;
    }
    t.apply_registration(&mut s, reg)?;
    Ok(Registered::Updated(s, wiped))
}

/// A registration with the shared token or a boot-bound secret: a new machine, or one
/// the inventory has reporting exactly what it has.
fn register_unproven(
    t: &Tx<'_>,
    reg: &ValidRegistration,
    source: IpAddr,
    now: u64,
) -> crate::inventory::Result<Registered> {
    let found = t.resolve(reg)?;
    if let Some((mac, owner)) = found.foreign_macs.first() {
        let why = format!(
            "MAC {mac} belongs to server {owner}; a machine's identity changes only with the secret of its own discover boot"
        );
        // Recorded on the server the registration named, else on the MAC's owner.
        let on = match found.existing {
            Some(s) => s,
            None => t.require(owner)?,
        };
        return refuse_on(t, on, source, now, "conflict", why);
    }
    let Some(s) = found.existing else {
        return Ok(Registered::Created(t.create(reg, &found.others)?));
    };
    let id = s.id.clone();
    if reg.mode == RegistrationMode::Wipe && s.provisioning.wipe_requested_at.is_some() {
        return refuse_on(
            t,
            s,
            source,
            now,
            "refused",
            format!(
                "server {id} waits for its wipe: a wipe report counts only with the secret of the wipe boot the appliance started"
            ),
        );
    }
    let mut changes = Vec::new();
    let (mut have, mut want) = (s.macs.clone(), reg.macs.clone());
    have.sort();
    want.sort();
    if have != want {
        changes.push("MACs");
    }
    let bmc = |h: &crate::registration::Hardware| h.bmc.clone();
    let mut h = reg.hardware.clone();
    if bmc(&s.hardware) != bmc(&h) {
        changes.push("BMC address");
    }
    h.bmc = s.hardware.bmc.clone();
    if s.hardware != h {
        changes.push("hardware");
    }
    if changes.is_empty() {
        return Ok(Registered::Unchanged(s));
    }
    refuse_on(
        t,
        s,
        source,
        now,
        "refused",
        format!(
            "this registration would change server {id}'s {}: that needs the registration secret of a discover boot of {id} in a provisioning window (arm it: arges server arm {id})",
            changes.join(", ")
        ),
    )
}

/// Records a refused registration on `s`.
fn refuse_on(
    t: &Tx<'_>,
    mut s: Server,
    source: IpAddr,
    now: u64,
    label: &'static str,
    why: String,
) -> crate::inventory::Result<Registered> {
    // What the refused registration brought is dropped; only the refusal is kept.
    let mut fresh = t.require(&s.id)?;
    fresh.push_refusal(crate::inventory::Refusal {
        at: now,
        source,
        reason: why.clone(),
    });
    t.put(&mut fresh)?;
    s = fresh;
    Ok(Registered::Refused(label, why, Some(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "4c4c4544-0042-3510-8051-b4c04f595031";
    const MAC: &str = "b8:ca:3a:00:00:0a";

    fn server() -> Server {
        serde_json::from_value(serde_json::json!({
            "id": U, "uuid": U, "macs": [MAC], "hardware": {},
            "registered_at": 0, "updated_at": 0,
        }))
        .unwrap()
    }

    fn asker(source: &str, mac: &str, at: u64) -> Requester {
        Requester {
            source: source.parse().unwrap(),
            mac: Some(mac.into()),
            uuid: Some(U.into()),
            at,
        }
    }

    fn rules() -> WindowsConfig {
        WindowsConfig::default()
    }

    fn grant(s: &Server, kind: SecretKind, source: &str) -> Grant {
        Grant {
            window: s.window.as_ref().unwrap().id.clone(),
            kind,
            sha256: "x".into(),
            source: source.parse().unwrap(),
        }
    }

    #[test]
    fn outside_a_window_nobody_is_a_claimant() {
        let mut s = server();
        assert_eq!(
            admit(&mut s, &asker("10.0.0.7", MAC, 10), &[], 10),
            Admission::Outside
        );
        open_on(&mut s, "power on", &rules(), 10);
        assert_eq!(
            admit(&mut s, &asker("10.0.0.7", MAC, 2000), &[], 2000),
            Admission::Outside,
            "expired"
        );
    }

    #[test]
    fn the_first_matching_requester_claims_and_a_second_trips() {
        let mut s = server();
        open_on(&mut s, "power cycle", &rules(), 10);
        let real = asker("10.0.0.7", MAC, 11);
        assert_eq!(admit(&mut s, &real, &[], 11), Admission::Claimant);
        assert_eq!(
            admit(&mut s, &real, &[], 12),
            Admission::Claimant,
            "asking again"
        );
        let thief = asker("10.0.0.66", MAC, 13);
        let Admission::Tripped(alarm) = admit(&mut s, &thief, &[], 13) else {
            panic!("a second requester trips the window")
        };
        assert_eq!(alarm.first.as_ref(), Some(&real));
        assert_eq!(alarm.second, thief);
        assert_eq!(s.window.as_ref().unwrap().state(13), "tripped");
        assert_eq!(admit(&mut s, &real, &[], 14), Admission::Alarmed);
        // Armed again: open, and the real machine claims.
        s.alarm = None;
        open_on(&mut s, "armed", &rules(), 20);
        assert_eq!(admit(&mut s, &real, &[], 21), Admission::Claimant);
    }

    #[test]
    fn a_requester_that_is_not_the_server_trips_it_first() {
        let mut s = server();
        open_on(&mut s, "power on", &rules(), 10);
        let other_mac = asker("10.0.0.7", "b8:ca:3a:00:00:0b", 11);
        assert!(
            matches!(admit(&mut s, &other_mac, &[], 11), Admission::Tripped(a) if a.first.is_none())
        );
        // The MAC proxyDHCP answered in the window must be the one asking.
        let mut s = server();
        s.macs.push("b8:ca:3a:00:00:0b".into());
        open_on(&mut s, "power on", &rules(), 10);
        let seen = vec![MAC.to_string()];
        assert!(matches!(
            admit(
                &mut s,
                &asker("10.0.0.7", "b8:ca:3a:00:00:0b", 11),
                &seen,
                11
            ),
            Admission::Tripped(_)
        ));
    }

    #[test]
    fn a_secret_is_spent_once_retried_honestly_and_replays_trip() {
        let r = rules();
        let mut s = server();
        open_on(&mut s, "power on", &r, 10);
        admit(&mut s, &asker("10.0.0.7", MAC, 11), &[], 11);
        let g = grant(&s, SecretKind::ConfigToken, "10.0.0.7");
        let here: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(
            use_secret(&mut s, &g, "configdata", here, false, 12, &r),
            Verdict::First
        );
        assert_eq!(s.window.as_ref().unwrap().state(12), "used");
        assert_eq!(
            use_secret(&mut s, &g, "configdata", here, false, 13, &r),
            Verdict::Retry
        );
        assert_eq!(
            use_secret(&mut s, &g, "configdata", here, false, 14, &r),
            Verdict::Retry
        );
        assert!(matches!(
            use_secret(&mut s, &g, "configdata", here, false, 15, &r),
            Verdict::Refused("spent", _)
        ));
        let elsewhere: IpAddr = "10.0.0.66".parse().unwrap();
        assert!(matches!(
            use_secret(&mut s, &g, "configdata", elsewhere, false, 16, &r),
            Verdict::Tripped(a) if a.kind == AlarmKind::SecretReplayed
        ));
        assert!(matches!(
            use_secret(&mut s, &g, "configdata", here, false, 17, &r),
            Verdict::Refused("alarm", _)
        ));
    }

    #[test]
    fn boot_bound_secrets_are_bounded_and_the_oldest_give_way() {
        let held = BootSecrets::default();
        let source: IpAddr = "10.0.0.7".parse().unwrap();
        let ttl = Duration::from_secs(900);
        let first = crate::secret_hash(&held.mint(None, None, source, ttl));
        for _ in 0..BootSecrets::MAX {
            held.mint(None, None, source, ttl);
        }
        let h = held.held.lock().unwrap();
        assert_eq!(h.by_hash.len(), BootSecrets::MAX);
        assert_eq!(h.order.len(), BootSecrets::MAX);
        drop(h);
        assert!(!held.knows(&first), "the oldest gave way");
        // Expired ones go at the next mint, whatever the count.
        let short = BootSecrets::default();
        let gone = crate::secret_hash(&short.mint(None, None, source, Duration::ZERO));
        short.mint(None, None, source, ttl);
        assert!(!short.knows(&gone));
    }

    #[test]
    fn a_registration_secret_is_bound_to_its_claimant_and_its_window() {
        let r = rules();
        let mut s = server();
        open_on(&mut s, "armed", &r, 10);
        admit(&mut s, &asker("10.0.0.7", MAC, 11), &[], 11);
        let g = grant(&s, SecretKind::DiscoverSecret, "10.0.0.7");
        let mut stolen = s.clone();
        assert!(matches!(
            use_secret(
                &mut stolen,
                &g,
                "registration",
                "10.0.0.66".parse().unwrap(),
                true,
                12,
                &r
            ),
            Verdict::Tripped(_)
        ));
        let mut late = s.clone();
        assert!(matches!(
            use_secret(
                &mut late,
                &g,
                "registration",
                "10.0.0.7".parse().unwrap(),
                true,
                5000,
                &r
            ),
            Verdict::Refused("expired", _)
        ));
        // A newer window revokes the older one's secret.
        open_on(&mut s, "power cycle", &r, 20);
        assert!(matches!(
            use_secret(
                &mut s,
                &g,
                "registration",
                "10.0.0.7".parse().unwrap(),
                true,
                21,
                &r
            ),
            Verdict::Refused("revoked", _)
        ));
    }
}
