//! MetalMachine reconciles on the seam ([`crate::controller::testing`]): a scripted
//! apiserver answers each request, a [`Core::test`] core holds the local truth. The
//! claim race, the bind race, every wait's reason and a release, in milliseconds.

use std::sync::Arc;

use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::reconcile;
use crate::controller::Context;
use crate::controller::capi::{BLOCK_MOVE, DELETE_FOR_MOVE};
use crate::controller::resources::{CLAIM_UID_ANNOTATION, MetalMachine};
use crate::controller::testing::{ApiServer, Call};
use crate::core::testing::Machine;
use crate::core::{ClaimRequest, Core, ServerEdit};

const NS: &str = "ns1";
const MM_PATH: &str =
    "/apis/infrastructure.cluster.x-k8s.io/v1alpha2/namespaces/ns1/metalmachines/cp-0";
const SERVERS: &str = "/apis/metal.arges.dev/v1alpha1/servers";
const BOOTSTRAP: &str = "machine: {type: controlplane}\n";

/// A MetalMachine fixture, built up by its methods.
#[derive(Clone)]
struct Mm(Value);

impl Mm {
    /// `ns1/cp-0`, owned by Machine `m-0`, with its finalizer and marks (its claim uid,
    /// clusterctl's block-move), asking for class `small`.
    fn test() -> Mm {
        Mm(json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2",
            "kind": "MetalMachine",
            "metadata": {
                "name": "cp-0", "namespace": NS, "uid": "uid-cp-0", "resourceVersion": "7",
                "generation": 1,
                "finalizers": [crate::controller::capi::FINALIZER],
                "annotations": {CLAIM_UID_ANNOTATION: "uid-cp-0", BLOCK_MOVE: ""},
                "ownerReferences": [{"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine", "name": "m-0", "uid": "uid-m-0"}],
            },
            "spec": {"serverClassRef": {"name": "small"}},
        }))
    }

    fn without_owner(mut self) -> Mm {
        self.0["metadata"]["ownerReferences"] = json!([]);
        self
    }

    fn bound_to(mut self, server: &str) -> Mm {
        self.0["spec"]["serverRef"] = json!({"name": server});
        self
    }

    fn with_bmc(mut self, bmc: Value) -> Mm {
        self.0["spec"]["bmc"] = bmc;
        self
    }

    /// As `clusterctl move` makes it in the new management cluster: a new uid, the
    /// annotations (the claim uid among them) and the spec (bound) kept, no status.
    fn moved(mut self) -> Mm {
        self.0["metadata"]["uid"] = json!("uid-moved");
        self.0["metadata"]["annotations"] = json!({CLAIM_UID_ANNOTATION: "uid-cp-0"});
        self
    }

    fn deleted(mut self) -> Mm {
        self.0["metadata"]["deletionTimestamp"] = json!("2026-12-04T00:00:00Z");
        self
    }

    fn object(&self) -> MetalMachine {
        serde_json::from_value(self.0.clone()).expect("a MetalMachine")
    }
}

/// A Server of this appliance (`rack-1`), accepted, free.
fn server(m: &Machine) -> Value {
    json!({
        "apiVersion": "metal.arges.dev/v1alpha1", "kind": "Server",
        "metadata": {"name": m.uuid, "resourceVersion": "3", "labels": {"metal.arges.dev/appliance": "rack-1"}},
        "spec": {"uuid": m.uuid, "accepted": true, "hardware": {"vendor": "QEMU"}},
    })
}

/// ServerClass `small`: any server.
fn class_small() -> Value {
    json!({
        "apiVersion": "metal.arges.dev/v1alpha1", "kind": "ServerClass",
        "metadata": {"name": "small"}, "spec": {},
    })
}

fn with_claim(mut s: Value, uid: &str) -> Value {
    s["status"] = json!({"inUse": true, "claim": {"machine": "ns1/cp-0", "uid": uid}});
    s
}

fn capi_machine() -> Value {
    json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
        "metadata": {"name": "m-0", "namespace": NS},
        "spec": {"clusterName": "c1", "bootstrap": {"dataSecretName": "m-0-bootstrap"}},
    })
}

