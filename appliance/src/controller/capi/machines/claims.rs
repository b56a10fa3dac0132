//! A Server's cluster-wide claim: its `status.claim`, taken and cleared with a
//! resourceVersion precondition, so of two machines (or two appliances) racing for one
//! server exactly one wins and the other hears 409 and tries the next.

use kube::api::Patch;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::super::{RETRY, patch_params};
use super::report::{Blocked, Step};
use crate::controller::resources::{
    APPLIANCE_LABEL, CLAIM_UID_ANNOTATION, MetalMachine, Server as ServerResource, ServerClaim,
};
use crate::controller::{Context, server_classes};

/// The label selector of the Servers this appliance discovered.
pub(super) fn own_servers_selector(ctx: &Context) -> String {
    format!("{APPLIANCE_LABEL}={}", ctx.identity)
}

/// Whether this appliance discovered `s` (and so reconciles what holds it).
pub(super) fn ours(ctx: &Context, s: &ServerResource) -> bool {
    s.labels().get(APPLIANCE_LABEL) == Some(&ctx.identity)
}

pub(super) fn claim_of(s: &ServerResource) -> Option<&ServerClaim> {
    s.status.as_ref().and_then(|st| st.claim.as_ref())
}

/// `namespace/name` of `mm`: the machine a claim names.
pub(super) fn machine_key(mm: &MetalMachine) -> String {
    format!("{}/{}", mm.namespace().unwrap_or_default(), mm.name_any())
}

/// The uid naming `mm`'s claim: the one it had when it first claimed
/// ([`CLAIM_UID_ANNOTATION`], kept across `clusterctl move`), else its own.
pub(super) fn claim_uid(mm: &MetalMachine) -> String {
    mm.annotations()
        .get(CLAIM_UID_ANNOTATION)
        .filter(|u| !u.is_empty())
        .cloned()
        .unwrap_or_else(|| mm.uid().unwrap_or_default())
}

/// Whether `s` is claimed by machine `machine` (`namespace/name`) with claim uid `uid`:
/// both, so a machine elsewhere that copies another's annotation holds nothing.
pub(super) fn held_by(s: &ServerResource, machine: &str, uid: &str) -> bool {
    claim_of(s).is_some_and(|c| c.machine == machine && c.uid == uid)
}

/// Whether this appliance holds a claim for the machine of claim uid `uid` (taken in
/// this process, or shown by the watch of its Servers).
pub(super) fn holds_claim(ctx: &Context, uid: &str) -> bool {
    ctx.caches.claim(uid).is_some()
        || ctx
            .caches
            .servers
            .state()
            .iter()
            .any(|s| claim_of(s).is_some_and(|c| c.uid == uid))
}

/// Why `s` cannot be given to a new machine, if it cannot.
pub(super) fn unavailable(s: &ServerResource) -> Option<(&'static str, String)> {
    let name = s.name_any();
    let status = s.status.clone().unwrap_or_default();
    if let Some(c) = &status.claim {
        return Some((
            "ServerInUse",
            format!("Server {name} is in use by {}", c.machine),
        ));
    }
    if !s.spec.accepted {
        return Some((
            "ServerNotAccepted",
            format!("Server {name} is not accepted (spec.accepted)"),
        ));
    }
    if s.spec.cordoned {
        return Some(("ServerCordoned", format!("Server {name} is cordoned")));
    }
    if !status.clean.unwrap_or(true) {
        return Some((
            "ServerNotClean",
            format!("Server {name} waits for its wipe"),
        ));
    }
    None
}

