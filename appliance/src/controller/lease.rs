//! Leader election on a `coordination.k8s.io/v1` Lease: one active replica per appliance
//! identity.
//!
//! kube-runtime has no leader election, and the one rule needed is small: take the Lease
//! when it is free or expired, renew it well inside its duration, and step down (cancel
//! the leader's work) as soon as a renewal cannot be confirmed in time. Every write goes
//! through the Lease's `resourceVersion`, so two replicas can never both think they won.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio_util::sync::CancellationToken;

/// How long a Lease holds without renewal.
pub const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// One replica's candidacy for a Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    holder: String,
}

impl Elector {
    /// Competes for Lease `name` as `holder` (unique per replica).
    pub fn new(api: Api<Lease>, name: String, holder: String) -> Self {
        Elector { api, name, holder }
    }

    fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(MicroTime(renewed)) = spec.renew_time.as_ref() else {
            return true;
        };
        let secs = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        now.as_second() - renewed.as_second() > secs
    }

    /// One attempt to take or keep the Lease; `Ok(true)` when we hold it now.
    async fn try_hold(&self) -> kube::Result<bool> {
        let now = Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.holder.clone()),
                        lease_duration_seconds: Some(LEASE_SECONDS),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Another replica created it first.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let ours = spec.holder_identity.as_deref() == Some(self.holder.as_str());
                if !ours && !Self::expired(spec, now) {
                    return Ok(false);
                }
                if !ours {
                    spec.holder_identity = Some(self.holder.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(LEASE_SECONDS);
                spec.renew_time = Some(MicroTime(now));
                // The resourceVersion read above makes this a compare-and-swap.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica holds the Lease (or `cancel` fires: `false`, even while
    /// the Lease is still ours, or a stopping leader would take it again and again).
    pub async fn acquire(&self, cancel: &CancellationToken) -> bool {
        loop {
            if cancel.is_cancelled() {
                return false;
            }
            match self.try_hold().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, holder = %self.holder, "leading");
                    return true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot reach the Lease"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Gives the Lease up (a stopping leader), so another replica takes over at once
    /// instead of after the Lease expires. Best effort: it expires anyway.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "Lease released"),
            Err(e) => tracing::debug!(lease = %self.name, error = %e, "cannot release the Lease"),
        }
    }

    /// Renews the Lease until a renewal fails for longer than it allows, or `cancel`
    /// fires; returns when leadership ends.
    pub async fn hold(&self, cancel: &CancellationToken) {
        let mut last_ok = tokio::time::Instant::now();
        // Step down with margin: another replica may take over once the Lease expires.
        let give_up = Duration::from_secs(LEASE_SECONDS as u64) - RENEW_EVERY;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match self.try_hold().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!(lease = %self.name, "another replica took the Lease; stepping down");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot renew the Lease");
                    if last_ok.elapsed() > give_up {
                        tracing::warn!(lease = %self.name, "Lease not renewed in time; stepping down");
                        return;
                    }
                }
            }
        }
    }
}