fn cluster(provisioned: bool, paused: bool) -> Value {
    json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Cluster",
        "metadata": {"name": "c1", "namespace": NS},
        "spec": {"paused": paused},
        "status": {"initialization": {"infrastructureProvisioned": provisioned}},
    })
}

fn bootstrap_secret() -> Value {
    use base64::Engine;
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "m-0-bootstrap", "namespace": NS},
        "data": {"value": base64::engine::general_purpose::STANDARD.encode(BOOTSTRAP)},
    })
}

/// A claim of `ns1/<machine>` with uid `uid-<machine>`.
fn claim_of(machine: &str) -> ClaimRequest {
    ClaimRequest {
        machine: format!("ns1/{machine}"),
        uid: format!("uid-{machine}"),
        cluster: Some("c1".into()),
        server_object: None,
    }
}

/// Whether server `id` holds a claim in the local inventory.
async fn claimed_locally(ctx: &Context, id: &str) -> bool {
    ctx.core
        .server(id)
        .await
        .unwrap()
        .provisioning
        .claim
        .is_some()
}

/// A core holding machines 1 and 2, registered and accepted.
async fn core_with_two() -> (Core, Machine, Machine) {
    let core = Core::test();
    let (a, b) = (Machine::test(1), Machine::test(2));
    for m in [&a, &b] {
        let id = core.register_shared(m).await.server_id;
        core.edit_server(&id, ServerEdit::Accepted(true))
            .await
            .unwrap();
    }
    (core, a, b)
}

/// [`core_with_two`], the first server claimed and staged by `ns1/cp-0`.
async fn core_with_cp0_claim() -> (Core, Machine) {
    let (core, a, _) = core_with_two().await;
    core.claim_server(&a.uuid, claim_of("cp-0"), BOOTSTRAP.as_bytes().to_vec())
        .await
        .unwrap();
    (core, a)
}

/// The end of a release: the finalizer goes, and server `id` is free of its claim and
/// dirty (its wipe to come).
async fn finalizer_goes_and_the_server_is_released(
    api: &mut ApiServer,
    ctx: &Context,
    mm: &Mm,
    task: tokio::task::JoinHandle<Result<Action, crate::controller::capi::ReconcileError>>,
    id: &str,
) {
    let fin = api.expect("PATCH", MM_PATH).await;
    assert_eq!(fin.body["metadata"]["finalizers"], json!([]));
    fin.reply(&mm.0);
    api.until_done(task).await.unwrap();
    let local = ctx.core.server(id).await.unwrap();
    assert!(local.provisioning.claim.is_none() && local.provisioning.dirty);
}

/// Runs one reconcile of `mm` in a task; the test answers its requests on `api`.
fn start(
    ctx: &Arc<Context>,
    mm: &Mm,
) -> tokio::task::JoinHandle<Result<Action, crate::controller::capi::ReconcileError>> {
    tokio::spawn(reconcile(Arc::new(mm.object()), Arc::clone(ctx)))
}

/// Step 1 as a ready cluster would answer it: the Machine and its Cluster in the caches
/// (filled before the reconcile runs on), the bootstrap Secret read.
async fn answer_bootstrap(api: &mut ApiServer) {
    api.cached_capi(&[capi_machine()], &[cluster(true, false)]);
    api.expect("GET", "/api/v1/namespaces/ns1/secrets/m-0-bootstrap")
        .await
        .reply(&bootstrap_secret());
}

/// A reconcile of `cp-0` named to `a`'s Server, whose cluster claim is its own
/// already, answered up to its bind (the providerID); the local steps come next.
async fn reconcile_claimed(
    ctx: &Arc<Context>,
    api: &mut ApiServer,
    a: &Machine,
) -> (
    Mm,
    tokio::task::JoinHandle<Result<Action, crate::controller::capi::ReconcileError>>,
) {
    let mm = Mm::test().bound_to(&a.uuid);
    let task = reconcile_claimed_as(ctx, api, a, &mm).await;
    (mm, task)
}

