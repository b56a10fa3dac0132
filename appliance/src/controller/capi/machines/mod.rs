//! MetalMachine: one Cluster API Machine on one bare-metal Server.
//!
//! A reconcile walks the machine's life one step at a time, each step idempotent, so an
//! appliance restart or an apiserver outage in the middle only repeats steps:
//!
//! 1. wait for the owner Machine, its Cluster's infrastructure and the Machine's
//!    bootstrap data Secret;
//! 2. claim a Server: the one in `serverRef`, or a free one of `serverClassRef`'s class
//!    (accepted, clean, uncordoned, not in use), among this appliance's own. The claim is
//!    the Server's `status.claim`, written with a resourceVersion precondition, so of two
//!    machines racing for one server exactly one wins; the loser tries the next;
//! 3. bind: `spec.serverRef` and `spec.providerID` (`arges://<uuid>`);
//! 4. stage the bootstrap data in the local inventory (the core then serves it at
//!    `/configdata` to that machine only, and boots it into its install environment);
//! 5. power: the MetalMachine's `bmc` (credentials from a Secret preferred) or the
//!    Server's; next boot PXE, then a power cycle (or on, when it is off), which opens
//!    the Server's provisioning window (its configuration goes only to the first
//!    machine to boot in it). A Server without a BMC waits until an operator arms it
//!    (`spec.arm`) and powers it by hand. A tripped window stops here until re-armed;
//! 6. report: `status.addresses` from the Server's NICs, `initialization.provisioned`,
//!    and the `Installed` condition once the install environment reports.
//!
//! Deleting releases the Server before the finalizer goes: the claim and configuration
//! are dropped, the machine is wiped (next boot PXE into the wipe environment, power
//! cycle) or powered off, as the Server's `spec.release` (else `[kubernetes] release`)
//! says, and only then is the Server's claim cleared. A sweep releases servers whose
//! machine is gone without a word, or bound to another server.
//!
//! `clusterctl move` copies a cluster's objects to another management cluster (new
//! uids, no status) and deletes them here. A claim is named by the machine's
//! `namespace/name` and the uid it first claimed with, kept in the
//! `metal.arges.dev/claim-uid` annotation, so the moved machine holds its server still:
//! it takes the Server's lost `status.claim` back and walks on to Ready, without a power
//! operation or a boot. An unpaused machine carries clusterctl's block-move mark; the
//! pause that precedes a move is recorded with the claim in the inventory before the
//! mark goes, so the sweep keeps a server whose machine moved away, and a deletion
//! marked `delete-for-move` gives nothing back.
//!
//! Every step that waits or fails sets the `Ready` condition's reason, with an event
//! when the reason changes (`report.rs`). The steps are `provision.rs`'s, one function
//! each; the cluster-wide claim is `claims.rs`'s; release and the sweep are
//! `release.rs`'s; sending a machine into PXE is `power.rs`'s, shared by install and
//! wipe. `tests.rs` runs reconciles against a scripted apiserver.

