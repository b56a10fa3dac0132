//! The Cluster API infrastructure provider (contract v1beta2): [`clusters`] reconciles
//! MetalClusters, [`machines`] MetalMachines, both run by the leader of each appliance
//! identity. MetalMachineTemplates need no reconciler: Cluster API clones them into
//! MetalMachines for MachineDeployments and control-plane providers.
//!
//! This module holds what both share: the Cluster API objects read as dynamic objects
//! (their Go types are Cluster API's, and only a few fields matter here) from watch-fed
//! caches of Machines and Clusters that keep only those fields ([`project`]), owner
//! lookup, the pause rule, conditions that keep their transition time, and the error
//! type.

pub mod clusters;
pub mod machines;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::caches::CapiStores;

/// Cluster API's group and the version this provider reads it at.
pub const CAPI_GROUP: &str = "cluster.x-k8s.io";
pub const CAPI_VERSION: &str = "v1beta2";
/// The finalizer on MetalMachines: the Server is released before the machine goes.
pub const FINALIZER: &str = "metalmachine.infrastructure.cluster.x-k8s.io/arges";
/// Field manager of the provider's writes (claims, bindings, statuses).
pub const FIELD_MANAGER: &str = "arges-capi";
/// Cluster API's pause annotation (also honoured on a Cluster's `spec.paused`).
const PAUSED: &str = "cluster.x-k8s.io/paused";
/// clusterctl's mark on the objects it deletes once `clusterctl move` copied them to
/// another management cluster: their deletion gives nothing back.
pub const DELETE_FOR_MOVE: &str = "clusterctl.cluster.x-k8s.io/delete-for-move";
/// clusterctl waits before moving while an object carries this: a machine holding a
/// claim carries it until its pause is recorded in the inventory, so the move never
/// outruns the record that keeps the sweep from releasing a machine that moved away.
pub const BLOCK_MOVE: &str = "clusterctl.cluster.x-k8s.io/block-move";
/// How long to wait before looking again at something outside our watches.
pub const RETRY: Duration = Duration::from_secs(5);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Core(#[from] crate::core::CoreError),
    #[error("the watches of Cluster API's Machines and Clusters have not listed yet")]
    NotListed,
}

impl ReconcileError {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Core(e) => e.kind(),
            ReconcileError::NotListed => "not_listed",
        }
    }
}

/// A Cluster API kind at [`CAPI_VERSION`], for dynamic access.
pub fn capi_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CAPI_GROUP, CAPI_VERSION, kind),
        plural,
    )
}

/// The owner of `obj` of Cluster API kind `kind` (any version), by name.
pub fn capi_owner<'a, K: Resource>(obj: &'a K, kind: &str) -> Option<&'a OwnerReference> {
    obj.meta().owner_references.iter().flatten().find(|o| {
        o.kind == kind
            && o.api_version
                .split_once('/')
                .is_some_and(|(g, _)| g == CAPI_GROUP)
    })
}

/// The caches of Machines and Clusters, once listed.
pub async fn capi_stores(ctx: &Context) -> Result<CapiStores, ReconcileError> {
    ctx.caches.capi().await.ok_or(ReconcileError::NotListed)
}

/// The Cluster `name` in `ns` as the cache shows it, or `None` when it does not exist
/// (yet).
pub fn cached_cluster(stores: &CapiStores, ns: &str, name: &str) -> Option<Arc<DynamicObject>> {
    let key = ObjectRef::new_with(name, capi_resource("Cluster", "clusters")).within(ns);
    stores.clusters.get(&key)
}

/// The Machine `name` in `ns` as the cache shows it.
pub fn cached_machine(stores: &CapiStores, ns: &str, name: &str) -> Option<Arc<DynamicObject>> {
    let key = ObjectRef::new_with(name, capi_resource("Machine", "machines")).within(ns);
    stores.machines.get(&key)
}

/// Keeps of a Cluster API object only what the provider reads (a Machine's cluster,
/// failure domain, bootstrap data and infrastructure reference; a Cluster's pause,
/// endpoint and infrastructure state; the metadata without managed fields), so a fleet's
/// Machines cost the leader a few hundred bytes each.
pub fn project(obj: &mut DynamicObject) {
    const KEPT: &[&[&str]] = &[
        &["spec", "clusterName"],
        &["spec", "failureDomain"],
        &["spec", "bootstrap", "dataSecretName"],
        &["spec", "infrastructureRef"],
        &["spec", "paused"],
        &["spec", "controlPlaneEndpoint"],
        &["status", "initialization", "infrastructureProvisioned"],
    ];
    let mut kept = serde_json::Value::Null;
    for path in KEPT {
        let mut from = &obj.data;
        for key in *path {
            from = &from[*key];
        }
        if from.is_null() {
            continue;
        }
        let mut to = &mut kept;
        for key in *path {
            to = &mut to[*key];
        }
        *to = from.clone();
    }
    obj.data = kept;
    obj.metadata.managed_fields = None;
}