/// [`reconcile_claimed`] of the machine `mm` (bound to `a`'s Server).
async fn reconcile_claimed_as(
    ctx: &Arc<Context>,
    api: &mut ApiServer,
    a: &Machine,
    mm: &Mm,
) -> tokio::task::JoinHandle<Result<Action, crate::controller::capi::ReconcileError>> {
    let task = start(ctx, mm);
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&with_claim(server(a), "uid-cp-0"));
    answer_bootstrap(api).await;
    api.expect("PATCH", MM_PATH).await.reply(&mm.0);
    task
}

/// A reconcile of `cp-0` (class `small`) over a core holding machines 1 and 2, the
/// caches showing the first `cached` of them free, answered through step 1.
async fn class_claim_started(
    cached: usize,
) -> (
    Arc<Context>,
    ApiServer,
    Machine,
    Machine,
    Mm,
    tokio::task::JoinHandle<Result<Action, crate::controller::capi::ReconcileError>>,
) {
    let (core, a, b) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    let servers: Vec<Value> = [&a, &b].iter().take(cached).map(|m| server(m)).collect();
    api.cached(&servers, &[class_small()]);
    let mm = Mm::test();
    let task = start(&ctx, &mm);
    answer_bootstrap(&mut api).await;
    (ctx, api, a, b, mm, task)
}