use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{DynamicObject, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{RETRY, ReconcileError, capi_watch, count, patch_params};
use crate::controller::Context;
use crate::controller::resources::{MetalMachine, Server as ServerResource};
use crate::controller::servers::addresses;
use crate::inventory::InstalledBy;

mod claims;
mod placement;
mod power;
mod provision;
mod release;
mod report;
#[cfg(test)]
mod tests;

pub use placement::FirstSeen;
use provision::{Progress, provision};
use report::{Report, Step};

const KIND: &str = "MetalMachine";

/// Reconciles MetalMachines until `cancel` fires, and sweeps orphaned claims. The watch
/// of Cluster API's Machines feeds `machines` (the cache the steps read) and wakes each
/// Machine's MetalMachine after the cache has its change.
pub async fn run(
    ctx: Arc<Context>,
    machines: Writer<DynamicObject>,
    clusters: impl futures_util::Stream<Item = DynamicObject> + Send + 'static,
    cancel: CancellationToken,
) {
    let machines_cache = machines.as_reader();
    let capi_machines = capi_watch(&ctx, "Machine", "machines", machines, cancel.clone())
        .filter_map(|m| std::future::ready(infrastructure_of(&m)));
    // A Cluster's pause, unpause or provisioning wakes the MetalMachines of its Machines
    // (its other writes do not: a fleet's status updates cost no reconciles).
    let mut seen = std::collections::HashMap::new();
    let cluster_machines = clusters.flat_map(move |c| {
        let state = (
            super::paused(&c, Some(&c)),
            c.data["status"]["initialization"]["infrastructureProvisioned"].as_bool(),
        );
        let key = (c.namespace().unwrap_or_default(), c.name_any());
        let woken = if seen.insert(key, state) == Some(state) {
            Vec::new()
        } else {
            metal_machines_of(&machines_cache, &c)
        };
        futures_util::stream::iter(woken)
    });
    let machines: Api<MetalMachine> = ctx.capi_api();
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let controller = Controller::new(machines, watcher::Config::default());
    let sweep = tokio::spawn(release::sweep(
        Arc::clone(&ctx),
        controller.store(),
        cancel.clone(),
    ));
    controller
        // A Server's status shows its install progress (pushed from the inventory), so
        // the machine holding it hears of it.
        .watches(
            servers,
            watcher::Config::default().labels(&claims::own_servers_selector(&ctx)),
            |s: ServerResource| {
                s.status
                    .and_then(|st| st.claim)
                    .and_then(|c| machine_ref(&c.machine))
            },
        )
        .reconcile_on(capi_machines)
        .reconcile_on(cluster_machines)
        .graceful_shutdown_on(cancel.cancelled_owned())
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "MetalMachine reconcile did not run");
            }
        })
        .await;
    let _ = sweep.await;
}

/// The MetalMachine a Machine's `spec.infrastructureRef` names, if it names one.
fn infrastructure_of(m: &DynamicObject) -> Option<ObjectRef<MetalMachine>> {
    let ns = m.namespace()?;
    let infra = &m.data["spec"]["infrastructureRef"];
    (infra["kind"] == KIND)
        .then(|| {
            infra["name"]
                .as_str()
                .map(|n| ObjectRef::new(n).within(&ns))
        })
        .flatten()
}

/// The MetalMachines of the Machines of `cluster`, as the cache of Machines has them.
fn metal_machines_of(
    machines: &kube::runtime::reflector::Store<DynamicObject>,
    cluster: &DynamicObject,
) -> Vec<ObjectRef<MetalMachine>> {
    let (ns, name) = (cluster.namespace(), cluster.name_any());
    machines
        .state()
        .iter()
        .filter(|m| m.namespace() == ns && m.data["spec"]["clusterName"].as_str() == Some(&name))
        .filter_map(|m| infrastructure_of(m))
        .collect()
}

