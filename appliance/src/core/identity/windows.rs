//! Windows: opened (a BMC power-on), armed (an operator), closed; a boot admitted
//! through its server's window, and the boot-bound secrets of unknown machines.

use std::net::IpAddr;
use std::sync::Arc;

use super::super::{Core, Result, ServerEvent, blocking};
use super::*;
use crate::inventory::now;
use crate::metrics::Metrics;

/// The secrets one boot script carries.
#[derive(Debug, Default, Clone)]
pub(in crate::core) struct BootSecretsFor {
    /// For `/configdata` (`boot_token` in templates).
    pub config: Option<String>,
    /// For registration (`registration_token` in templates).
    pub registration: Option<String>,
}

impl Core {
    pub(super) fn window_event(&self, event: &'static str) {
        Metrics::inc(&self.metrics.provisioning_windows, "event", event);
    }

    pub(super) fn issued(&self, kind: &'static str) {
        Metrics::inc(&self.metrics.secrets_issued, "kind", kind);
    }

    /// Raises an alarm everywhere it must show: a log line with both sources, a
    /// metric, and the Kubernetes event (through the subscribers).
    pub(super) fn raise(&self, s: &Server, alarm: &Alarm) {
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
        self.audit.record(
            "appliance",
            Some(alarm.second.source),
            format!("alarm_{}", alarm.kind.name()),
            Some(&s.id),
            crate::audit::Outcome::Refused,
            Some(alarm.message.clone()),
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
    pub(in crate::core) fn note_dhcp(&self, mac: &str) {
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
    pub(in crate::core) async fn admit_boot(
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
    pub(in crate::core) fn boot_bound_secret(
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
}

fn requester_source(s: &Server) -> String {
    s.window
        .as_ref()
        .and_then(|w| w.claimant.as_ref())
        .map(|c| c.to_string())
        .unwrap_or_default()
}