/// The status patch that ends a reconcile: answered, and its conditions as
/// `type=status/reason` words.
async fn status_patch(api: &mut ApiServer, mm: &Mm) -> String {
    let call: Call = api.expect("PATCH", &format!("{MM_PATH}/status")).await;
    let conditions = call.body["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    call.reply(&mm.0);
    conditions
        .iter()
        .map(|c| {
            format!(
                "{}={}/{}",
                c["type"].as_str().unwrap_or_default(),
                c["status"].as_str().unwrap_or_default(),
                c["reason"].as_str().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn a_class_claim_that_loses_a_race_takes_the_next_server() {
    // The candidates come from the caches: no LIST, no GET of the class.
    let (ctx, mut api, a, b, mm, task) = class_claim_started(2).await;
    // Another machine claimed the first server a moment ago (the cache has not seen it
    // yet): 409.
    let first = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await;
    assert_eq!(
        first.body["metadata"]["resourceVersion"], "3",
        "a precondition"
    );
    assert_eq!(first.body["status"]["claim"]["uid"], "uid-cp-0");
    first.conflict();
    let second = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", b.uuid))
        .await;
    second.reply(&with_claim(server(&b), "uid-cp-0"));
    // Bound to the one it won.
    let bind = api.expect("PATCH", MM_PATH).await;
    assert_eq!(bind.body["spec"]["serverRef"]["name"], b.uuid.as_str());
    assert_eq!(
        bind.body["spec"]["providerID"],
        format!("arges://{}", b.uuid)
    );
    assert_eq!(bind.body["metadata"]["resourceVersion"], "7");
    bind.reply(&mm.clone().bound_to(&b.uuid).0);
    // Staged locally; no BMC and not armed: it says so and waits.
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("ServerClaimed=True/Claimed")
            && conditions.contains("BootstrapDataReady=True/SecretFound")
            && conditions.contains("Ready=False/NoBMC"),
        "{conditions}"
    );
    let action = api.until_done(task).await.expect("reconciled");
    assert_ne!(action, Action::await_change(), "looked at again");
    let local = ctx.core.server(&b.uuid).await.unwrap();
    assert_eq!(
        local.provisioning.claim.map(|c| c.machine),
        Some("ns1/cp-0".into())
    );
    assert!(
        !claimed_locally(&ctx, &a.uuid).await,
        "the lost server is untouched locally"
    );
    for reason in ["SecretFound", "Claimed", "NoBMC"] {
        assert!(api.published(reason), "{reason}: {:?}", api.events);
    }
}

#[tokio::test]
async fn a_claim_the_cache_does_not_show_yet_is_found_again_not_taken_twice() {
    // The cache shows both servers free, and goes on showing them so (its watch lags).
    let (ctx, mut api, a, b, mm, task) = class_claim_started(2).await;
    api.expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    // The bind fails (the machine object in hand was stale), and nobody else bound it.
    api.expect("PATCH", MM_PATH).await.conflict();
    api.expect("GET", MM_PATH).await.reply(&mm.0);
    api.expect("PATCH", &format!("{MM_PATH}/status"))
        .await
        .reply(&mm.0);
    assert!(api.until_done(task).await.is_err());
    // The conditions that pass set were written, so their events went out with them (the
    // next pass finds them set and says nothing).
    for reason in ["SecretFound", "Claimed"] {
        assert!(api.published(reason), "{reason}: {:?}", api.events);
    }
    // Again at once: the claim this process took is read back, not a second one taken.
    let task = start(&ctx, &mm);
    answer_bootstrap(&mut api).await;
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    let bind = api.expect("PATCH", MM_PATH).await;
    assert_eq!(bind.body["spec"]["serverRef"]["name"], a.uuid.as_str());
    bind.reply(&mm.clone().bound_to(&a.uuid).0);
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("ServerClaimed=True/Claimed"),
        "{conditions}"
    );
    api.until_done(task).await.expect("reconciled");
    assert!(!claimed_locally(&ctx, &b.uuid).await, "b was never taken");
    assert_eq!(
        ctx.caches.claim("uid-cp-0"),
        None,
        "bound: nothing to remember"
    );
}

#[tokio::test]
async fn a_machine_placed_in_another_rack_is_left_to_that_rack() {
    let (core, a, _) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    api.cached(&[server(&a)], &[class_small()]);
    let in_rack = |rack: &str| {
        let mut m = capi_machine();
        m["spec"]["failureDomain"] = json!(rack);
        m
    };
    // Another rack's: nothing (no claim, no status written).
    api.cached_capi(&[in_rack("rack-2")], &[cluster(true, false)]);
    let mm = Mm::test();
    let task = start(&ctx, &mm);
    let action = api.until_done(task).await.expect("reconciled");
    assert_eq!(action, Action::await_change());
    // A server of this rack named for a Machine that asks for another rack: refused.
    let mm = Mm::test().bound_to(&a.uuid);
    let task = start(&ctx, &mm);
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&server(&a));
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=False/ServerOutsideFailureDomain"),
        "{conditions}"
    );
    api.until_done(task).await.expect("reconciled");
    // This rack's: on to its Cluster and a server of its own.
    api.cached_capi(&[in_rack("rack-1")], &[cluster(true, false)]);
    let mm = Mm::test();
    let task = start(&ctx, &mm);
    api.expect("GET", "/api/v1/namespaces/ns1/secrets/m-0-bootstrap")
        .await
        .reply(&bootstrap_secret());
    api.expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    api.expect("PATCH", MM_PATH)
        .await
        .reply(&mm.clone().bound_to(&a.uuid).0);
    status_patch(&mut api, &mm).await;
    api.until_done(task).await.expect("reconciled");
}

#[tokio::test]
async fn each_wait_says_why_on_ready() {
    // No owner yet.
    let (ctx, mut api) = Context::test(Core::test());
    let mm = Mm::test().without_owner();
    let task = start(&ctx, &mm);
    assert_eq!(
        status_patch(&mut api, &mm).await,
        "Ready=False/WaitingForMachine"
    );
    api.until_done(task).await.unwrap();
    assert!(
        api.events.is_empty(),
        "a wait is no event: {:?}",
        api.events
    );

    // The owner's cluster: paused, then not provisioned; the bootstrap data missing.
    for (cluster_obj, secret, want) in [
        (cluster(true, true), None, "Paused=True/Paused"),
        (
            cluster(false, false),
            None,
            "Ready=False/WaitingForClusterInfrastructure",
        ),
        (cluster(true, false), Some(()), "BootstrapDataMissing"),
    ] {
        let (ctx, mut api) = Context::test(Core::test());
        api.cached_capi(&[capi_machine()], &[cluster_obj]);
        let mm = Mm::test();
        let task = start(&ctx, &mm);
        if want.starts_with("Paused") {
            // Paused, clusterctl's block-move mark goes (nothing else is written).
            api.expect("PATCH", MM_PATH).await.reply(&mm.0);
        }
        if secret.is_some() {
            api.expect("GET", "/api/v1/namespaces/ns1/secrets/m-0-bootstrap")
                .await
                .not_found();
        }
        let conditions = status_patch(&mut api, &mm).await;
        assert!(conditions.contains(want), "{want}: {conditions}");
        api.until_done(task).await.unwrap();
        if secret.is_some() {
            assert!(
                api.published("BootstrapDataMissing"),
                "a failure is an event"
            );
        }
    }
}

#[tokio::test]
async fn a_server_the_local_record_says_is_dirty_is_given_back() {
    let (core, a, _) = core_with_two().await;
    // An earlier claim released with a wipe that has not reported yet.
    core.claim_server(&a.uuid, claim_of("old"), b"x".to_vec())
        .await
        .unwrap();
    core.release_server(&a.uuid, Some("uid-old"), true)
        .await
        .unwrap();
    let (ctx, mut api) = Context::test(core);
    let (mm, task) = reconcile_claimed(&ctx, &mut api, &a).await;
    // Staging refuses: the local record decides, and the claim goes back.
    let give_back = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await;
    assert_eq!(give_back.body["status"]["claim"], Value::Null);
    give_back.reply(&server(&a));
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=False/ServerNotClean"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
}

#[tokio::test]
async fn a_tripped_window_stops_the_machine_until_armed() {
    let (core, a, _) = core_with_two().await;
    core.edit_server(&a.uuid, ServerEdit::Environment(Some("talos".into())))
        .await
        .unwrap();
    core.arm(&a.uuid, "test").await.unwrap();
    core.boot(&a.from([10, 0, 0, 66])).await;
    core.boot(&a).await;
    assert!(core.server(&a.uuid).await.unwrap().alarm.is_some());
    let (ctx, mut api) = Context::test(core);
    let (mm, task) = reconcile_claimed(&ctx, &mut api, &a).await;
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("PoweredOn=False/ProvisioningWindowTripped")
            && conditions.contains("Ready=False/ProvisioningWindowTripped"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    assert!(api.published("ProvisioningWindowTripped"));
}

#[tokio::test]
async fn a_bind_lost_to_another_appliance_gives_the_claim_back() {
    let (ctx, mut api, a, b, mm, task) = class_claim_started(1).await;
    api.expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    // Another appliance bound the machine to its own server first.
    api.expect("PATCH", MM_PATH).await.conflict();
    api.expect("GET", MM_PATH)
        .await
        .reply(&mm.clone().bound_to(&b.uuid).0);
    let give_back = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await;
    assert_eq!(give_back.body["status"]["inUse"], false);
    give_back.reply(&server(&a));
    let conditions = api.expect("PATCH", &format!("{MM_PATH}/status")).await;
    conditions.reply(&mm.0);
    let e = api.until_done(task).await.unwrap_err();
    assert_eq!(e.kind(), "conflict", "{e}");
    assert!(
        !claimed_locally(&ctx, &a.uuid).await,
        "nothing staged for a server given back"
    );
}

#[tokio::test]
async fn deleting_releases_the_server_then_lets_the_machine_go() {
    let (core, a) = core_with_cp0_claim().await;
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid).deleted();
    let task = start(&ctx, &mm);
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    assert_eq!(status_patch(&mut api, &mm).await, "Ready=False/Deleting");
    let cleared = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await;
    assert_eq!(
        cleared.body["status"],
        json!({"inUse": false, "claim": null, "clean": false}),
        "released with a wipe: dirty until it reports"
    );
    cleared.reply(&server(&a));
    finalizer_goes_and_the_server_is_released(&mut api, &ctx, &mm, task, &a.uuid).await;
}

#[tokio::test]
async fn a_tenants_secret_in_another_namespace_is_refused_unread() {
    let (core, a, _) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid).with_bmc(json!({
        "endpoint": "ipmi://127.0.0.1:623",
        "credentialsSecretRef": {"name": "bmc", "namespace": "kube-system"},
    }));
    let task = reconcile_claimed_as(&ctx, &mut api, &a, &mm).await;
    // The next request is the status: no Secret of kube-system was asked for.
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=False/SecretOutsideNamespace"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    assert!(ctx.core.server(&a.uuid).await.unwrap().bmc.is_none());
}

