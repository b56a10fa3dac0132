//! Provisioning one MetalMachine, one function per step (the numbers of the module doc
//! of [`super`]). Each step is idempotent: a reconcile walks them all from the start,
//! and a step already done costs a read at most.

use k8s_openapi::api::core::v1::Secret;
use std::sync::Arc;

use kube::api::{DynamicObject, Patch};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::super::{
    BLOCK_MOVE, FINALIZER, RETRY, cached_cluster, cached_machine, capi_owner, capi_stores,
    patch_params, paused,
};
use super::claims::{
    claim_from_class, claim_named, claim_uid, holds_claim, machine_key, ours, release_claim,
};
use super::placement::{self, Turn};
use super::power::network_boot;
use super::report::{Blocked, Report, Step};
use crate::bmc::PowerFailure;
use crate::controller::Context;
use crate::controller::caches::CapiStores;
use crate::controller::resources::{
    CLAIM_UID_ANNOTATION, MetalMachine, ObjectRef as SpecRef, Server as ServerResource, ServerClaim,
};
use crate::controller::servers::{BmcProblem, bmc_with_credentials, inventory_id};
use crate::core::{ClaimRequest, CoreError};
use crate::inventory::Server;

/// Where provisioning got to.
pub(super) enum Progress {
    /// Claimed, staged, powered: the Server's inventory record as it now is.
    Done(Box<Server>),
    /// The machine's Server belongs to another appliance: its leader reconciles it.
    NotOurs,
    /// The cluster (or the machine) is paused: nothing is done but saying so.
    Paused,
    /// Another rack is placed first for this machine: look again after this long.
    NotYet(std::time::Duration),
}

/// The Server `spec.serverRef` names, if any.
enum Named {
    Unnamed,
    Ours(Box<ServerResource>),
    /// Another appliance discovered it: that one reconciles this machine.
    Theirs,
}

/// What the owner Machine gives: its Cluster and the bootstrap data.
struct Bootstrap {
    cluster: Option<String>,
    data: Vec<u8>,
}

/// Walks every step; `Ok(Done)` once the machine is claimed, staged and powered.
pub(super) async fn provision(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
    report: &mut Report,
) -> Result<Progress, Step> {
    // The Server named already (by the operator, or by an earlier claim) decides who
    // reconciles: the appliance that discovered it.
    let named = match named_server(mm, ctx).await? {
        Named::Theirs => return Ok(Progress::NotOurs),
        Named::Ours(s) => Some(*s),
        Named::Unnamed => None,
    };
    let stores = capi_stores(ctx).await?;
    let machine = owner_machine(mm, &stores)?;
    // A Machine placed in a failure domain (a rack: an appliance identity) is that
    // rack's to serve; the others leave it alone, writing nothing.
    let domain = failure_domain(&machine);
    if let Some(rack) = domain.filter(|r| *r != ctx.identity) {
        return match &named {
            None => Ok(Progress::NotOurs),
            Some(s) => Err(Blocked::failed(
                "ServerOutsideFailureDomain",
                format!(
                    "Server {} is in rack {}, but the Machine asks for failure domain {rack}",
                    s.name_any(),
                    ctx.identity
                ),
                RETRY * 6,
            )
            .into()),
        };
    }
    let cluster_name = machine.data["spec"]["clusterName"]
        .as_str()
        .map(String::from);
    let cluster = cluster_name
        .as_deref()
        .and_then(|c| cached_cluster(&stores, &mm.namespace().unwrap_or_default(), c));
    // Neither a server nor a rack named: the placed rack claims first, the others wait
    // their turn writing nothing (unless this one holds a claim for it already).
    let is_paused = paused(mm, cluster.as_deref());
    if named.is_none() && domain.is_none() {
        let uid = claim_uid(mm);
        let class = mm.spec.server_class_ref.as_ref().map(|c| c.name.as_str());
        let claimable = !is_paused
            && infrastructure_provisioned(cluster.as_deref())
            && bootstrap_secret_name(&machine).is_some();
        if let Turn::After(wait) = placement::turn(ctx, &uid, class, claimable)
            && !holds_claim(ctx, &uid)
        {
            return Ok(Progress::NotYet(wait));
        }
    }
    // Paused: no write but the Paused condition, not even the finalizer (the contract),
    // and what clusterctl move waits for: the pause recorded with the claim, then the
    // block-move mark taken off.
    if is_paused {
        record_pause(mm, api, ctx, named.as_ref()).await?;
        report.quiet(
            "Paused",
            true,
            "Paused",
            "the cluster or the machine is paused",
        );
        return Ok(Progress::Paused);
    }
    report.quiet("Paused", false, "NotPaused", "");
    // The later writes carry the resourceVersion the finalizer's write made, not the
    // one it replaced (a stale one would only cost a conflict and a second pass).
    let with_marks = ensure_marks(mm, api).await?;
    let mm = with_marks.as_ref().unwrap_or(mm);
    let bootstrap = bootstrap(mm, ctx, &machine, cluster_name, cluster, report).await?;
    let claim = ServerClaim {
        machine: machine_key(mm),
        uid: claim_uid(mm),
        cluster: bootstrap.cluster.clone(),
    };
    let server = claim_server(mm, ctx, named, domain.is_some(), &claim, report).await?;
    bind(mm, api, ctx, &server).await?;
    stage(ctx, &server, &claim, bootstrap.data).await?;
    apply_machine_bmc(mm, ctx, &server).await?;
    let progress = power(ctx, &server, &claim.uid, report).await?;
    if let Progress::Done(local) = &progress
        && local.provisioning.claim.as_ref().is_some_and(|c| c.paused)
    {
        ctx.core
            .pause_claim(&local.id, &claim.machine, &claim.uid, false)
            .await?;
    }
    Ok(progress)
}

