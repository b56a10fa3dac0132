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
//! Every step that waits or fails sets the `Ready` condition's reason, with an event
//! when the reason changes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DynamicObject, ListParams, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    FINALIZER, RETRY, ReconcileError, capi_owner, capi_resource, count, get_cluster, patch_params,
    paused, set_condition,
};
use crate::bmc::{BootDevice, BootSetting, PowerAction, PowerState};
use crate::controller::resources::{
    APPLIANCE_LABEL, MetalMachine, ObjectRef as SpecRef, ReleasePolicy, Server as ServerResource,
    ServerClaim, ServerClass,
};
use crate::controller::servers::{BmcProblem, addresses, bmc_with_credentials, inventory_id};
use crate::controller::{Context, server_classes};
use crate::core::{ClaimRequest, CoreError};
use crate::inventory::InventoryError;

const KIND: &str = "MetalMachine";
/// How often servers held by machines that are gone are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Reconciles MetalMachines until `cancel` fires, and sweeps orphaned claims.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let machines: Api<MetalMachine> = Api::all(ctx.client.clone());
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let capi_machines: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &capi_resource("Machine", "machines"));
    let sweep = tokio::spawn(sweep(Arc::clone(&ctx), cancel.clone()));
    Controller::new(machines, watcher::Config::default())
        // A Server's status shows its install progress (pushed from the inventory), so
        // the machine holding it hears of it.
        .watches(
            servers,
            watcher::Config::default().labels(&own_servers_selector(&ctx)),
            |s: ServerResource| {
                s.status
                    .and_then(|st| st.claim)
                    .and_then(|c| machine_ref(&c.machine))
            },
        )
        .watches_with(
            capi_machines,
            capi_resource("Machine", "machines"),
            watcher::Config::default(),
            |m: DynamicObject| {
                let ns = m.namespace()?;
                let infra = &m.data["spec"]["infrastructureRef"];
                (infra["kind"] == KIND)
                    .then(|| {
                        infra["name"]
                            .as_str()
                            .map(|n| ObjectRef::new(n).within(&ns))
                    })
                    .flatten()
            },
        )
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
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(metalmachine = %mm.name_any(), error = %e, "MetalMachine reconcile failed; retrying");
    Action::requeue(RETRY)
}

/// Why a step cannot go on yet: the `Ready` condition's reason and message.
struct Blocked {
    reason: &'static str,
    message: String,
    warning: bool,
    retry: Option<Duration>,
}

impl Blocked {
    fn waiting(reason: &'static str, message: impl Into<String>) -> Self {
        Blocked {
            reason,
            message: message.into(),
            warning: false,
            retry: None,
        }
    }

    fn failed(reason: &'static str, message: impl Into<String>, retry: Duration) -> Self {
        Blocked {
            reason,
            message: message.into(),
            warning: true,
            retry: Some(retry),
        }
    }

    fn retry(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }
}

/// What one reconcile worked out for the status.
struct Report {
    conditions: Vec<Condition>,
    /// Events to publish (reason changes only): (warning, reason, note).
    events: Vec<(bool, String, String)>,
    generation: Option<i64>,
}

impl Report {
    fn new(mm: &MetalMachine) -> Self {
        Report {
            conditions: mm.status.clone().unwrap_or_default().conditions,
            events: Vec::new(),
            generation: mm.meta().generation,
        }
    }

    /// Sets a step's condition; an event when its reason changed.
    fn step(&mut self, type_: &str, ok: bool, reason: &str, message: &str, warning: bool) {
        if set_condition(
            &mut self.conditions,
            type_,
            ok,
            reason,
            message,
            self.generation,
        ) && (warning || type_ != "Ready")
        {
            self.events
                .push((warning, reason.to_string(), message.to_string()));
        }
    }
}