#[tokio::test]
async fn a_machine_may_not_redirect_a_server_that_has_its_own_bmc() {
    let (core, a, _) = core_with_two().await;
    let own = crate::bmc::BmcSettings {
        address: "127.0.0.1:623".into(),
        protocol: crate::bmc::Protocol::Ipmi,
        driver: None,
        tls: Default::default(),
        username: "admin".into(),
    };
    core.set_bmc(&a.uuid, Some((own.clone(), "password".into())))
        .await
        .unwrap();
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid).with_bmc(json!({
        "endpoint": "ipmi://127.0.0.9:623", "user": "admin", "pass": "tenant",
    }));
    let task = reconcile_claimed_as(&ctx, &mut api, &a, &mm).await;
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=False/BMCConflict"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert_eq!(local.bmc, Some(own), "the server's own BMC is untouched");
    assert_eq!(local.bmc_lent_to, None);
}

#[tokio::test]
async fn a_machines_bmc_serves_its_claim_and_is_forgotten_on_release() {
    let (core, a, _) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid).with_bmc(json!({
        "endpoint": "ipmi://127.0.0.1:623", "user": "admin", "pass": "password",
    }));
    let task = reconcile_claimed_as(&ctx, &mut api, &a, &mm).await;
    // Lent for the claim; the power step runs through it (no driver here: it fails).
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("PoweredOn=False/PowerFailedNoDriver"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert_eq!(
        local.bmc.as_ref().map(|b| b.address.as_str()),
        Some("127.0.0.1:623")
    );
    assert_eq!(local.bmc_lent_to.as_deref(), Some("uid-cp-0"));
    assert!(api.published("InlineCredentials"), "{:?}", api.events);

    // Released: the lent BMC goes with the claim.
    let gone = mm.clone().deleted();
    let task = start(&ctx, &gone);
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    assert_eq!(status_patch(&mut api, &gone).await, "Ready=False/Deleting");
    api.expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await
        .reply(&server(&a));
    api.expect("PATCH", MM_PATH).await.reply(&gone.0);
    api.until_done(task).await.unwrap();
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert!(
        local.bmc.is_none() && local.bmc_lent_to.is_none(),
        "{local:?}"
    );
}

