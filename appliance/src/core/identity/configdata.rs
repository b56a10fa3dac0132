//! `/configdata` and its done report: the window's token checked and spent inside one
//! write transaction, honest retries, replays that raise the alarm.

use std::net::IpAddr;
use std::sync::Arc;

use super::super::{Core, CoreError, Result, blocking, secret_eq};
use super::*;
use crate::audit::Outcome;
use crate::inventory::{InstalledBy, Tx, now};
use crate::metrics::Metrics;
use crate::timeline::{Step, Who};

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

impl Core {
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
                    self.timeline.witness(
                        Who::Uuid(&s.id, &s.macs),
                        Step::ConfigServed {
                            to: source.to_string(),
                        },
                    );
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
        let (outcome, detail) = match &result {
            Ok(_) => (Outcome::Ok, None),
            Err(e) => (crate::core::audit_outcome(e), Some(e.to_string())),
        };
        self.audit.record(
            format!("machine {uuid}"),
            Some(source),
            "config_served",
            Some(uuid),
            outcome,
            detail,
        );
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
                self.audit.record(
                    format!("machine {uuid}"),
                    Some(source),
                    "install_reported",
                    Some(uuid),
                    crate::core::audit_outcome(&e),
                    Some(e.to_string()),
                );
                e
            })?;
        if server.provisioning.claim.is_none() {
            self.step("installed", "not_claimed");
            return Err(CoreError::Invalid(format!(
                "server {} is not claimed by a machine: nothing was being installed",
                server.id
            )));
        }
        self.timeline
            .witness(Who::Uuid(&server.id, &server.macs), Step::Done);
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
