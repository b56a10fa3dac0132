//! Kubernetes mode against a real control plane (etcd + kube-apiserver built from Go
//! modules): CRDs, Server sync with the real agent, kubectl driving the next boot,
//! validation, an apiserver restart, least-privilege RBAC, and several appliances sharing
//! one cluster; and promtool over the alert rules of `deploy/observability`.
//!
//! The first run builds the control plane (minutes), so `cargo test` leaves these out
//! (ignored); `tests/run-all.sh` builds it and runs them.

mod provider;

use arges::controller::resources::{APPLIANCE_LABEL, Server};
use kube::ResourceExt;
use test_support::control_plane::ControlPlane;
use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, Registration, eventually};

const UUID_1: &str = "11111111-2222-4333-8444-000000000001";
const UUID_2: &str = "11111111-2222-4333-8444-000000000002";

/// An appliance in Kubernetes mode with `identity`, using `kubeconfig`.
fn appliance(kubeconfig: &std::path::Path, identity: &str) -> Appliance {
    let dir = Appliance::prepare(&format!(
        "[kubernetes]\nidentity = \"{identity}\"\nnamespace = \"arges-system\"\n"
    ));
    Appliance::start_in(dir, &["--kubeconfig", &kubeconfig.display().to_string()])
}

/// Puts the generic IPMI driver, as plugins/build.sh (run before these tests) left it,
/// into the plugins folder of the appliance prepared in `dir`.
fn with_ipmi_driver(dir: &std::path::Path) {
    let ipmi = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/out/ipmi.wasm");
    std::fs::create_dir_all(dir.join("data/plugins")).unwrap();
    std::fs::copy(ipmi, dir.join("data/plugins/ipmi.wasm"))
        .unwrap_or_else(|e| panic!("{ipmi}: {e} (run plugins/build.sh first)"));
}