#[tokio::test]
async fn a_machine_ranked_after_other_racks_waits_its_turn_writing_nothing() {
    let (core, a, b) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    api.cached(&[server(&a), server(&b)], &[class_small()]);
    // Ten other racks with many free servers of the class: one of them is placed first
    // for this machine (this rack, with two, is first for about 1 machine in 5,000).
    let mut by_rack: std::collections::BTreeMap<String, u32> =
        (0..10).map(|i| (format!("rack-other-{i}"), 1000)).collect();
    by_rack.insert("rack-1".into(), 2);
    ctx.caches
        .free
        .send_replace(Some(Arc::new([("small".to_string(), by_rack)].into())));
    api.cached_capi(&[capi_machine()], &[cluster(true, false)]);
    let mm = Mm::test();
    let task = start(&ctx, &mm);
    // No request at all: no finalizer, no status, no claim.
    let action = api.until_done(task).await.expect("a wait, not an error");
    assert!(
        format!("{action:?}").contains("requeue_after: Some("),
        "looks again later (its turn may come): {action:?}"
    );
    assert!(api.events.is_empty(), "says nothing: {:?}", api.events);
    // With the other racks' servers gone, this rack is the only place: it claims.
    ctx.caches.free.send_replace(Some(Arc::new(
        [("small".to_string(), [("rack-1".to_string(), 2)].into())].into(),
    )));
    let task = start(&ctx, &mm);
    answer_bootstrap(&mut api).await;
    let claim = api.next().await;
    assert_eq!(
        (claim.method.as_str(), claim.path.as_str()),
        ("PATCH", format!("{SERVERS}/{}/status", a.uuid).as_str())
    );
    task.abort();
}