async fn reconcile(mm: Arc<MetalMachine>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = mm.namespace().unwrap_or_default();
    let api: Api<MetalMachine> = Api::namespaced(ctx.client.clone(), &ns);
    if mm.meta().deletion_timestamp.is_some() {
        return delete(&mm, &api, &ctx).await;
    }
    let mut report = Report::new(&mm);
    let outcome = provision(&mm, &api, &ctx, &mut report).await;
    let action = match outcome {
        Ok(Progress::Done(s)) => {
            let server = &s.id;
            let installed = s
                .provisioning
                .claim
                .as_ref()
                .and_then(|c| c.installed_by.clone());
            let ready = match installed {
                Some(_) => format!("server {server} is installed"),
                None => format!("server {server} is powered and booting its install environment"),
            };
            match installed {
                Some(how) => report.step(
                    "Installed",
                    true,
                    if how == "reported" {
                        "InstallReported"
                    } else {
                        "BootedAfterInstall"
                    },
                    "the install environment fetched its configuration and finished",
                    false,
                ),
                None => report.step(
                    "Installed",
                    false,
                    "Installing",
                    "waiting for the install environment to fetch /configdata and report",
                    false,
                ),
            }
            report.step("Ready", true, "Provisioned", &ready, false);
            write_status(&api, &mm, &report, true, addresses(&s)).await?;
            count(&ctx, KIND, "ok");
            Action::await_change()
        }
        Ok(Progress::NotOurs) => return Ok(Action::await_change()),
        Err(Step::Blocked(b)) => {
            let retry = b.retry;
            let was = mm
                .status
                .as_ref()
                .and_then(|s| s.initialization.as_ref())
                .is_some_and(|i| i.provisioned);
            let before = report.events.len();
            report.step("Ready", false, b.reason, &b.message, b.warning);
            // Said once per reason; the retries that follow are quiet.
            if b.warning && report.events.len() > before {
                tracing::warn!(metalmachine = %mm.name_any(), reason = b.reason, message = %b.message, "MetalMachine blocked");
            }
            let kept = mm
                .status
                .as_ref()
                .map(|s| s.addresses.iter().map(|a| json!(a)).collect())
                .unwrap_or_default();
            write_status(&api, &mm, &report, was, kept).await?;
            count(&ctx, KIND, if b.warning { "blocked" } else { "waiting" });
            retry.map_or(Action::requeue(RETRY * 6), Action::requeue)
        }
        Err(Step::Error(e)) => {
            write_status_best_effort(&api, &mm, &report).await;
            return Err(e);
        }
    };
    for (warning, reason, note) in report.events {
        ctx.publish(&mm.object_ref(&()), warning, &reason, "Provision", &note)
            .await;
    }
    Ok(action)
}

/// Where provisioning got to.
enum Progress {
    /// Claimed, staged, powered: the Server's inventory record as it now is.
    Done(Box<crate::inventory::Server>),
    /// The machine's Server belongs to another appliance: its leader reconciles it.
    NotOurs,
}

/// A step's failure: blocked with a reason, or an error to retry with backoff.
enum Step {
    Blocked(Blocked),
    Error(ReconcileError),
}

impl<E: Into<ReconcileError>> From<E> for Step {
    fn from(e: E) -> Self {
        Step::Error(e.into())
    }
}

impl From<Blocked> for Step {
    fn from(b: Blocked) -> Self {
        Step::Blocked(b)
    }
}

