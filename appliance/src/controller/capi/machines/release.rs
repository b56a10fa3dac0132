//! Giving a Server back: when its MetalMachine is deleted (the finalizer), and by the
//! sweep, for servers whose machine went without a word or was bound elsewhere.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{ListParams, Patch};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::super::{DELETE_FOR_MOVE, FINALIZER, ReconcileError, count, patch_params};
use super::claims::{
    claim_of, claim_uid, held_by, inventory_holds, machine_key, ours, own_servers_selector,
    release_claim,
};
use super::{KIND, power::network_boot};
use crate::bmc::PowerAction;
use crate::controller::Context;
use crate::controller::resources::{MetalMachine, ReleasePolicy, Server as ServerResource};
use crate::controller::servers::inventory_id;
use crate::core::CoreError;

/// How often servers held by machines that are gone are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// `Ready=False/Deleting` on the machine while its server is given back (by the
/// appliance that gives it back: one writer).
async fn say_deleting(mm: &MetalMachine, api: &Api<MetalMachine>, s: &ServerResource) {
    let mut report = super::report::Report::new(mm);
    report.quiet(
        "Ready",
        false,
        "Deleting",
        &format!("giving Server {} back", s.name_any()),
    );
    super::write_status_best_effort(api, mm, &report).await;
}