#[tokio::test]
async fn a_wait_the_machine_shows_already_is_not_written_again() {
    let (ctx, mut api) = Context::test(Core::test());
    let mm = Mm::test().without_owner();
    let task = start(&ctx, &mm);
    let call = api.expect("PATCH", &format!("{MM_PATH}/status")).await;
    let written = call.body["status"].clone();
    call.reply(&mm.0);
    api.until_done(task).await.expect("reconciled");
    // Requeued, the same wait, the machine now showing it: no request at all.
    let mut shown = mm.clone();
    shown.0["status"] = written;
    let task = start(&ctx, &shown);
    api.until_done(task).await.expect("reconciled");
}

#[tokio::test]
async fn a_new_machine_is_marked_with_its_claim_uid_and_blocks_moves() {
    let (core, _, _) = core_with_two().await;
    let (ctx, mut api) = Context::test(core);
    let mut mm = Mm::test();
    mm.0["metadata"]["annotations"] = json!({});
    mm.0["metadata"]["finalizers"] = json!([]);
    api.cached_capi(&[capi_machine()], &[cluster(true, false)]);
    let task = start(&ctx, &mm);
    let marks = api.expect("PATCH", MM_PATH).await;
    assert_eq!(marks.body["metadata"]["resourceVersion"], "7");
    assert_eq!(
        marks.body["metadata"]["finalizers"],
        json!([crate::controller::capi::FINALIZER])
    );
    assert_eq!(
        marks.body["metadata"]["annotations"],
        json!({CLAIM_UID_ANNOTATION: "uid-cp-0", BLOCK_MOVE: ""})
    );
    marks.conflict();
    api.expect("PATCH", &format!("{MM_PATH}/status"))
        .await
        .reply(&mm.0);
    assert!(api.until_done(task).await.is_err(), "tried again later");
}

#[tokio::test]
async fn a_paused_cluster_is_recorded_with_the_claim_before_the_block_move_mark_goes() {
    let (core, a) = core_with_cp0_claim().await;
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid);
    api.cached_capi(&[capi_machine()], &[cluster(true, true)]);
    let task = start(&ctx, &mm);
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&with_claim(server(&a), "uid-cp-0"));
    let unmark = api.expect("PATCH", MM_PATH).await;
    // By the time the mark goes (and clusterctl may delete the machine here), the
    // inventory knows the claim's cluster is paused.
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert!(local.provisioning.claim.is_some_and(|c| c.paused));
    assert_eq!(
        unmark.body["metadata"]["annotations"],
        json!({BLOCK_MOVE: null})
    );
    unmark.reply(&mm.0);
    assert_eq!(status_patch(&mut api, &mm).await, "Paused=True/Paused");
    api.until_done(task).await.unwrap();
}

#[tokio::test]
async fn a_machine_deleted_by_clusterctl_move_gives_nothing_back() {
    let (core, a) = core_with_cp0_claim().await;
    let (ctx, mut api) = Context::test(core);
    let mut mm = Mm::test().bound_to(&a.uuid).deleted();
    // clusterctl's JSON patch leaves this one annotation.
    mm.0["metadata"]["annotations"] = json!({DELETE_FOR_MOVE: ""});
    let task = start(&ctx, &mm);
    // No request at all: no release, no power, not even the finalizer (clusterctl takes it).
    assert_eq!(api.until_done(task).await.unwrap(), Action::await_change());
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert!(local.provisioning.claim.is_some() && local.bmc.is_none());
}

