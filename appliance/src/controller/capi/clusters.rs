//! MetalCluster: the infrastructure of one Cluster API cluster. Bare metal has nothing to
//! build for a whole cluster, so provisioning it is naming the control plane's endpoint:
//! `spec.controlPlaneEndpoint`, or the guide's first `apiEndpoints` entry copied into it
//! (Cluster API copies that field into the Cluster), or the Cluster's own
//! `spec.controlPlaneEndpoint` when the user set it there. Then `status.initialization.
//! provisioned` (and the v1beta1 `status.ready`) go true, once and for good as the
//! contract asks, with the `Ready` condition saying why or why not.
//!
//! Its failure domains are the racks: every appliance identity that holds accepted,
//! uncordoned servers, with `controlPlane` as that rack's `[kubernetes] control_plane`
//! says. They come from the class-count watch of every Server ([`Caches::racks`]), and
//! every MetalCluster is reconciled again when they change.
//!
//! [`Caches::racks`]: crate::controller::caches::Caches::racks

use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::Patch;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    RETRY, ReconcileError, cached_cluster, capi_owner, capi_stores, count, patch_params, paused,
    set_condition,
};
use crate::controller::Context;
use crate::controller::resources::{ApiEndpoint, FailureDomain, MetalCluster};

const KIND: &str = "MetalCluster";

/// Reconciles every MetalCluster until `cancel` fires.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let api: Api<MetalCluster> = ctx.capi_api();
    let racks = futures_util::stream::unfold(ctx.caches.racks.subscribe(), |mut rx| async {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(racks)
        .graceful_shutdown_on(cancel.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "MetalCluster reconcile did not run");
            }
        })
        .await;
}

/// The racks as the contract's failure domains, once known.
fn failure_domains(ctx: &Context) -> Option<Vec<FailureDomain>> {
    let racks = ctx.caches.racks.borrow().clone()?;
    Some(
        racks
            .into_iter()
            .map(|(name, control_plane)| FailureDomain {
                name,
                control_plane: Some(control_plane),
                attributes: Default::default(),
            })
            .collect(),
    )
}

fn error_policy(mc: Arc<MetalCluster>, e: &ReconcileError, ctx: Arc<Context>) -> Action {
    count(&ctx, KIND, e.kind());
    tracing::warn!(metalcluster = %mc.name_any(), error = %e, "MetalCluster reconcile failed; retrying");
    Action::requeue(RETRY)
}

async fn reconcile(mc: Arc<MetalCluster>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if mc.meta().deletion_timestamp.is_some() {
        // Nothing is held for a cluster as a whole: its machines release their servers.
        return Ok(Action::await_change());
    }
    let ns = mc.namespace().unwrap_or_default();
    let name = mc.name_any();
    let owner = capi_owner(&*mc, "Cluster").map(|o| o.name.clone());
    let stores = capi_stores(&ctx).await?;
    let cluster = owner
        .as_deref()
        .and_then(|o| cached_cluster(&stores, &ns, o));
    let api: Api<MetalCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = mc.status.clone().unwrap_or_default();
    if paused(&*mc, cluster.as_deref()) {
        // The contract: no write while paused but the Paused condition.
        if set_condition(
            &mut status.conditions,
            "Paused",
            true,
            "Paused",
            "the cluster or the MetalCluster is paused",
            mc.meta().generation,
        ) {
            let patch = json!({"status": {"conditions": status.conditions}});
            api.patch_status(&name, &patch_params(), &Patch::Merge(&patch))
                .await?;
        }
        count(&ctx, KIND, "paused");
        return Ok(Action::requeue(RETRY * 6));
    }
    set_condition(
        &mut status.conditions,
        "Paused",
        false,
        "NotPaused",
        "",
        mc.meta().generation,
    );
    // The endpoint: the MetalCluster's own, the guide's first apiEndpoints entry, or the
    // one the user gave the Cluster itself (the contract's "provided by other means").
    let given = |e: &ApiEndpoint| !e.host.is_empty() && e.port > 0;
    let from_cluster = cluster.as_ref().and_then(|c| {
        serde_json::from_value::<ApiEndpoint>(c.data["spec"]["controlPlaneEndpoint"].clone()).ok()
    });
    let endpoint = (mc.spec.control_plane_endpoint.clone().filter(given))
        .or_else(|| mc.spec.api_endpoints.first().cloned())
        .or_else(|| from_cluster.filter(given));
    let (ready, reason, message) = match (&owner, &endpoint) {
        (None, _) => (
            false,
            "WaitingForCluster",
            "no Cluster owns this MetalCluster yet".to_string(),
        ),
        (Some(_), None) => (
            false,
            "NoEndpoint",
            "set spec.controlPlaneEndpoint (or the first spec.apiEndpoints entry)".to_string(),
        ),
        (Some(_), Some(e)) => (
            true,
            "Provisioned",
            format!("the control plane answers at {}:{}", e.host, e.port),
        ),
    };
    let pp = patch_params();
    if ready && mc.spec.control_plane_endpoint != endpoint {
        api.patch(
            &name,
            &pp,
            &Patch::Merge(json!({"spec": {"controlPlaneEndpoint": endpoint}})),
        )
        .await?;
    }
    let changed = set_condition(
        &mut status.conditions,
        "Ready",
        ready,
        reason,
        &message,
        mc.meta().generation,
    );
    // The contract: once provisioned, always provisioned.
    let provisioned = ready
        || status
            .initialization
            .as_ref()
            .is_some_and(|i| i.provisioned);
    let mut patch = json!({"status": {
        "ready": provisioned,
        "initialization": {"provisioned": provisioned},
        "conditions": status.conditions,
    }});
    // Left alone until the watch of every Server has listed: never published half-known.
    if let Some(domains) = failure_domains(&ctx) {
        patch["status"]["failureDomains"] = if domains.is_empty() {
            serde_json::Value::Null
        } else {
            json!(domains)
        };
    }
    api.patch_status(&name, &pp, &Patch::Merge(&patch)).await?;
    if changed {
        ctx.publish(&mc.object_ref(&()), !ready, reason, "Provision", &message)
            .await;
    }
    count(&ctx, KIND, if ready { "ok" } else { "waiting" });
    Ok(if ready {
        Action::await_change()
    } else {
        Action::requeue(RETRY * 6)
    })
}