/// The real agent registers the recorded machine `root` under `uuid`.
fn register(a: &Appliance, root: &str, uuid: &str) {
    let out = a.agent(root, REG_TOKEN, Some(uuid));
    assert!(
        out.status.success(),
        "agent: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
}

/// `/boot.ipxe` of `uuid`/`mac` from 127.0.0.1, which must answer 200.
fn boot_script(a: &Appliance, uuid: &str, mac: &str) -> String {
    let (status, body) = a.boot_script(uuid, mac, "127.0.0.1");
    assert_eq!(status, 200, "{body}");
    body
}

/// LIST requests the apiserver has served for `resource`, by its own metrics.
fn lists_of(cp: &ControlPlane, resource: &str) -> u64 {
    let resource = format!("resource=\"{resource}\"");
    cp.kubectl(&["get", "--raw", "/metrics"])
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains(&resource)
                && l.contains("verb=\"LIST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn ensure_namespace(cp: &ControlPlane) {
    let out = cp.kubectl_output(&["create", "namespace", "arges-system"]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("AlreadyExists"),
        "{out:?}"
    );
}

/// Accepts Server `uuid` into the `talos` environment with kubectl.
fn accept(cp: &ControlPlane, uuid: &str) {
    cp.kubectl(&[
        "patch",
        "server",
        uuid,
        "--type=merge",
        "-p",
        r#"{"spec":{"accepted":true,"environmentRef":{"name":"talos"}}}"#,
    ]);
}

/// Accepts a Server into the `talos` environment with kubectl, and waits (at most `secs`)
/// until the appliance's next boot script for it says so.
fn accept_into_talos(
    cp: &ControlPlane,
    a: &Appliance,
    uuid: &str,
    mac: &str,
    secs: u64,
    what: &str,
) {
    accept(cp, uuid);
    eventually(secs, what, || {
        boot_script(a, uuid, mac)
            .contains("/env/talos/")
            .then_some(())
    });
}

/// Waits until `kubectl get servers` lists `uuid`; returns the wide table.
fn wait_for_server(cp: &ControlPlane, uuid: &str) -> String {
    eventually(
        60,
        &format!("Server {uuid} in `kubectl get servers`"),
        || {
            let out = cp.kubectl_output(&["get", "servers"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(uuid).then_some(text)
        },
    );
    cp.kubectl(&["get", "servers", "-o", "wide"])
}

/// Waits for an event with `reason`, in any namespace.
fn wait_for_event(cp: &ControlPlane, reason: &str) {
    eventually(30, &format!("an event {reason}"), || {
        let selector = format!("reason={reason}");
        let e = cp.kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &selector,
            "-o",
            "name",
        ]);
        (!e.trim().is_empty()).then_some(())
    });
}

/// Applies `manifest`, which the apiserver must refuse; returns kubectl's reason.
fn refused(cp: &ControlPlane, manifest: &str) -> String {
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], manifest);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "accepted, but should not be:\n{manifest}"
    );
    err
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn crds_apply_and_malformed_servers_are_refused_with_the_reason() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    let bad_mac = "apiVersion: metal.arges.dev/v1alpha1\nkind: Server\nmetadata:\n  name: bad-mac\nspec:\n  uuid: x\n  hardware:\n    nics:\n    - name: eth0\n      mac: not-a-mac\n";
    let err = refused(&cp, bad_mac);
    assert!(
        err.contains("spec.hardware.nics[0].mac") && err.contains("should match"),
        "{err}"
    );
    let no_uuid = "apiVersion: metal.arges.dev/v1alpha1\nkind: Server\nmetadata:\n  name: no-uuid\nspec:\n  accepted: true\n";
    let err = refused(&cp, no_uuid);
    assert!(err.contains("spec.uuid: Required value"), "{err}");
    let bad_port = "apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalCluster\nmetadata:\n  name: c\n  namespace: default\nspec:\n  apiEndpoints:\n  - host: 10.0.0.1\n    port: 70000\n";
    let err = refused(&cp, bad_port);
    assert!(err.contains("spec.apiEndpoints[0].port"), "{err}");
    // The guide's own shapes are accepted.
    let guide = "apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalCluster\nmetadata:\n  name: example-0\n  namespace: default\nspec:\n  apiEndpoints:\n  - host: 192.168.1.101\n    port: 6443\n---\napiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalMachine\nmetadata:\n  name: controlplane-0\n  namespace: default\nspec:\n  serverRef:\n    apiVersion: metal.arges.dev/v1alpha1\n    kind: Server\n    name: 00000000-0000-0000-0000-d05099d4c8ed\n  bmc:\n    endpoint: 10.0.0.9\n    user: admin\n    pass: secret\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], guide);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn registration_becomes_a_server_and_kubectl_drives_the_next_boot() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    let a = appliance(&cp.kubeconfig(), "rack-1");
    register(&a, "a", UUID_1);
    let table = wait_for_server(&cp, UUID_1);
    assert!(table.contains("Dell Inc."), "printer columns: {table}");
    let server: Server = cp.get(&["server", UUID_1]);
    assert_eq!(
        server.labels().get(APPLIANCE_LABEL).map(String::as_str),
        Some("rack-1")
    );
    assert_eq!(server.spec.hardware.vendor, "Dell Inc.");
    eventually(30, "the Server's status", || {
        let s: Server = cp.get(&["server", UUID_1]);
        (s.status?.appliance? == "rack-1").then_some(())
    });

    // Registered, not accepted: local disk.
    let mac = "b8:ca:3a:00:00:0a";
    assert!(boot_script(&a, UUID_1, mac).contains("boot from local disk"));
    // The Server's last boot, with what the appliance witnessed of it.
    let witnessed = eventually(30, "the Server's lastBoot with its witnessed steps", || {
        let s: serde_json::Value = cp.get(&["server", UUID_1]);
        let last = &s["status"]["lastBoot"];
        (last["action"] == "local-disk"
            && last["witnessed"]["lastStep"]
                .as_str()?
                .starts_with("boot_script local-disk"))
        .then(|| last["witnessed"].clone())
    });
    assert!(
        witnessed["steps"].as_u64() >= Some(2),
        "registered, then the script: {witnessed}"
    );
    // The admin API defers to the cluster.
    let (code, body) = a.request(
        "POST",
        &format!("/api/v1/servers/{UUID_1}/accept"),
        Some(ADMIN_TOKEN),
        b"",
    );
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));

    // An Environment and an acceptance, both with kubectl.
    std::fs::create_dir_all(a.data().join("assets/k8s")).unwrap();
    std::fs::write(a.data().join("assets/k8s/vmlinuz"), b"kernel").unwrap();
    std::fs::write(a.data().join("assets/k8s/initrd.img"), b"initrd").unwrap();
    let env = "apiVersion: metal.arges.dev/v1alpha1\nkind: Environment\nmetadata:\n  name: from-cluster\nspec:\n  kernel:\n    path: k8s/vmlinuz\n    args:\n    - console=ttyS0\n    - arges.uuid={{ machine.uuid }}\n  initrds:\n  - path: k8s/initrd.img\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.kubectl(&[
        "patch",
        "server",
        UUID_1,
        "--type=merge",
        "-p",
        r#"{"spec":{"accepted":true,"environmentRef":{"name":"from-cluster"}}}"#,
    ]);
    let script = eventually(30, "the next boot follows kubectl", || {
        let s = boot_script(&a, UUID_1, mac);
        s.contains("/env/from-cluster/vmlinuz").then_some(s)
    });
    assert!(script.contains(&format!("arges.uuid={UUID_1}")), "{script}");
    // The audit log names what changed and which manager changed it.
    let entry = eventually(10, "the change in the audit log", || {
        let (_, body) = a.request("GET", "/api/v1/audit?limit=1000", Some(ADMIN_TOKEN), b"");
        let all: serde_json::Value = serde_json::from_slice(&body).ok()?;
        all.as_array()?
            .iter()
            .find(|e| {
                e["action"] == "server_spec_applied"
                    && e["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("from-cluster"))
            })
            .cloned()
    });
    assert_eq!(entry["who"], "kubernetes manager=kubectl-patch", "{entry}");
    assert_eq!(entry["server"], UUID_1, "{entry}");
    // The environment's files are served.
    let (code, body) = a.request("GET", "/env/from-cluster/vmlinuz", None, b"");
    assert_eq!((code, body.as_slice()), (200, b"kernel".as_slice()));
    // The boot is reported back.
    eventually(30, "status.lastBoot", || {
        let s: Server = cp.get(&["server", UUID_1]);
        (s.status?.last_boot?.environment? == "from-cluster").then_some(())
    });

    // A class by vendor AND label: the server joins once it carries the label.
    let class = "apiVersion: metal.arges.dev/v1alpha1\nkind: ServerClass\nmetadata:\n  name: dell-rack-1\nspec:\n  qualifiers:\n    vendors: [\"Dell Inc.\"]\n  selector:\n    matchLabels:\n      rack: r1\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], class);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = || {
        cp.field(
            &["serverclass", "dell-rack-1"],
            "{.status.available}/{.status.servers}",
        )
    };
    eventually(60, "the class counts no server without the label", || {
        let c = count();
        (c.starts_with("0/") && !c.contains(UUID_1)).then_some(())
    });
    cp.kubectl(&["label", "server", UUID_1, "rack=r1"]);
    eventually(60, "the class counts the labelled server", || {
        (count() == format!("1/[\"{UUID_1}\"]")).then_some(())
    });
    // Counts come from watches: at steady state nobody lists Servers or ServerClasses
    // (the poll this replaced listed both every 5 s), and a label change still reaches
    // the counts within a bounded wait.
    let lists = || (lists_of(&cp, "servers"), lists_of(&cp, "serverclasses"));
    let before = lists();
    std::thread::sleep(std::time::Duration::from_secs(12));
    assert_eq!(
        lists(),
        before,
        "LISTs of (servers, serverclasses) at steady state"
    );
    cp.kubectl(&["label", "server", UUID_1, "rack=r2", "--overwrite"]);
    eventually(15, "the class lets the relabelled server go", || {
        let c = count();
        (c.starts_with("0/") && !c.contains(UUID_1)).then_some(())
    });
    cp.kubectl(&["label", "server", UUID_1, "rack=r1", "--overwrite"]);
    eventually(15, "the class takes it back", || {
        (count() == format!("1/[\"{UUID_1}\"]")).then_some(())
    });
    assert_eq!(lists(), before, "no LIST to follow the changes either");

    // Inline BMC credentials work but are warned about.
    cp.kubectl(&[
        "patch",
        "server",
        UUID_1,
        "--type=merge",
        "-p",
        r#"{"spec":{"bmc":{"endpoint":"10.0.0.9","user":"admin","pass":"inline"}}}"#,
    ]);
    wait_for_event(&cp, "InlineCredentials");

    // Cordoned with kubectl: local disk again.
    cp.kubectl(&[
        "patch",
        "server",
        UUID_1,
        "--type=merge",
        "-p",
        r#"{"spec":{"cordoned":true}}"#,
    ]);
    eventually(30, "a cordon takes effect", || {
        boot_script(&a, UUID_1, mac)
            .contains("boot from local disk")
            .then_some(())
    });
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn malformed_and_refused_registrations_never_stall_the_sync_of_other_servers() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    // The apiserver refuses one Server, whatever it holds (an admission policy, as a
    // site might have): a stand-in for any object it will not take.
    let stuck = Registration::numbered(1).uuid().to_string();
    let policy = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: no-stuck-server}}\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules:\n    - {{apiGroups: [metal.arges.dev], apiVersions: ['*'], operations: [CREATE, UPDATE], resources: [servers, servers/status]}}\n  validations:\n  - expression: \"object.metadata.name != '{stuck}'\"\n    message: this Server is refused by site policy\n---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: no-stuck-server}}\nspec:\n  policyName: no-stuck-server\n  validationActions: [Deny]\n"
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &policy);
    assert!(out.status.success(), "{out:?}");
    // The policy takes effect a moment after it is stored: wait until it refuses.
    let probe = format!(
        "apiVersion: metal.arges.dev/v1alpha1\nkind: Server\nmetadata: {{name: '{stuck}'}}\nspec: {{uuid: '{stuck}'}}\n"
    );
    eventually(30, "the admission policy refuses the Server", || {
        let out = cp.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &probe);
        String::from_utf8_lossy(&out.stderr)
            .contains("refused by site policy")
            .then_some(())
    });
    let a = appliance(&cp.kubeconfig(), "rack-1");
    // Garbage is refused at the edge, naming the field; it never reaches the inventory.
    let garbage = br#"{"uuid":"11111111-2222-4333-8444-0000000000ff","hardware":{"nics":[{"name":"eth0","mac":"not-a-mac"}]}}"#;
    let (code, body) = a.request("POST", "/api/v1/register", Some(REG_TOKEN), garbage);
    assert_eq!(code, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("hardware.nics[0].mac"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // A machine whose Server the apiserver refuses registers first; the ones after it
    // still become Servers.
    let mut uuids = Vec::new();
    for i in 1..=3 {
        uuids.push(a.register(&Registration::numbered(i)));
    }
    for uuid in &uuids[1..] {
        wait_for_server(&cp, uuid);
    }
    a.wait_metric("arges_controller_syncs_total{direction=\"push\",result=\"refused\"}");
    let none = cp.kubectl_output(&["get", "server", &stuck]);
    assert!(!none.status.success(), "the refused Server is not there");
    assert!(
        a.log()
            .contains("the apiserver refuses this Server's update; the others go on"),
        "{}",
        a.log()
    );
    // Said where an operator looks too: a Warning event on the Server.
    wait_for_event(&cp, "SyncRefused");
    // Once the apiserver takes it, it arrives, on its own backoff.
    cp.kubectl(&[
        "delete",
        "validatingadmissionpolicybinding",
        "no-stuck-server",
    ]);
    eventually(90, "the once refused Server arrives", || {
        cp.kubectl_output(&["get", "server", &stuck])
            .status
            .success()
            .then_some(())
    });
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn an_apiserver_restart_loses_nothing_and_boots_go_on_meanwhile() {
    let mut cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    let a = appliance(&cp.kubeconfig(), "rack-1");
    register(&a, "a", UUID_1);
    wait_for_server(&cp, UUID_1);
    accept_into_talos(
        &cp,
        &a,
        UUID_1,
        "b8:ca:3a:00:00:0a",
        30,
        "acceptance reaches the appliance",
    );

    cp.stop_apiserver();
    // The boot path keeps deciding from the local copy, and registrations keep working.
    assert!(boot_script(&a, UUID_1, "b8:ca:3a:00:00:0a").contains("/env/talos/"));
    register(&a, "b", UUID_2);
    std::thread::sleep(std::time::Duration::from_secs(3));
    cp.restart_apiserver();

    // The registration made while it was down arrives, and the watch resumes.
    wait_for_server(&cp, UUID_2);
    accept_into_talos(
        &cp,
        &a,
        UUID_2,
        "b8:ca:3a:00:00:0b",
        90,
        "reconciling resumes after the restart",
    );
    let m = a.metrics();
    assert!(
        m.contains("arges_controller_syncs_total{direction=\"push\",result=\"error\"}"),
        "the outage was seen:\n{m}"
    );
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn the_shipped_rbac_is_enough_and_no_more() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    cp.apply_rbac();
    let kubeconfig = cp.service_account_kubeconfig();
    let dir = Appliance::prepare(
        "[kubernetes]\nidentity = \"rack-sa\"\nnamespace = \"arges-system\"\n[bmc]\npoll_ms = 200\n",
    );
    with_ipmi_driver(dir.path());
    let a = Appliance::start_in(dir, &["--kubeconfig", &kubeconfig.display().to_string()]);
    register(&a, "a", UUID_1);
    wait_for_server(&cp, UUID_1);
    accept_into_talos(
        &cp,
        &a,
        UUID_1,
        "b8:ca:3a:00:00:0a",
        30,
        "the service account reconciles",
    );
    eventually(30, "the service account holds its Lease", || {
        let h = cp.field(
            &["lease", "arges-rack-sa", "-n", "arges-system"],
            "{.spec.holderIdentity}",
        );
        h.starts_with("rack-sa-").then_some(())
    });
    // The BMC from the Server, its credentials from a Secret the account may read.
    let bmc = test_support::ipmi_sim::Bmc::start();
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "bmc-r1",
        "-n",
        "arges-system",
        "--from-literal=user=admin",
        "--from-literal=pass=password",
    ]);
    let patch = format!(
        r#"{{"spec":{{"bmc":{{"endpoint":"ipmi://{}","credentialsSecretRef":{{"name":"bmc-r1"}}}}}}}}"#,
        bmc.addr
    );
    cp.kubectl(&["patch", "server", UUID_1, "--type=merge", "-p", &patch]);
    let taken = (0..300).any(|_| {
        let (_, b) = a.request(
            "GET",
            &format!("/api/v1/servers/{UUID_1}/bmc"),
            Some(ADMIN_TOKEN),
            b"",
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        serde_json::from_slice::<serde_json::Value>(&b)
            .is_ok_and(|v| v["bmc"]["username"] == "admin")
    });
    assert!(
        taken,
        "the appliance did not take the BMC from the Server:\n{}",
        a.log()
    );
    let (status, body) = a.request(
        "POST",
        &format!("/api/v1/servers/{UUID_1}/bmc/power"),
        Some(ADMIN_TOKEN),
        br#"{"action":"on"}"#,
    );
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        a.log()
    );
    assert!(bmc.ipmitool_says_on());
    eventually(30, "the Server shows the power and its condition", || {
        let status = cp.get::<Server>(&["server", UUID_1]).status?;
        let control = status
            .conditions
            .iter()
            .find(|c| c.type_ == "PowerControl")?;
        (status.power.as_deref() == Some("on") && control.status == "True").then_some(())
    });
    eventually(30, "an event says the power-on worked", || {
        let events = cp.kubectl(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.name={UUID_1}"),
        ]);
        events.contains("PowerOperationSucceeded").then_some(())
    });
    let sa = "system:serviceaccount:arges-system:arges";
    for (verb, resource, ns) in [
        ("list", "secrets", "default"),
        ("watch", "secrets", "default"),
        ("update", "secrets", "default"),
        ("list", "secrets", "arges-system"),
        ("delete", "machines.cluster.x-k8s.io", "default"),
        ("delete", "nodes", ""),
        ("create", "pods", "arges-system"),
        ("delete", "customresourcedefinitions", ""),
        ("update", "leases", "default"),
    ] {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", sa];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let out = cp.kubectl_output(&args);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "the appliance's account may {verb} {resource} in {ns:?}"
        );
    }
}