#[tokio::test]
async fn a_machine_moved_here_takes_its_server_back_without_powering_it() {
    let (core, a) = core_with_cp0_claim().await;
    core.mark_powered(&a.uuid, "uid-cp-0").await.unwrap();
    core.pause_claim(&a.uuid, "ns1/cp-0", "uid-cp-0", true)
        .await
        .unwrap();
    let before = core
        .server(&a.uuid)
        .await
        .unwrap()
        .provisioning
        .claim
        .unwrap();
    let (ctx, mut api) = Context::test(core);
    let mut mm = Mm::test().bound_to(&a.uuid).moved();
    mm.0["spec"]["providerID"] = json!(format!("arges://{}", a.uuid));
    let task = start(&ctx, &mm);
    // The Server as moved (no claim in its status) after the appliance's own push (in
    // use and not clean: its inventory holds it).
    let mut moved = server(&a);
    moved["metadata"]["uid"] = json!("server-copy-in-b");
    moved["status"] = json!({"clean": false, "phase": "Claimed"});
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&moved);
    api.cached_capi(&[capi_machine()], &[cluster(true, false)]);
    // Marked again for moves (the claim uid kept as it came).
    let marks = api.expect("PATCH", MM_PATH).await;
    assert_eq!(
        marks.body["metadata"]["annotations"],
        json!({BLOCK_MOVE: ""})
    );
    marks.reply(&mm.0);
    api.expect("GET", "/api/v1/namespaces/ns1/secrets/m-0-bootstrap")
        .await
        .reply(&bootstrap_secret());
    // The claim taken back under the uid it was made with.
    let claim = api
        .expect("PATCH", &format!("{SERVERS}/{}/status", a.uuid))
        .await;
    assert_eq!(
        claim.body["status"]["claim"],
        json!({"machine": "ns1/cp-0", "uid": "uid-cp-0", "cluster": "c1"})
    );
    claim.reply(&with_claim(moved.clone(), "uid-cp-0"));
    // Already bound: no bind. Powered once already: no power. Ready.
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=True/Provisioned"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    let after = ctx
        .core
        .server(&a.uuid)
        .await
        .unwrap()
        .provisioning
        .claim
        .unwrap();
    assert_eq!(after.powered_at, before.powered_at, "not powered again");
    assert_eq!(after.claimed_at, before.claimed_at, "the same claim");
    assert!(!after.paused, "unpaused by the reconcile that found it");
    assert_eq!(
        after.server_object.as_deref(),
        Some("server-copy-in-b"),
        "held through this cluster's copy of the Server now: the old cluster's sweep leaves it"
    );
}

#[tokio::test]
async fn a_moved_machine_deleted_before_it_took_its_claim_back_still_gives_it_back() {
    let (core, a) = core_with_cp0_claim().await;
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid).moved().deleted();
    let task = start(&ctx, &mm);
    // The Server as moved: no claim in its status; the inventory's record decides.
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&server(&a));
    assert_eq!(status_patch(&mut api, &mm).await, "Ready=False/Deleting");
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&server(&a));
    finalizer_goes_and_the_server_is_released(&mut api, &ctx, &mm, task, &a.uuid).await;
}

#[tokio::test]
async fn a_server_the_inventory_holds_for_another_machine_is_not_taken() {
    let (core, a, _) = core_with_two().await;
    core.claim_server(&a.uuid, claim_of("other"), BOOTSTRAP.as_bytes().to_vec())
        .await
        .unwrap();
    let (ctx, mut api) = Context::test(core);
    let mm = Mm::test().bound_to(&a.uuid);
    let task = start(&ctx, &mm);
    // Its status shows no claim yet (moved here, not pushed).
    api.expect("GET", &format!("{SERVERS}/{}", a.uuid))
        .await
        .reply(&server(&a));
    answer_bootstrap(&mut api).await;
    let conditions = status_patch(&mut api, &mm).await;
    assert!(
        conditions.contains("Ready=False/ServerInUse"),
        "{conditions}"
    );
    api.until_done(task).await.unwrap();
    let local = ctx.core.server(&a.uuid).await.unwrap();
    assert_eq!(
        local.provisioning.claim.map(|c| c.machine),
        Some("ns1/other".into()),
        "the other machine's claim stands"
    );
}