/// `namespace/name` as a reference.
fn machine_ref(key: &str) -> Option<ObjectRef<MetalMachine>> {
    let (ns, name) = key.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

fn error_policy(mm: Arc<MetalMachine>, e: &ReconcileError, ctx: Arc<Context>) -> Action {
    count(&ctx, KIND, e.kind());
    if e.kind() == "conflict" {
        // Someone wrote first (a claim race, a status update): look again now.
        tracing::debug!(metalmachine = %mm.name_any(), error = %e, "conflict; reconciling again");
        return Action::requeue(std::time::Duration::from_millis(200));
    }
    tracing::warn!(metalmachine = %mm.name_any(), error = %e, "MetalMachine reconcile failed; retrying");
    Action::requeue(RETRY)
}

async fn reconcile(mm: Arc<MetalMachine>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = mm.namespace().unwrap_or_default();
    let api: Api<MetalMachine> = Api::namespaced(ctx.client.clone(), &ns);
    if mm.meta().deletion_timestamp.is_some() {
        return release::delete(&mm, &api, &ctx).await;
    }
    let mut report = Report::new(&mm);
    let action = match provision(&mm, &api, &ctx, &mut report).await {
        Ok(Progress::Done(s)) => {
            report_provisioned(&mut report, &s);
            let placed = Placed {
                addresses: addresses(&s),
                rack: Some(&ctx.identity),
            };
            write_status(&api, &mm, &report, true, placed).await?;
            count(&ctx, KIND, "ok");
            Action::await_change()
        }
        Ok(Progress::NotOurs) => return Ok(Action::await_change()),
        Ok(Progress::NotYet(wait)) => return Ok(Action::requeue(wait)),
        Ok(Progress::Paused) => {
            write_status_best_effort(&api, &mm, &report).await;
            count(&ctx, KIND, "paused");
            // The Cluster watch wakes the machine when it is unpaused; this is a backstop.
            return Ok(Action::requeue(RETRY * 6));
        }
        Err(Step::Blocked(b)) => {
            let was = mm
                .status
                .as_ref()
                .and_then(|s| s.initialization.as_ref())
                .is_some_and(|i| i.provisioned);
            // Said once per reason; the retries that follow are quiet.
            if report.blocked(&b) && b.warning {
                tracing::warn!(metalmachine = %mm.name_any(), reason = b.reason, message = %b.message, "MetalMachine blocked");
            }
            let kept = mm
                .status
                .as_ref()
                .map(|s| s.addresses.iter().map(|a| json!(a)).collect())
                .unwrap_or_default();
            let placed = Placed {
                addresses: kept,
                rack: None,
            };
            write_status(&api, &mm, &report, was, placed).await?;
            count(&ctx, KIND, if b.warning { "blocked" } else { "waiting" });
            b.retry.map_or(Action::requeue(RETRY * 6), Action::requeue)
        }
        Err(Step::Error(e)) => {
            // The conditions this pass changed are written, so their events go out now:
            // the next pass finds them set and says nothing.
            write_status_best_effort(&api, &mm, &report).await;
            publish_events(&ctx, &mm, report).await;
            return Err(e);
        }
    };
    publish_events(&ctx, &mm, report).await;
    Ok(action)
}

/// The events of the condition changes a pass made.
async fn publish_events(ctx: &Context, mm: &MetalMachine, report: Report) {
    for note in report.events {
        ctx.publish(
            &mm.object_ref(&()),
            note.warning,
            &note.reason,
            "Provision",
            &note.message,
        )
        .await;
    }
}

/// `Ready` and `Installed` of a machine that is claimed, staged and powered.
fn report_provisioned(report: &mut Report, s: &crate::inventory::Server) {
    let server = &s.id;
    match s.provisioning.claim.as_ref().and_then(|c| c.installed_by) {
        Some(how) => {
            report.done(
                "Installed",
                match how {
                    InstalledBy::Reported => "InstallReported",
                    InstalledBy::Rebooted => "BootedAfterInstall",
                },
                "the install environment fetched its configuration and finished",
            );
            report.done(
                "Ready",
                "Provisioned",
                &format!("server {server} is installed"),
            );
        }
        None => {
            report.pending(
                "Installed",
                "Installing",
                "waiting for the install environment to fetch /configdata and report",
            );
            report.done(
                "Ready",
                "Provisioned",
                &format!("server {server} is powered and booting its install environment"),
            );
        }
    }
}

/// Where the machine is: its addresses, and its server's rack (its failure domain) once
/// provisioned.
struct Placed<'a> {
    addresses: Vec<serde_json::Value>,
    rack: Option<&'a str>,
}

async fn write_status(
    api: &Api<MetalMachine>,
    mm: &MetalMachine,
    report: &Report,
    provisioned: bool,
    placed: Placed<'_>,
) -> Result<(), kube::Error> {
    let mut patch = json!({"status": {
        "ready": provisioned,
        "initialization": {"provisioned": provisioned},
        "addresses": placed.addresses,
        "conditions": report.conditions,
    }});
    if let Some(rack) = placed.rack {
        patch["status"]["failureDomain"] = json!(rack);
    }
    if shows_already(mm, &patch["status"]) {
        // A requeued wait that changed nothing costs no write.
        return Ok(());
    }
    api.patch_status(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Whether the machine's status has every field of `status` as given already.
fn shows_already(mm: &MetalMachine, status: &serde_json::Value) -> bool {
    let Some(current) = mm
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
    else {
        return false;
    };
    status
        .as_object()
        .is_some_and(|fields| fields.iter().all(|(k, v)| current.get(k) == Some(v)))
}

/// The conditions, when the reconcile ends in an error (the next one says more).
async fn write_status_best_effort(api: &Api<MetalMachine>, mm: &MetalMachine, report: &Report) {
    let patch = json!({"status": {"conditions": report.conditions}});
    if let Err(e) = api
        .patch_status(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(metalmachine = %mm.name_any(), error = %e, "cannot write the conditions");
    }
}