#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn appliances_share_a_cluster_and_replicas_elect_one_leader() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    let rack_a = appliance(&cp.kubeconfig(), "rack-a");
    let rack_b = appliance(&cp.kubeconfig(), "rack-b");
    register(&rack_a, "a", UUID_1);
    register(&rack_b, "b", UUID_2);
    wait_for_server(&cp, UUID_1);
    wait_for_server(&cp, UUID_2);
    for (uuid, owner) in [(UUID_1, "rack-a"), (UUID_2, "rack-b")] {
        let l = cp.field(
            &["server", uuid],
            "{.metadata.labels.metal\\.arges\\.dev/appliance}",
        );
        assert_eq!(l, owner);
    }
    // Rack B's acceptance changes rack B's machine only; rack A never learns of it.
    accept_into_talos(
        &cp,
        &rack_b,
        UUID_2,
        "b8:ca:3a:00:00:0b",
        30,
        "rack B applies its Server",
    );
    let (code, _) = rack_a.request(
        "GET",
        &format!("/api/v1/servers/{UUID_2}"),
        Some(ADMIN_TOKEN),
        b"",
    );
    assert_eq!(code, 404, "rack A must not import rack B's servers");

    // A second replica of rack A: one leader between them.
    let mut rack_a = rack_a;
    let replica = appliance(&cp.kubeconfig(), "rack-a");
    std::thread::sleep(std::time::Duration::from_secs(8));
    let leaders: Vec<bool> = [&rack_a, &replica]
        .iter()
        .map(|a| {
            a.metrics()
                .lines()
                .any(|l| l == "arges_controller_leader 1")
        })
        .collect();
    assert_eq!(
        leaders,
        vec![true, false],
        "exactly the first replica leads: {}\n--- first ---\n{}\n--- second ---\n{}",
        cp.kubectl(&["get", "lease", "-n", "arges-system", "-o", "yaml"]),
        rack_a.log(),
        replica.log()
    );
    // The leader dies without a word: the replica takes over once the Lease expires.
    rack_a.kill9();
    eventually(40, "the replica takes over", || {
        replica
            .metrics()
            .lines()
            .any(|l| l == "arges_controller_leader 1")
            .then_some(())
    });
    // The new leader is stopped as systemd or the kubelet stop it: it exits (a stopping
    // leader once took its own Lease again and again, never returning) and gives the
    // Lease up on its way out, so no replica waits for it to expire.
    let holder = || {
        cp.field(
            &["lease", "arges-rack-a", "-n", "arges-system"],
            "{.spec.holderIdentity}",
        )
    };
    let leading = holder();
    assert!(!leading.is_empty());
    let mut replica = replica;
    assert!(replica.terminate().success(), "{}", replica.log());
    assert_eq!(holder(), "", "the Lease of {leading} given up");
    assert!(replica.log().contains("Lease released"));
}