/// Feeds `writer` from a watch of every `kind` (`plural`), projected, until `cancel`
/// fires; each applied object is handed on (the Machines' wake their MetalMachines).
pub fn capi_watch(
    ctx: &Context,
    kind: &str,
    plural: &str,
    writer: Writer<DynamicObject>,
    cancel: CancellationToken,
) -> impl futures_util::Stream<Item = DynamicObject> + Send + 'static {
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    let resource = capi_resource(kind, plural);
    let api: Api<DynamicObject> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
        None => Api::all_with(ctx.client.clone(), &resource),
    };
    let kind = kind.to_string();
    super::watch_until(api, watcher::Config::default(), cancel)
        .modify(project)
        .reflect(writer)
        .touched_objects()
        .filter_map(move |r| {
            let kept = match r {
                Ok(obj) => Some(obj),
                Err(e) => {
                    tracing::warn!(kind, error = %e, "Cluster API watch failed; retrying");
                    None
                }
            };
            std::future::ready(kept)
        })
}

/// Whether reconciling is paused: by the annotation on `obj` or on its Cluster, or the
/// Cluster's `spec.paused`.
pub fn paused<K: Resource>(obj: &K, cluster: Option<&DynamicObject>) -> bool {
    let annotated = |m: &std::collections::BTreeMap<String, String>| m.contains_key(PAUSED);
    annotated(obj.annotations())
        || cluster.is_some_and(|c| {
            annotated(c.annotations()) || c.data["spec"]["paused"].as_bool() == Some(true)
        })
}

/// Sets condition `type_` in `conditions`, keeping its transition time when its status
/// does not change. Whether the reason or status changed (worth an event).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> bool {
    let status = if status { "True" } else { "False" };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let fresh = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.chars().take(1024).collect(),
        observed_generation: generation,
        last_transition_time: now,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != fresh.status || c.reason != fresh.reason;
            let since = if c.status == fresh.status {
                c.last_transition_time.clone()
            } else {
                fresh.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: since,
                ..fresh
            };
            changed
        }
        None => {
            conditions.push(fresh);
            true
        }
    }
}

/// Patch parameters of the provider's writes (its own field manager).
pub fn patch_params() -> kube::api::PatchParams {
    kube::api::PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Counts one reconcile.
pub fn count(ctx: &Context, kind: &'static str, result: &'static str) {
    ctx.metrics()
        .capi_reconciles
        .get_or_create(&[("kind", kind), ("result", result)])
        .inc();
}

/// Runs both reconcilers until `cancel` fires (leadership lost or shutdown), with the
/// caches of Machines and Clusters they read.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let machines_writer = Writer::new(capi_resource("Machine", "machines"));
    let clusters_writer = Writer::new(capi_resource("Cluster", "clusters"));
    ctx.caches.capi.send_replace(Some(CapiStores {
        machines: machines_writer.as_reader(),
        clusters: clusters_writer.as_reader(),
    }));
    // The Cluster watch feeds its cache and wakes the Cluster's MetalMachines (a pause
    // must be seen at once: clusterctl move waits on it).
    let cluster_watch = capi_watch(&ctx, "Cluster", "clusters", clusters_writer, cancel.clone());
    let clusters = tokio::spawn(clusters::run(Arc::clone(&ctx), cancel.clone()));
    let machines = tokio::spawn(machines::run(
        Arc::clone(&ctx),
        machines_writer,
        cluster_watch,
        cancel.clone(),
    ));
    let _ = clusters.await;
    let _ = machines.await;
    ctx.caches.capi.send_replace(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_machine_keeps_what_the_provider_reads_and_no_more() {
        let mut m: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
            "metadata": {"name": "m", "namespace": "ns", "managedFields": [{"manager": "x"}]},
            "spec": {
                "clusterName": "c", "version": "v1.35.4", "failureDomain": "rack-a",
                "bootstrap": {"dataSecretName": "s", "configRef": {"name": "t"}},
                "infrastructureRef": {"kind": "MetalMachine", "name": "m"},
            },
            "status": {"conditions": [{"type": "Ready"}], "phase": "Running"},
        }))
        .expect("a Machine");
        project(&mut m);
        assert_eq!(
            m.data,
            serde_json::json!({"spec": {
                "clusterName": "c", "failureDomain": "rack-a",
                "bootstrap": {"dataSecretName": "s"},
                "infrastructureRef": {"kind": "MetalMachine", "name": "m"},
            }})
        );
        assert!(m.metadata.managed_fields.is_none());
        let mut c: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"paused": true, "controlPlaneEndpoint": {"host": "h", "port": 6443},
                     "topology": {"class": "x"}},
            "status": {"initialization": {"infrastructureProvisioned": true,
                                          "controlPlaneInitialized": true}},
        }))
        .expect("a Cluster");
        project(&mut c);
        assert_eq!(
            c.data,
            serde_json::json!({
                "spec": {"paused": true, "controlPlaneEndpoint": {"host": "h", "port": 6443}},
                "status": {"initialization": {"infrastructureProvisioned": true}},
            })
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_stays() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Waiting",
            "a",
            Some(1)
        ));
        let since = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(
            set_condition(&mut c, "Ready", false, "NoBMC", "b", Some(2)),
            "a new reason is a change"
        );
        assert_eq!(c[0].last_transition_time, since, "same status, same time");
        assert_eq!(
            (c[0].reason.as_str(), c[0].message.as_str()),
            ("NoBMC", "b")
        );
        assert!(!set_condition(
            &mut c,
            "Ready",
            false,
            "NoBMC",
            "c",
            Some(2)
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            true,
            "Provisioned",
            "d",
            Some(2)
        ));
        assert_ne!(c[0].last_transition_time, since, "a new status, a new time");
        assert_eq!(c.len(), 1);
    }
}