/// Releases the machine's Server, then lets the MetalMachine go.
pub(super) async fn delete(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    if !mm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    // Deleted by `clusterctl move` once copied to another management cluster: the machine
    // lives on there, its server with it. Nothing is given back (clusterctl takes the
    // finalizer off itself).
    if mm.annotations().contains_key(DELETE_FOR_MOVE) {
        tracing::info!(metalmachine = %machine_key(mm), "moved to another management cluster; its server stays claimed");
        count(ctx, KIND, "moved");
        return Ok(Action::await_change());
    }
    let (key, uid) = (machine_key(mm), claim_uid(mm));
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    if let Some(r) = &mm.spec.server_ref {
        if let Some(s) = servers.get_opt(&r.name).await? {
            if !ours(ctx, &s) {
                return Ok(Action::await_change());
            }
            // The inventory's word counts too: a machine moved here and deleted before
            // it took its Server's claim back holds the server all the same.
            if held_by(&s, &key, &uid) || inventory_holds(ctx, &s, &key, &uid).await {
                say_deleting(mm, api, &s).await;
                release_server(ctx, &s, &uid, Some(mm)).await?;
            }
        }
    } else {
        // Unbound: a claim taken just before a restart may still name this machine.
        let mine = servers
            .list(&ListParams::default().labels(&own_servers_selector(ctx)))
            .await?;
        for s in mine.items.iter().filter(|s| held_by(s, &key, &uid)) {
            release_server(ctx, s, &uid, Some(mm)).await?;
        }
    }
    let finalizers: Vec<&String> = mm.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    let patch =
        json!({"metadata": {"resourceVersion": mm.resource_version(), "finalizers": finalizers}});
    api.patch(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    count(ctx, KIND, "released");
    Ok(Action::await_change())
}

/// Gives a Server back: locally first (configuration dropped, wipe asked for), then the
/// power action, then the cluster-wide claim. A restart anywhere in between repeats the
/// steps; each is idempotent, and the claim goes last so nothing is released twice.
pub(super) async fn release_server(
    ctx: &Context,
    s: &ServerResource,
    uid: &str,
    machine: Option<&MetalMachine>,
) -> Result<(), ReconcileError> {
    let id = inventory_id(s);
    let name = s.name_any();
    let wipe = s
        .spec
        .release
        .map_or(ctx.wipe_on_release, |r| r == ReleasePolicy::Wipe);
    match ctx.core.release_server(&id, Some(uid), wipe).await {
        Ok(_) | Err(CoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let local = ctx.core.server(&id).await.ok();
    if local.as_ref().is_some_and(|l| l.bmc.is_some()) {
        let failure = if wipe {
            match network_boot(ctx, &id).await {
                Ok(Ok(_)) => None,
                Ok(Err(event)) => Some(event.message.unwrap_or_default()),
                Err(e) => Some(e.to_string()),
            }
        } else {
            match ctx.core.bmc_power(&id, PowerAction::Off).await {
                Ok(r) if r.event.ok => None,
                Ok(r) => Some(r.event.message.unwrap_or_default()),
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(why) = failure {
            // The release goes on: the server stays dirty (never reused before its wipe
            // reports), and the operator is told.
            let note = format!("releasing Server {name}: the power action failed: {why}");
            tracing::warn!(server = %name, %why, "release power action failed");
            if let Some(mm) = machine {
                ctx.publish(
                    &mm.object_ref(&()),
                    true,
                    "ReleasePowerFailed",
                    "Release",
                    &note,
                )
                .await;
            }
        }
    }
    // A BMC the machine lent the server goes with it.
    match ctx.core.forget_lent_bmc(&id, uid).await {
        Ok(_) | Err(CoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    release_claim(ctx, s, uid, wipe).await?;
    tracing::info!(server = %name, wipe, "server released by its machine");
    Ok(())
}

/// Releases servers whose claim names a MetalMachine that is gone (deleted with its
/// finalizer removed by hand, or recreated under the same name) or that was bound to
/// another server (another appliance bound it first, and giving this one back failed).
/// It reads the caches (this appliance's Servers, and `machines`, the reconciler's own
/// store): a sweep costs no request unless it finds something to release, which it then
/// reads again from the apiserver before acting.
pub(super) async fn sweep(
    ctx: Arc<Context>,
    machines: Store<MetalMachine>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !ctx.caches.ready().await || machines.wait_until_ready().await.is_err() {
            continue;
        }
        for s in ctx.caches.servers.state() {
            let Some(c) = claim_of(&s) else { continue };
            let Some((ns, name)) = c.machine.split_once('/') else {
                continue;
            };
            // A machine outside the watched namespace is not in the store: not ours to judge.
            if ctx.watch_namespace.as_deref().is_some_and(|w| w != ns) {
                continue;
            }
            let cached = machines.get(&ObjectRef::new(name).within(ns));
            if holds(cached.as_deref(), &c.uid, &s) {
                continue;
            }
            sweep_one(&ctx, &s).await;
        }
    }
}

/// Whether `mm` is still the machine of claim `uid` on `s`: unbound yet (between claim
/// and bind), or bound to it.
fn holds(mm: Option<&MetalMachine>, uid: &str, s: &ServerResource) -> bool {
    mm.is_some_and(|mm| {
        claim_uid(mm) == uid
            && mm
                .spec
                .server_ref
                .as_ref()
                .is_none_or(|r| r.name == s.name_any())
    })
}

/// Whether the inventory keeps the claim on `s` from the sweep: its Cluster was paused
/// (`clusterctl move` pauses, copies, then deletes here), or the claim was taken back
/// through another management cluster's copy of the Server (it moved there), so a
/// machine gone from this cluster lives on in another. A record that cannot be read
/// keeps it too: the sweep never releases on a guess.
async fn kept_here(ctx: &Context, s: &ServerResource) -> bool {
    match ctx.core.server(&inventory_id(s)).await {
        Ok(local) => local.provisioning.claim.is_some_and(|c| {
            c.paused
                || c.server_object
                    .as_deref()
                    .is_some_and(|o| Some(o) != s.uid().as_deref())
        }),
        Err(CoreError::NotFound(_)) => false,
        Err(_) => true,
    }
}

/// Releases `s` if the machine its claim names is gone or bound to another server, as
/// the apiserver says now.
async fn sweep_one(ctx: &Context, s: &ServerResource) {
    let Some(c) = claim_of(s) else { return };
    let Some((ns, name)) = c.machine.split_once('/') else {
        return;
    };
    let api: Api<MetalMachine> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_opt(name).await {
        Ok(mm) if holds(mm.as_ref(), &c.uid, s) => {}
        Ok(_) if kept_here(ctx, s).await => {
            tracing::debug!(server = %s.name_any(), machine = %c.machine, "the machine holding this server is gone from this cluster, but it was paused or moved away: kept");
        }
        Ok(_) => {
            tracing::warn!(server = %s.name_any(), machine = %c.machine, "the machine holding this server is gone or bound to another; releasing it");
            let uid = c.uid.clone();
            if let Err(e) = release_server(ctx, s, &uid, None).await {
                tracing::warn!(server = %s.name_any(), error = %e, "cannot release an orphaned server");
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot look up a claiming machine"),
    }
}