async fn provision(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
    report: &mut Report,
) -> Result<Progress, Step> {
    let ns = mm.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", mm.name_any());
    let uid = mm.uid().unwrap_or_default();

    // The Server named already (by the operator, or by an earlier claim) decides who
    // reconciles: the appliance that discovered it.
    let named = match &mm.spec.server_ref {
        Some(r) => {
            let servers: Api<ServerResource> = Api::all(ctx.client.clone());
            match servers.get_opt(&r.name).await? {
                Some(s) if !ours(ctx, &s) => return Ok(Progress::NotOurs),
                Some(s) => Some(s),
                None => {
                    return Err(Blocked::waiting(
                        "ServerNotFound",
                        format!("Server {} does not exist (yet)", r.name),
                    )
                    .retry(RETRY * 2)
                    .into());
                }
            }
        }
        None => None,
    };
    ensure_finalizer(mm, api).await?;

    // 1. The owner Machine, its Cluster, the bootstrap data.
    let Some(owner) = capi_owner(mm, "Machine").map(|o| o.name.clone()) else {
        return Err(
            Blocked::waiting("WaitingForMachine", "no Machine owns this MetalMachine yet").into(),
        );
    };
    let machines: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ns,
        &capi_resource("Machine", "machines"),
    );
    let Some(machine) = machines.get_opt(&owner).await? else {
        return Err(
            Blocked::waiting("WaitingForMachine", format!("Machine {owner} is not there")).into(),
        );
    };
    let cluster_name = machine.data["spec"]["clusterName"]
        .as_str()
        .map(String::from);
    let cluster = match &cluster_name {
        Some(c) => get_cluster(ctx, &ns, c).await?,
        None => None,
    };
    if paused(mm, cluster.as_ref()) {
        return Err(Blocked::waiting("Paused", "the cluster is paused").into());
    }
    let infrastructure = cluster.as_ref().is_some_and(|c| {
        c.data["status"]["initialization"]["infrastructureProvisioned"].as_bool() == Some(true)
    });
    if !infrastructure {
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
    let Some(secret_name) = machine.data["spec"]["bootstrap"]["dataSecretName"].as_str() else {
        return Err(Blocked::waiting(
            "WaitingForBootstrapData",
            format!("Machine {owner} has no bootstrap data yet (spec.bootstrap.dataSecretName)"),
        )
        .into());
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let data = match secrets.get_opt(secret_name).await? {
        Some(s) => s
            .data
            .and_then(|mut d| d.remove("value"))
            .map(|v| v.0)
            .filter(|v| !v.is_empty()),
        None => None,
    };
    let Some(data) = data else {
        return Err(Blocked::failed(
            "BootstrapDataMissing",
            format!("Secret {ns}/{secret_name} is missing or has no key \"value\""),
            RETRY * 2,
        )
        .into());
    };
    report.step(
        "BootstrapDataReady",
        true,
        "SecretFound",
        &format!("bootstrap data from Secret {secret_name}"),
        false,
    );

    // 2. Claim a Server.
    let claim = ServerClaim {
        machine: key.clone(),
        uid: uid.clone(),
        cluster: cluster_name.clone(),
    };
    let server = match named {
        Some(s) => claim_named(ctx, &s, &claim).await?,
        None => match &mm.spec.server_class_ref {
            Some(class) => claim_from_class(ctx, &class.name, &claim).await?,
            None => {
                return Err(Blocked::failed(
                    "NoServerSelector",
                    "set spec.serverRef or spec.serverClassRef",
                    RETRY * 6,
                )
                .into());
            }
        },
    };
    let name = server.name_any();
    let id = inventory_id(&server);
    report.step(
        "ServerClaimed",
        true,
        "Claimed",
        &format!("claimed Server {name}"),
        false,
    );

    // 3. Bind.
    let provider_id = format!("arges://{}", server.spec.uuid);
    if mm.spec.server_ref.as_ref().map(|r| &r.name) != Some(&name)
        || mm.spec.provider_id.as_deref() != Some(&provider_id)
    {
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
            // Bound to another server meanwhile (another appliance was first): give
            // this one back. Else the object in hand was stale: try again.
            let fresh = api.get_opt(&mm.name_any()).await?;
            if let Some(other) = fresh
                .as_ref()
                .and_then(|f| f.spec.server_ref.as_ref())
                .filter(|r| r.name != name)
            {
                tracing::info!(server = %name, bound = %other.name, "machine bound elsewhere; releasing");
                release_claim(ctx, &server, &uid, false).await?;
            }
            return Err(e.into());
        }
    }

    // 4. Stage the bootstrap data locally.
    let request = ClaimRequest {
        machine: key.clone(),
        uid: uid.clone(),
        cluster: cluster_name,
    };
    match ctx.core.claim_server(&id, request, data).await {
        Ok(_) => {}
        Err(CoreError::Inventory(InventoryError::Conflict(why))) => {
            // The cluster said free, the local record says not (a wipe still running):
            // the local record decides.
            release_claim(ctx, &server, &uid, false).await?;
            return Err(Blocked::failed("ServerNotClean", why, RETRY * 2).into());
        }
        Err(CoreError::Inventory(InventoryError::NotFound(_))) => {
            return Err(Blocked::failed(
                "ServerNotRegistered",
                format!("Server {name} has not registered with this appliance"),
                RETRY * 2,
            )
            .into());
        }
        Err(e) => return Err(e.into()),
    }

    // 5. Power: PXE next, then cycle.
    if let Some(b) = &mm.spec.bmc {
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
        ctx.core.set_bmc_if_changed(&id, settings, pass).await?;
    }
    let local = ctx.core.server(&id).await?;
    // A tripped window stops the machine: its secrets went (or nearly went) to someone
    // else, and only an operator can say which asker was real.
    if let Some(alarm) = &local.alarm {
        report.step(
            "PoweredOn",
            false,
            "ProvisioningWindowTripped",
            &alarm.message,
            true,
        );
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
        report.step(
            "PoweredOn",
            true,
            "Armed",
            &format!("Server {name} is armed: power the machine on by hand, into PXE"),
            false,
        );
        let local = ctx.core.mark_powered(&id, &uid).await?;
        return Ok(Progress::Done(Box::new(local)));
    }
    power_into_install(ctx, &id, &name, &uid, report).await?;
    let local = ctx.core.mark_powered(&id, &uid).await?;
    Ok(Progress::Done(Box::new(local)))
}