/// Takes the claim on `s` for `claim`, atomically: a merge patch carrying the
/// resourceVersion read, so a concurrent claim makes this one fail with a conflict.
async fn take_claim(
    ctx: &Context,
    s: &ServerResource,
    claim: &ServerClaim,
) -> Result<ServerResource, kube::Error> {
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let patch = json!({
        "metadata": {"resourceVersion": s.resource_version()},
        "status": {"inUse": true, "claim": claim},
    });
    servers
        .patch_status(&s.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await
}

/// The named Server, claimed (or already ours).
pub(super) async fn claim_named(
    ctx: &Context,
    s: &ServerResource,
    claim: &ServerClaim,
) -> Result<ServerResource, Step> {
    if held_by(s, &claim.machine, &claim.uid) {
        return Ok(s.clone());
    }
    // The inventory holds this very claim while the Server shows none: its status was
    // lost (`clusterctl move` does not carry status) and the appliance's own push may
    // show it in use and not clean already. The claim is taken back as it stands.
    let local = inventory_claim(ctx, s).await;
    if claim_of(s).is_none()
        && local
            .as_ref()
            .is_some_and(|c| c.same_holder(&claim.machine, &claim.uid))
    {
        tracing::info!(server = %s.name_any(), machine = %claim.machine, "the Server lost its claim's status; taking it back for the machine that holds it");
        return Ok(take_claim(ctx, s, claim).await?);
    }
    if let Some((reason, message)) = unavailable(s) {
        return Err(Blocked::failed(reason, message, RETRY * 2).into());
    }
    // The Server may not show it yet (moved here, its status not pushed): the local
    // record of another machine's claim decides.
    if let Some(held) = local {
        return Err(Blocked::failed(
            "ServerInUse",
            format!("Server {} is in use by {}", s.name_any(), held.machine),
            RETRY * 2,
        )
        .into());
    }
    Ok(take_claim(ctx, s, claim).await?)
}

/// The claim this appliance's inventory holds on `s`, if any (an unreadable record
/// reads as none: the Server's own status then decides).
async fn inventory_claim(ctx: &Context, s: &ServerResource) -> Option<crate::inventory::Claim> {
    ctx.core
        .server(&crate::controller::servers::inventory_id(s))
        .await
        .ok()
        .and_then(|local| local.provisioning.claim)
}

/// Whether this appliance's inventory holds `s` for machine `machine` with claim `uid`.
pub(super) async fn inventory_holds(
    ctx: &Context,
    s: &ServerResource,
    machine: &str,
    uid: &str,
) -> bool {
    inventory_claim(ctx, s)
        .await
        .is_some_and(|c| c.same_holder(machine, uid))
}

/// A free Server of `class` (this appliance's own), claimed; the first that can be.
/// `pinned`: the machine asks for this rack (its failure domain), which the reason for
/// finding none then names; else the reason is the same whichever rack gives it.
/// Candidates come from the watch-fed caches (no LIST); the claim itself is a write with
/// the cached resourceVersion as its precondition, so a stale entry only costs a 409.
pub(super) async fn claim_from_class(
    ctx: &Context,
    class: &str,
    claim: &ServerClaim,
    pinned: bool,
) -> Result<ServerResource, Step> {
    // A claim this process took that the cache does not show yet: that server, again.
    if let Some(name) = ctx.caches.claim(&claim.uid) {
        let servers: Api<ServerResource> = Api::all(ctx.client.clone());
        if let Some(s) = servers.get_opt(&name).await?
            && held_by(&s, &claim.machine, &claim.uid)
        {
            return Ok(s);
        }
        ctx.caches.forget_claim(&claim.uid);
    }
    if !ctx.caches.ready().await {
        return Err(Blocked::waiting(
            "WaitingForCaches",
            "the watches of Servers and ServerClasses have not listed yet",
        )
        .retry(RETRY)
        .into());
    }
    let Some(class_obj) = ctx.caches.class(class) else {
        return Err(Blocked::failed(
            "ServerClassNotFound",
            format!("ServerClass {class} does not exist"),
            RETRY * 2,
        )
        .into());
    };
    let mut all = ctx.caches.servers.state();
    // A restart after claiming but before binding finds its own claim first.
    if let Some(mine) = all.iter().find(|s| held_by(s, &claim.machine, &claim.uid)) {
        return Ok(ServerResource::clone(mine));
    }
    all.sort_by_key(|s| s.name_any());
    let mut raced = false;
    for s in all
        .iter()
        .filter(|s| server_classes::matches(&class_obj.spec, s) && unavailable(s).is_none())
    {
        // Free by its status, held by the local record (moved here, status not pushed
        // yet): not a candidate.
        if inventory_claim(ctx, s).await.is_some() {
            continue;
        }
        match take_claim(ctx, s, claim).await {
            Ok(taken) => {
                ctx.caches.claimed(&claim.uid, &taken.name_any());
                return Ok(taken);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => raced = true,
            Err(e) => return Err(e.into()),
        }
    }
    let why = if raced {
        "every free server was claimed by another machine first"
    } else {
        "no server of the class is accepted, clean, uncordoned and free"
    };
    let place = if pinned {
        format!("in rack {}", ctx.identity)
    } else {
        "in any rack".to_string()
    };
    Err(Blocked::failed(
        "NoFreeServer",
        format!("ServerClass {class}: {why} {place}"),
        RETRY * 3,
    )
    .into())
}

/// Clears the claim on `s` if `uid` holds it; `dirty`: the server waits for its wipe.
pub(super) async fn release_claim(
    ctx: &Context,
    s: &ServerResource,
    uid: &str,
    dirty: bool,
) -> Result<(), kube::Error> {
    ctx.caches.forget_claim(uid);
    if claim_of(s).is_none_or(|c| c.uid != uid) {
        // Read again: the object in hand may predate our own claim.
        let servers: Api<ServerResource> = Api::all(ctx.client.clone());
        let Some(fresh) = servers.get_opt(&s.name_any()).await? else {
            return Ok(());
        };
        if claim_of(&fresh).is_none_or(|c| c.uid != uid) {
            return Ok(());
        }
        return clear_claim(ctx, &fresh, dirty).await;
    }
    clear_claim(ctx, s, dirty).await
}

async fn clear_claim(ctx: &Context, s: &ServerResource, dirty: bool) -> Result<(), kube::Error> {
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let patch = json!({
        "metadata": {"resourceVersion": s.resource_version()},
        "status": {"inUse": false, "claim": null, "clean": !dirty},
    });
    servers
        .patch_status(&s.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
