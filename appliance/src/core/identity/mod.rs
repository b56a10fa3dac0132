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
//!
//! Here: the window rules. The core's operations that run them: `windows.rs` (opened,
//! armed, closed; a boot admitted), `configdata.rs` (the token spent; done reports),
//! `registration.rs`; and `boot_bound.rs`, the in-memory secrets of unknown machines'
//! boots.

mod boot_bound;
mod configdata;
mod registration;
#[cfg(test)]
mod tests;
mod windows;

use std::net::IpAddr;

use crate::config::WindowsConfig;
use crate::inventory::{
    Alarm, AlarmKind, CloseReason, Grant, Requester, SecretKind, SecretUse, Server, Window,
    WindowClose,
};

pub(in crate::core) use boot_bound::BootSecrets;
pub use registration::RegistrationProof;
pub(in crate::core) use windows::BootSecretsFor;

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