/// Next boot PXE, then a power cycle, or a power-on when the machine is off.
async fn power_into_install(
    ctx: &Context,
    id: &str,
    name: &str,
    uid: &str,
    report: &mut Report,
) -> Result<(), Step> {
    let failed = |e: &crate::inventory::PowerEvent| {
        let reason = e.reason.as_deref().unwrap_or("unknown");
        Blocked::failed(
            power_reason(reason),
            format!(
                "{} on Server {name}: {}",
                e.operation,
                e.message.as_deref().unwrap_or(reason)
            ),
            RETRY * 2,
        )
    };
    let boot = BootSetting {
        device: BootDevice::Pxe,
        persistent: false,
        efi: false,
    };
    let r = ctx.core.bmc_boot_device(id, boot).await?;
    if !r.event.ok {
        let b = failed(&r.event);
        report.step("PoweredOn", false, b.reason, &b.message, true);
        return Err(b.into());
    }
    let status = ctx.core.bmc_status(id).await?;
    let action = if status.power.state == Some(PowerState::On) {
        PowerAction::Cycle
    } else {
        PowerAction::On
    };
    let r = ctx.core.bmc_power(id, action).await?;
    if !r.event.ok {
        let b = failed(&r.event);
        report.step("PoweredOn", false, b.reason, &b.message, true);
        return Err(b.into());
    }
    report.step(
        "PoweredOn",
        true,
        "NetworkBooting",
        &format!("next boot PXE, power {} for claim {uid}", action.as_str()),
        false,
    );
    Ok(())
}

/// `credentials` → `PowerFailedCredentials`.
fn power_reason(kind: &str) -> &'static str {
    match kind {
        "credentials" => "PowerFailedCredentials",
        "unreachable" => "PowerFailedUnreachable",
        "timeout" => "PowerFailedTimeout",
        "tls" => "PowerFailedTLS",
        "no_driver" => "PowerFailedNoDriver",
        "boot_mismatch" => "PowerFailedBootMismatch",
        "not_settled" => "PowerFailedNotSettled",
        _ => "PowerFailed",
    }
}

