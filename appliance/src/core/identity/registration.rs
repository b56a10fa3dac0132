//! Registrations: new machines with any proof; changes to a known server, and wipe
//! reports, only with the secret of that server's own boot.

use std::net::IpAddr;
use std::sync::Arc;

use super::super::{Core, CoreError, Result, blocking, secret_eq};
use super::*;
use crate::inventory::{Tx, now};
use crate::metrics::Metrics;
use crate::registration::{RegistrationMode, ValidRegistration};
use crate::timeline::{Step, Who};

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
pub(in crate::core) enum Registered {
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

impl Core {
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
        let uuid = req.uuid.clone();
        let result = self.register_checked(req, proof, source).await;
        let (outcome, detail) = match &result {
            Ok(r) => (
                crate::audit::Outcome::Ok,
                Some(format!("as {}", r.server_id)),
            ),
            Err(e) => (crate::core::audit_outcome(e), Some(e.to_string())),
        };
        self.audit.record(
            format!("machine {uuid}"),
            Some(source),
            "registration",
            Some(&uuid),
            outcome,
            detail,
        );
        result
    }

    async fn register_checked(
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
        let cap = self.config.policy.max_unaccepted;
        let reg2 = reg.clone();
        let outcome = blocking(move || {
            Ok(inv.write(|t| register_in(t, &reg2, window_hash.as_deref(), source, &rules, cap))?)
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
                return Err(match label {
                    "conflict" => CoreError::Conflict(why),
                    "unaccepted_cap" => {
                        self.metrics.limit("core", "unaccepted");
                        CoreError::Busy(why)
                    }
                    _ => CoreError::Forbidden(why),
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
        let took = self.timeline.since_boot_start(&s.macs);
        self.timeline.witness(
            Who::Uuid(&s.id, &s.macs),
            Step::Registered { uuid: s.id.clone() },
        );
        if let Some(took) = took {
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

/// A registration inside the write transaction. `window_hash`: the hash of a per-boot
/// secret that is none of the boot-bound ones (so it may be a window's); `None`: the
/// registration may create a server, or re-register one unchanged.
fn register_in(
    t: &Tx<'_>,
    reg: &ValidRegistration,
    window_hash: Option<&str>,
    source: IpAddr,
    rules: &WindowsConfig,
    max_unaccepted: usize,
) -> crate::inventory::Result<Registered> {
    let now = now();
    let Some(hash) = window_hash else {
        return register_unproven(t, reg, source, now, max_unaccepted);
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
    max_unaccepted: usize,
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
        if max_unaccepted > 0 && t.unaccepted()? >= max_unaccepted {
            return Ok(Registered::Refused(
                "unaccepted_cap",
                format!(
                    "{max_unaccepted} servers already wait to be accepted (policy.max_unaccepted): accept or delete some first"
                ),
                None,
            ));
        }
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