/// `deploy/observability/alerts.yaml` is valid Prometheus rules, and its unit tests
/// (`alerts-test.yaml`: a healthy appliance fires nothing, each trouble fires its alert
/// with its labels and text) pass under promtool, built from the Prometheus module.
#[test]
#[ignore = "promtool (built from the Prometheus Go module); tests/run-all.sh runs it"]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = test_support::control_plane::bin_dir().join("promtool");
    assert!(
        promtool.is_file(),
        "{} is missing: run tests/k8s/build-binaries.sh",
        promtool.display()
    );
    let dir = test_support::repo().join("deploy/observability");
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts-test.yaml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("SUCCESS"),
            "promtool {args:?}:\n{text}"
        );
    }
}

/// In Kubernetes mode the console also takes the token of a Kubernetes user: the
/// appliance (with the shipped RBAC) asks TokenReview who it is and SubjectAccessReview
/// whether it may update Servers. A user allowed to gets a session, audited by name; one
/// that is not, or a token the cluster does not know, gets the login page.
#[test]
#[ignore = "real kube-apiserver (built from Go modules); tests/run-all.sh runs it"]
fn a_kubernetes_user_allowed_to_update_servers_logs_into_the_console() {
    let cp = ControlPlane::start();
    cp.apply_crds();
    cp.apply_rbac();
    let a = appliance(&cp.service_account_kubeconfig(), "rack-1");
    let operators = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: operator, namespace: default}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: viewer, namespace: default}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: fleet-operator}\nrules:\n- {apiGroups: [metal.arges.dev], resources: [servers], verbs: [get, list, update, patch]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: fleet-operator}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fleet-operator}\nsubjects:\n- {kind: ServiceAccount, name: operator, namespace: default}\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], operators);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = |sa: &str| {
        cp.kubectl(&["create", "token", sa, "-n", "default", "--duration=1h"])
            .trim()
            .to_string()
    };
    let login = |t: &str| {
        let (s, _, headers) = test_support::curl(&[
            "--data-urlencode",
            &format!("token={t}"),
            &a.url("/console/login"),
        ]);
        (s, headers.contains("set-cookie: arges_session="))
    };
    // The controller sets the reviewer as it starts: until then only the admin token.
    let operator = token("operator");
    eventually(30, "the operator's token accepted", || {
        (login(&operator) == (303, true)).then_some(())
    });
    assert_eq!(
        login(&token("viewer")),
        (401, false),
        "no right to update Servers"
    );
    assert_eq!(login("not-a-token"), (401, false));
    assert_eq!(
        login(ADMIN_TOKEN),
        (303, true),
        "the admin token still works"
    );
    eventually(10, "the logins audited by name", || {
        let (_, body) = a.request("GET", "/api/v1/audit?after=0", Some(ADMIN_TOKEN), b"");
        let all: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let all = all.as_array()?;
        let by = |who: &str, outcome: &str| {
            all.iter().any(|e| {
                e["action"] == "console login" && e["who"] == who && e["outcome"] == outcome
            })
        };
        (by(
            "kubernetes system:serviceaccount:default:operator (console)",
            "ok",
        ) && by("unknown", "refused"))
        .then_some(())
    });
}