/// The label selector of the Servers this appliance discovered.
fn own_servers_selector(ctx: &Context) -> String {
    format!("{APPLIANCE_LABEL}={}", ctx.identity)
}

fn ours(ctx: &Context, s: &ServerResource) -> bool {
    s.labels().get(APPLIANCE_LABEL) == Some(&ctx.identity)
}

fn claim_of(s: &ServerResource) -> Option<&ServerClaim> {
    s.status.as_ref().and_then(|st| st.claim.as_ref())
}

/// Why `s` cannot be given to a new machine, if it cannot.
fn unavailable(s: &ServerResource) -> Option<(&'static str, String)> {
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
async fn claim_named(
    ctx: &Context,
    s: &ServerResource,
    claim: &ServerClaim,
) -> Result<ServerResource, Step> {
    if claim_of(s).is_some_and(|c| c.uid == claim.uid) {
        return Ok(s.clone());
    }
    if let Some((reason, message)) = unavailable(s) {
        return Err(Blocked::failed(reason, message, RETRY * 2).into());
    }
    Ok(take_claim(ctx, s, claim).await?)
}

/// A free Server of `class` (this appliance's own), claimed; the first that can be.
async fn claim_from_class(
    ctx: &Context,
    class: &str,
    claim: &ServerClaim,
) -> Result<ServerResource, Step> {
    let classes: Api<ServerClass> = Api::all(ctx.client.clone());
    let Some(class_obj) = classes.get_opt(class).await? else {
        return Err(Blocked::failed(
            "ServerClassNotFound",
            format!("ServerClass {class} does not exist"),
            RETRY * 2,
        )
        .into());
    };
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let mut all = servers
        .list(&ListParams::default().labels(&own_servers_selector(ctx)))
        .await?
        .items;
    // A restart after claiming but before binding finds its own claim first.
    if let Some(mine) = all
        .iter()
        .find(|s| claim_of(s).is_some_and(|c| c.uid == claim.uid))
    {
        return Ok(mine.clone());
    }
    all.sort_by_key(|s| s.name_any());
    let mut raced = false;
    for s in all
        .iter()
        .filter(|s| server_classes::matches(&class_obj.spec, s) && unavailable(s).is_none())
    {
        match take_claim(ctx, s, claim).await {
            Ok(s) => return Ok(s),
            Err(kube::Error::Api(e)) if e.code == 409 => raced = true,
            Err(e) => return Err(e.into()),
        }
    }
    let why = if raced {
        "every free server was claimed by another machine first"
    } else {
        "no server of the class is accepted, clean, uncordoned and free"
    };
    Err(Blocked::failed(
        "NoFreeServer",
        format!("ServerClass {class}: {why}"),
        RETRY * 3,
    )
    .into())
}

/// Clears the claim on `s` if `uid` holds it, with `clean` as the server's state.
async fn release_claim(
    ctx: &Context,
    s: &ServerResource,
    uid: &str,
    dirty: bool,
) -> Result<(), kube::Error> {
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

async fn ensure_finalizer(mm: &MetalMachine, api: &Api<MetalMachine>) -> Result<(), kube::Error> {
    if mm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = mm.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch =
        json!({"metadata": {"resourceVersion": mm.resource_version(), "finalizers": finalizers}});
    api.patch(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn write_status(
    api: &Api<MetalMachine>,
    mm: &MetalMachine,
    report: &Report,
    provisioned: bool,
    addresses: Vec<serde_json::Value>,
) -> Result<(), kube::Error> {
    let patch = json!({"status": {
        "ready": provisioned,
        "initialization": {"provisioned": provisioned},
        "addresses": addresses,
        "conditions": report.conditions,
    }});
    api.patch_status(&mm.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
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

/// Releases the machine's Server, then lets the MetalMachine go.
async fn delete(
    mm: &MetalMachine,
    api: &Api<MetalMachine>,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    if !mm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let uid = mm.uid().unwrap_or_default();
    if let Some(r) = &mm.spec.server_ref {
        let servers: Api<ServerResource> = Api::all(ctx.client.clone());
        if let Some(s) = servers.get_opt(&r.name).await? {
            if !ours(ctx, &s) {
                return Ok(Action::await_change());
            }
            if claim_of(&s).is_some_and(|c| c.uid == uid) {
                release_server(ctx, &s, &uid, Some(mm)).await?;
            }
        }
    } else {
        // Unbound: a claim taken just before a restart may still name this machine.
        let servers: Api<ServerResource> = Api::all(ctx.client.clone());
        let mine = servers
            .list(&ListParams::default().labels(&own_servers_selector(ctx)))
            .await?;
        for s in mine
            .items
            .iter()
            .filter(|s| claim_of(s).is_some_and(|c| c.uid == uid))
        {
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
async fn release_server(
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
        Ok(_) | Err(CoreError::Inventory(InventoryError::NotFound(_))) => {}
        Err(e) => return Err(e.into()),
    }
    let local = ctx.core.server(&id).await.ok();
    if local.as_ref().is_some_and(|l| l.bmc.is_some()) {
        let outcome = if wipe {
            let boot = BootSetting {
                device: BootDevice::Pxe,
                persistent: false,
                efi: false,
            };
            match ctx.core.bmc_boot_device(&id, boot).await {
                Ok(r) if r.event.ok => {
                    let on = ctx
                        .core
                        .bmc_status(&id)
                        .await
                        .ok()
                        .and_then(|r| r.power.state)
                        == Some(PowerState::On);
                    let action = if on {
                        PowerAction::Cycle
                    } else {
                        PowerAction::On
                    };
                    ctx.core.bmc_power(&id, action).await
                }
                other => other,
            }
        } else {
            ctx.core.bmc_power(&id, PowerAction::Off).await
        };
        let failure = match outcome {
            Ok(r) if r.event.ok => None,
            Ok(r) => Some(r.event.message.unwrap_or_default()),
            Err(e) => Some(e.to_string()),
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
    release_claim(ctx, s, uid, wipe).await?;
    tracing::info!(server = %name, wipe, "server released by its machine");
    Ok(())
}

/// Releases servers whose claim names a MetalMachine that is gone (deleted with its
/// finalizer removed by hand, or recreated under the same name) or that was bound to
/// another server (another appliance bound it first, and giving this one back failed).
async fn sweep(ctx: Arc<Context>, cancel: CancellationToken) {
    let servers: Api<ServerResource> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(list) = servers
            .list(&ListParams::default().labels(&own_servers_selector(&ctx)))
            .await
        else {
            continue;
        };
        for s in &list.items {
            let Some(c) = claim_of(s) else { continue };
            let Some((ns, name)) = c.machine.split_once('/') else {
                continue;
            };
            let api: Api<MetalMachine> = Api::namespaced(ctx.client.clone(), ns);
            match api.get_opt(name).await {
                // Still its machine: unbound yet (between claim and bind), or bound to it.
                Ok(Some(mm))
                    if mm.uid().as_deref() == Some(c.uid.as_str())
                        && mm
                            .spec
                            .server_ref
                            .as_ref()
                            .is_none_or(|r| r.name == s.name_any()) => {}
                Ok(_) => {
                    tracing::warn!(server = %s.name_any(), machine = %c.machine, "the machine holding this server is gone or bound to another; releasing it");
                    let uid = c.uid.clone();
                    if let Err(e) = release_server(&ctx, s, &uid, None).await {
                        tracing::warn!(server = %s.name_any(), error = %e, "cannot release an orphaned server");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot look up a claiming machine"),
            }
        }
    }
}