/// The machine's Cluster is paused: the pause recorded with its claim in the inventory
/// (if it holds one here), then the block-move mark removed, in that order: once the
/// mark is gone `clusterctl move` may copy the machine away and delete it here, and the
/// sweep must know by then not to release its server.
async fn record_pause(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
    named: Option<&ServerResource>,
) -> Result<(), Step> {
    let (key, uid) = (machine_key(mm), claim_uid(mm));
    if let Some(server) = named {
        let recorded = match ctx
            .core
            .pause_claim(&inventory_id(server), &key, &uid, true)
            .await
        {
            Ok(held) => held.is_some(),
            Err(CoreError::NotFound(_)) => false,
            Err(e) => return Err(e.into()),
        };
        // The Server says this machine holds it, the inventory does not record the
        // pause: the mark stays, and the move waits (and gives up) rather than outrun it.
        if !recorded && super::claims::held_by(server, &key, &uid) {
            tracing::warn!(metalmachine = %key, server = %server.name_any(), "paused, but the local record does not hold this machine's claim: clusterctl move stays blocked");
            return Ok(());
        }
    }
    // The claim uid goes with the machine wherever it moves (a machine paused since
    // before it was marked gets it now).
    let mut annotations = serde_json::Map::new();
    if mm.annotations().contains_key(BLOCK_MOVE) {
        annotations.insert(BLOCK_MOVE.into(), json!(null));
    }
    if !mm.annotations().contains_key(CLAIM_UID_ANNOTATION) {
        annotations.insert(CLAIM_UID_ANNOTATION.into(), json!(uid));
    }
    if !annotations.is_empty() {
        let patch = json!({"metadata": {"annotations": annotations}});
        api.patch(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

async fn named_server(mm: &MetalMachine, ctx: &Context) -> Result<Named, Step> {
    let Some(r) = &mm.spec.server_ref else {
        return Ok(Named::Unnamed);
    };
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    match servers.get_opt(&r.name).await? {
        Some(s) if !ours(ctx, &s) => Ok(Named::Theirs),
        Some(s) => Ok(Named::Ours(Box::new(s))),
        None => Err(Blocked::waiting(
            "ServerNotFound",
            format!("Server {} does not exist (yet)", r.name),
        )
        .retry(RETRY * 2)
        .into()),
    }
}

/// Adds what an unpaused machine carries, where missing: the finalizer, the uid naming
/// its claim ([`CLAIM_UID_ANNOTATION`]) and clusterctl's block-move mark. The machine as
/// written, if it wrote.
async fn ensure_marks(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
) -> Result<Option<MetalMachine>, kube::Error> {
    let has_finalizer = mm.finalizers().iter().any(|f| f == FINALIZER);
    let annotations = mm.annotations();
    let has_uid = annotations.contains_key(CLAIM_UID_ANNOTATION);
    let blocks_move = annotations.contains_key(BLOCK_MOVE);
    if has_finalizer && has_uid && blocks_move {
        return Ok(None);
    }
    let mut metadata = json!({"resourceVersion": mm.resource_version(), "annotations": {}});
    if !has_finalizer {
        let mut finalizers = mm.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        metadata["finalizers"] = json!(finalizers);
    }
    if !has_uid {
        metadata["annotations"][CLAIM_UID_ANNOTATION] = json!(claim_uid(mm));
    }
    if !blocks_move {
        metadata["annotations"][BLOCK_MOVE] = json!("");
    }
    let patch = json!({ "metadata": metadata });
    Ok(Some(
        api.patch(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
            .await?,
    ))
}

/// Step 1a: the owner Machine (from the cache).
fn owner_machine(mm: &MetalMachine, stores: &CapiStores) -> Result<Arc<DynamicObject>, Step> {
    let ns = mm.namespace().unwrap_or_default();
    let Some(owner) = capi_owner(mm, "Machine").map(|o| o.name.clone()) else {
        return Err(
            Blocked::waiting("WaitingForMachine", "no Machine owns this MetalMachine yet").into(),
        );
    };
    match cached_machine(stores, &ns, &owner) {
        Some(machine) => Ok(machine),
        None => Err(
            Blocked::waiting("WaitingForMachine", format!("Machine {owner} is not there")).into(),
        ),
    }
}

/// The failure domain the Machine asks for (`spec.failureDomain`), if any.
fn failure_domain(machine: &DynamicObject) -> Option<&str> {
    machine.data["spec"]["failureDomain"]
        .as_str()
        .filter(|r| !r.is_empty())
}

/// Whether the Cluster says its infrastructure is provisioned.
fn infrastructure_provisioned(cluster: Option<&DynamicObject>) -> bool {
    cluster.is_some_and(|c| {
        c.data["status"]["initialization"]["infrastructureProvisioned"].as_bool() == Some(true)
    })
}

/// The Secret holding the Machine's bootstrap data, once its bootstrap provider made it.
fn bootstrap_secret_name(machine: &DynamicObject) -> Option<&str> {
    machine.data["spec"]["bootstrap"]["dataSecretName"].as_str()
}

/// Step 1b: the Machine's Cluster (`cluster_name`, read as `cluster`) provisioned, and
/// the bootstrap data.
async fn bootstrap(
    mm: &MetalMachine,
    ctx: &Context,
    machine: &DynamicObject,
    cluster_name: Option<String>,
    cluster: Option<Arc<DynamicObject>>,
    report: &mut Report,
) -> Result<Bootstrap, Step> {
    let ns = mm.namespace().unwrap_or_default();
    let owner = machine.name_any();
    if !infrastructure_provisioned(cluster.as_deref()) {
        return Err(Blocked::waiting(
            "WaitingForClusterInfrastructure",
            format!(
                "Cluster {} is not provisioned yet",
                cluster_name.as_deref().unwrap_or("?")
            ),
        )
        .retry(RETRY)
        .into());
    }
    let Some(secret_name) = bootstrap_secret_name(machine) else {
        return Err(Blocked::waiting(
            "WaitingForBootstrapData",
            format!("Machine {owner} has no bootstrap data yet (spec.bootstrap.dataSecretName)"),
        )
        .into());
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let data = secrets
        .get_opt(secret_name)
        .await?
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove("value"))
        .map(|v| v.0)
        .filter(|v| !v.is_empty());
    let Some(data) = data else {
        return Err(Blocked::failed(
            "BootstrapDataMissing",
            format!("Secret {ns}/{secret_name} is missing or has no key \"value\""),
            RETRY * 2,
        )
        .into());
    };
    report.done(
        "BootstrapDataReady",
        "SecretFound",
        &format!("bootstrap data from Secret {secret_name}"),
    );
    Ok(Bootstrap {
        cluster: cluster_name,
        data,
    })
}

/// Step 2, claim: the named Server, or a free one of `spec.serverClassRef`'s class.
async fn claim_server(
    mm: &MetalMachine,
    ctx: &Context,
    named: Option<ServerResource>,
    pinned: bool,
    claim: &ServerClaim,
    report: &mut Report,
) -> Result<ServerResource, Step> {
    let server = match (named, &mm.spec.server_class_ref) {
        (Some(s), _) => claim_named(ctx, &s, claim).await?,
        (None, Some(class)) => claim_from_class(ctx, &class.name, claim, pinned).await?,
        (None, None) => {
            return Err(Blocked::failed(
                "NoServerSelector",
                "set spec.serverRef or spec.serverClassRef",
                RETRY * 6,
            )
            .into());
        }
    };
    report.done(
        "ServerClaimed",
        "Claimed",
        &format!("claimed Server {}", server.name_any()),
    );
    Ok(server)
}

/// Step 3, bind: `spec.serverRef` and `spec.providerID`, with the machine's
/// resourceVersion: if another appliance bound it to another server meanwhile, this
/// claim is given back.
async fn bind(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
    server: &ServerResource,
) -> Result<(), Step> {
    let name = server.name_any();
    let provider_id = format!("arges://{}", server.spec.uuid);
    if mm.spec.server_ref.as_ref().map(|r| &r.name) == Some(&name)
        && mm.spec.provider_id.as_deref() == Some(&provider_id)
    {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": mm.resource_version()},
        "spec": {
            "serverRef": SpecRef {
                api_version: Some("metal.arges.dev/v1alpha1".into()),
                kind: Some("Server".into()),
                name: name.clone(),
                namespace: None,
            },
            "providerID": provider_id,
        },
    });
    if let Err(e) = api
        .patch(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await
    {
        // Bound to another server meanwhile (another appliance was first): give this
        // one back. Else the object in hand was stale: try again.
        let fresh = api.get_opt(&mm.name_any()).await?;
        if let Some(other) = fresh
            .as_ref()
            .and_then(|f| f.spec.server_ref.as_ref())
            .filter(|r| r.name != name)
        {
            tracing::info!(server = %name, bound = %other.name, "machine bound elsewhere; releasing");
            release_claim(ctx, server, &claim_uid(mm), false).await?;
        }
        return Err(e.into());
    }
    // Bound: from now on the machine names its server; the claim needs no remembering.
    ctx.caches.forget_claim(&claim_uid(mm));
    Ok(())
}

/// Step 4, stage: the bootstrap data in the local inventory. The core serves it at
/// `/configdata` to that machine only, and boots the machine into its install.
async fn stage(
    ctx: &Context,
    server: &ServerResource,
    claim: &ServerClaim,
    data: Vec<u8>,
) -> Result<(), Step> {
    let request = ClaimRequest {
        machine: claim.machine.clone(),
        uid: claim.uid.clone(),
        cluster: claim.cluster.clone(),
        server_object: server.uid(),
    };
    match ctx
        .core
        .claim_server(&inventory_id(server), request, data)
        .await
    {
        Ok(_) => Ok(()),
        Err(CoreError::Conflict(why)) => {
            // The cluster said free, the local record says not (a wipe still running):
            // the local record decides.
            release_claim(ctx, server, &claim.uid, false).await?;
            Err(Blocked::failed("ServerNotClean", why, RETRY * 2).into())
        }
        Err(CoreError::NotFound(_)) => Err(Blocked::failed(
            "ServerNotRegistered",
            format!(
                "Server {} has not registered with this appliance",
                server.name_any()
            ),
            RETRY * 2,
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// The MetalMachine's `bmc` (credentials from its Secret preferred), lent to the server
/// for this claim only. A tenant's references stay in its namespace (Cluster API's rule):
/// a Secret elsewhere is refused unread. A server with a BMC of its own is not redirected.
async fn apply_machine_bmc(
    mm: &MetalMachine,
    ctx: &Context,
    server: &ServerResource,
) -> Result<(), Step> {
    let Some(b) = &mm.spec.bmc else {
        return Ok(());
    };
    let ns = mm.namespace().unwrap_or_default();
    if let Some(other) = b
        .credentials_secret_ref
        .as_ref()
        .and_then(|r| r.namespace.as_deref())
        .filter(|other| **other != ns)
    {
        return Err(Blocked::failed(
            "SecretOutsideNamespace",
            format!(
                "spec.bmc.credentialsSecretRef names namespace {other}: a MetalMachine's references stay in its own namespace ({ns})"
            ),
            RETRY * 6,
        )
        .into());
    }
    if b.pass.is_some() {
        ctx.warn_once(
            mm,
            "InlineCredentials",
            "spec.bmc.pass holds a password in the MetalMachine itself; put it in a Secret (spec.bmc.credentialsSecretRef)",
        )
        .await;
    }
    let (settings, pass) = bmc_with_credentials(ctx, b, &ns)
        .await
        .map_err(|p: BmcProblem| Blocked::failed(p.reason(), p.note(), RETRY * 2))?;
    let uid = claim_uid(mm);
    match ctx
        .core
        .lend_bmc(&inventory_id(server), &uid, settings, pass)
        .await
    {
        Ok(_) => Ok(()),
        Err(CoreError::Conflict(why)) => Err(Blocked::failed("BMCConflict", why, RETRY * 6).into()),
        Err(e) => Err(e.into()),
    }
}

/// Step 5, power: into the install, next boot PXE, then a power cycle (or on), once per
/// claim, which opens the Server's provisioning window. Without a BMC, an operator's
/// arming opens it (and they power the machine by hand). A tripped window stops here
/// until re-armed.
async fn power(
    ctx: &Context,
    server: &ServerResource,
    uid: &str,
    report: &mut Report,
) -> Result<Progress, Step> {
    let id = inventory_id(server);
    let name = server.name_any();
    let local = ctx.core.server(&id).await?;
    // A tripped window stops the machine: its secrets went (or nearly went) to someone
    // else, and only an operator can say which asker was real.
    if let Some(alarm) = &local.alarm {
        report.failed("PoweredOn", "ProvisioningWindowTripped", &alarm.message);
        return Err(Blocked::failed(
            "ProvisioningWindowTripped",
            format!(
                "{}; nothing is handed out until Server {name} is armed again (spec.arm)",
                alarm.message
            ),
            RETRY * 2,
        )
        .into());
    }
    // The local record, not the (possibly stale) status, says whether this claim's
    // power cycle happened: a machine is never cycled twice for one claim.
    let powered = local
        .provisioning
        .claim
        .as_ref()
        .is_some_and(|c| c.uid == uid && c.powered_at.is_some());
    if powered {
        return Ok(Progress::Done(Box::new(local)));
    }
    if local.bmc.is_none() {
        // Without a BMC the appliance cannot open the window itself: an operator arms
        // the Server and powers the machine on by hand.
        let armed = local
            .window
            .as_ref()
            .is_some_and(|w| w.is_open(crate::inventory::now()) && w.claimant.is_none());
        if !armed {
            return Err(Blocked::failed(
                "NoBMC",
                format!(
                    "neither the MetalMachine nor Server {name} says how to reach a BMC (spec.bmc); or arm the Server (spec.arm) and power the machine on by hand"
                ),
                RETRY * 2,
            )
            .into());
        }
        report.done(
            "PoweredOn",
            "Armed",
            &format!("Server {name} is armed: power the machine on by hand, into PXE"),
        );
    } else {
        match network_boot(ctx, &id).await? {
            Ok(action) => report.done(
                "PoweredOn",
                "NetworkBooting",
                &format!("next boot PXE, power {} for claim {uid}", action.as_str()),
            ),
            Err(event) => {
                let kind = event.reason.unwrap_or(PowerFailure::Unknown);
                let b = Blocked::failed(
                    kind.condition_reason(),
                    format!(
                        "{} on Server {name}: {}",
                        event.operation,
                        event.message.as_deref().unwrap_or(kind.as_str())
                    ),
                    RETRY * 2,
                );
                report.failed("PoweredOn", b.reason, &b.message);
                return Err(b.into());
            }
        }
    }
    let local = ctx.core.mark_powered(&id, uid).await?;
    Ok(Progress::Done(Box::new(local)))
}
