//! The core's part in Cluster API provisioning: a server claimed for a machine with its
//! bootstrap configuration staged (sealed) for `/configdata`, the boots of its cluster
//! life (install, then the local disk; after release, the wipe environment), the
//! installation recorded as done, and release. Who may fetch the configuration, report
//! the installation or the wipe is [`super::identity`]'s to say.
//!
//! The Kubernetes controller holds the cluster-wide lock (the Server's `status.claim`,
//! taken with a resourceVersion precondition); this module keeps the local truth the boot
//! path reads, so a machine boots correctly while the control plane is away. Every step
//! is idempotent: the controller repeats them after a restart.

use std::sync::Arc;

use super::policy::BootAction;
use super::{Core, CoreError, Result, blocking};
use crate::inventory::{Claim, InstalledBy, Server, now};

/// Who claims a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// `namespace/name` of the MetalMachine.
    pub machine: String,
    pub uid: String,
    pub cluster: Option<String>,
    /// The uid of the Server object the claim is taken through (one management
    /// cluster's copy of the Server).
    pub server_object: Option<String>,
}

impl Core {
    pub(super) fn step(&self, step: &'static str, result: &'static str) {
        self.metrics
            .provisioning_steps
            .get_or_create(&[("step", step), ("result", result)])
            .inc();
    }

    /// Claims server `id` for a machine and stages `config` (its bootstrap data) for
    /// `/configdata`. Refused with a conflict when another machine holds it or it waits
    /// for a wipe; the same machine claiming again refreshes the configuration only.
    pub async fn claim_server(
        &self,
        id: &str,
        req: ClaimRequest,
        config: Vec<u8>,
    ) -> Result<Server> {
        let config = self
            .sealer
            .seal_config(id, &config)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let claim = Claim {
            machine: req.machine.clone(),
            uid: req.uid.clone(),
            cluster: req.cluster.clone(),
            claimed_at: now(),
            powered_at: None,
            config_served_at: None,
            installed_at: None,
            installed_by: None,
            paused: false,
            server_object: req.server_object.clone(),
        };
        let (s, fresh) = blocking(move || Ok(inv.claim(&key, claim, &config)?))
            .await
            .inspect_err(|e| self.step("claim", e.kind()))?;
        if fresh {
            self.step("claim", "ok");
            tracing::info!(id = %s.id, machine = %req.machine, cluster = req.cluster.as_deref(), "server claimed");
            self.changed(&s.id);
        }
        Ok(s)
    }

    /// Releases server `id` from the machine `uid` (any machine with `None`): its
    /// configuration is dropped and it is dirty until the wipe environment reports, when
    /// `wipe`; else it is free at once. Releasing a server nobody holds does nothing.
    pub async fn release_server(&self, id: &str, uid: Option<&str>, wipe: bool) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let (key, uid) = (id.to_string(), uid.map(String::from));
        let (s, released) = blocking(move || Ok(inv.release(&key, uid.as_deref(), wipe)?))
            .await
            .inspect_err(|e| self.step("release", e.kind()))?;
        if released {
            self.step("release", if wipe { "wipe" } else { "free" });
            tracing::info!(id = %s.id, wipe, "server released");
            self.changed(&s.id);
        }
        Ok(s)
    }

    /// Records that the machine of claim `uid` was sent into its install environment.
    pub async fn mark_powered(&self, id: &str, uid: &str) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let (key, uid) = (id.to_string(), uid.to_string());
        let s = blocking(move || {
            Ok(inv.update(&key, |s| {
                if let Some(c) = &mut s.provisioning.claim
                    && c.uid == uid
                {
                    c.powered_at.get_or_insert_with(now);
                }
            })?)
        })
        .await?;
        self.step("powered", "ok");
        Ok(s)
    }

    /// Records whether the Cluster of the machine holding server `id` (its
    /// `namespace/name` and claim uid) is paused. `None` when that machine does not hold
    /// it (nothing is recorded), else whether the record changed.
    pub async fn pause_claim(
        &self,
        id: &str,
        machine: &str,
        uid: &str,
        paused: bool,
    ) -> Result<Option<bool>> {
        let inv = Arc::clone(&self.inventory);
        let (key, machine, uid) = (id.to_string(), machine.to_string(), uid.to_string());
        let (s, changed) = blocking(move || {
            let mut changed = None;
            let s = inv.update(&key, |s| {
                if let Some(c) = &mut s.provisioning.claim
                    && c.same_holder(&machine, &uid)
                {
                    changed = Some(c.paused != paused);
                    c.paused = paused;
                }
            })?;
            Ok((s, changed))
        })
        .await?;
        if changed == Some(true) {
            tracing::info!(id = %s.id, paused, "claim's cluster paused");
        }
        Ok(changed)
    }

    /// Records the installation as done (once; a repeat keeps the first time).
    pub(super) async fn mark_installed(&self, id: &str, how: InstalledBy) -> Result<Server> {
        let inv = Arc::clone(&self.inventory);
        let key = id.to_string();
        let (s, first) = blocking(move || {
            let mut first = false;
            let s = inv.update(&key, |s| {
                if let Some(c) = &mut s.provisioning.claim
                    && c.installed_at.is_none()
                {
                    c.installed_at = Some(now());
                    c.installed_by = Some(how);
                    first = true;
                }
            })?;
            Ok((s, first))
        })
        .await?;
        if first {
            self.step("installed", how.as_str());
            tracing::info!(id = %s.id, how = how.as_str(), "installation done");
            self.changed(&s.id);
        }
        Ok(s)
    }

    /// The boot a server's cluster life decides, before any policy: a claimed machine
    /// with its configuration installs (its environment, or the default one), then boots
    /// its disk once installed or booted again after fetching its configuration; a
    /// released one waiting for a wipe boots the wipe environment. `None`: the policy
    /// decides. The flag says the boot itself shows the installation done.
    pub(super) fn lifecycle_boot(&self, s: &Server) -> Option<(BootAction, bool)> {
        let p = &s.provisioning;
        match &p.claim {
            Some(c) if s.has_config => {
                if c.installed_at.is_some() {
                    return Some((BootAction::LocalDisk, false));
                }
                if c.config_served_at.is_some() {
                    return Some((BootAction::LocalDisk, true));
                }
                let env = s
                    .environment
                    .clone()
                    .or_else(|| self.config.policy.default_environment.clone());
                Some((
                    match env {
                        Some(env) => BootAction::Environment(env),
                        None => BootAction::Deny(format!(
                            "claimed by {} but no environment to install with: set the Server's environmentRef or policy.default_environment",
                            c.machine
                        )),
                    },
                    false,
                ))
            }
            Some(_) => None,
            None if p.wipe_requested_at.is_some() => Some((BootAction::Wipe, false)),
            None => None,
        }
    }

    /// After a boot the lifecycle decided: a boot after the configuration was fetched
    /// marks the installation done.
    pub(super) async fn after_lifecycle_boot(&self, id: &str, installed: bool) {
        if installed && let Err(e) = self.mark_installed(id, InstalledBy::Rebooted).await {
            self.step("installed", e.kind());
            tracing::warn!(id, error = %e, "cannot record the installation as done");
        }
    }
}
