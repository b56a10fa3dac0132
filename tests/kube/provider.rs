//! Arges as a Cluster API infrastructure provider, beside the real Cluster API core
//! manager and the real Talos bootstrap provider (`cluster_api.rs`): the guide's cluster
//! from `deploy/examples/cluster/`, claims by class under contention, release and reuse,
//! and the failure paths (wrong BMC password, a server in use, missing bootstrap data,
//! no BMC, an appliance and an apiserver restarted mid-provision); and the real clusterctl
//! reading `deploy/clusterctl` as a local repository (the components, the default
//! template provisioned, the clusterclass flavor accepted).

mod moves;

use std::time::Duration;

use crate::{UUID_1, UUID_2, accept, boot_script, ensure_namespace, register, wait_for_server};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use test_support::cluster_api::ClusterApi;
use test_support::control_plane::ControlPlane;
use test_support::ipmi_sim::Bmc;
use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, Registration, eventually, param, within};

const NS: &str = "arges-examples";
const MAC_1: &str = "b8:ca:3a:00:00:0a";

/// The control plane with the Cluster API controllers, every CRD and the shipped RBAC.
fn control_plane() -> (ControlPlane, ClusterApi) {
    let cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    cp.apply_rbac();
    let capi = ClusterApi::start(&cp);
    cp.kubectl(&["create", "namespace", NS]);
    (cp, capi)
}

/// An appliance in Kubernetes mode (identity `rack-1`) with the shipped IPMI driver,
/// as the shipped service account: its RBAC must be enough for the provider.
fn provider_appliance(cp: &ControlPlane, extra: &str) -> Appliance {
    provider_appliance_as(cp, "rack-1", extra)
}

/// [`provider_appliance`] with another identity.
fn provider_appliance_as(cp: &ControlPlane, identity: &str, extra: &str) -> Appliance {
    let kubeconfig = cp.service_account_kubeconfig();
    let dir = Appliance::prepare(&format!(
        "[kubernetes]\nidentity = \"{identity}\"\nnamespace = \"arges-system\"\n{extra}\n[bmc]\npoll_ms = 200\n"
    ));
    crate::with_ipmi_driver(dir.path());
    Appliance::start_in(dir, &["--kubeconfig", &kubeconfig.display().to_string()])
}

/// `GET /configdata` (or with `done`, `POST /configdata/done`) for `uuid` with `token`.
fn configdata(a: &Appliance, done: bool, uuid: &str, token: &str) -> (u16, Vec<u8>) {
    let (method, path) = if done {
        ("POST", "/configdata/done")
    } else {
        ("GET", "/configdata")
    };
    a.request(
        method,
        &format!("{path}?uuid={uuid}&token={token}"),
        None,
        b"",
    )
}

fn apply(cp: &ControlPlane, yaml: &str) {
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], yaml);
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guide's manifests from `deploy/examples/cluster/`, filled in.
fn guide_manifests(cp: &ControlPlane, uuid: &str, bmc: &Bmc) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/cluster");
    cp.kubectl(&["kustomize", dir])
        .replace("ENDPOINT", "10.0.0.10")
        .replace("name: UUID", &format!("name: {uuid}"))
        .replace("ipmi://BMC", &format!("ipmi://{}", bmc.addr))
}

fn bmc_secret(cp: &ControlPlane, name: &str, pass: &str) {
    let _ = cp.kubectl_output(&["delete", "secret", name, "-n", NS, "--ignore-not-found"]);
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        name,
        "-n",
        NS,
        "--from-literal=user=admin",
        &format!("--from-literal=pass={pass}"),
    ]);
}

/// `status/reason` of condition `type_` of a namespaced object (a MetalMachine or a
/// MetalCluster: their statuses share the conditions' shape), read typed.
fn condition(cp: &ControlPlane, object: &[&str], type_: &str) -> String {
    /// The part of a status this reads.
    #[derive(serde::Deserialize)]
    struct Conditioned {
        #[serde(default)]
        status: Option<Status>,
    }
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        conditions: Vec<Condition>,
    }
    let mut args = object.to_vec();
    args.extend(["-n", NS]);
    let obj: Conditioned = cp.get(&args);
    obj.status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
        .map(|c| format!("{}/{}", c.status, c.reason))
        .unwrap_or_else(|| "/".into())
}

/// Waits until the MetalMachine's `Ready` condition is `want` (`True/Provisioned`, …).
fn wait_ready(
    cp: &ControlPlane,
    a: &Appliance,
    capi: &ClusterApi,
    name: &str,
    want: &str,
    secs: u64,
) {
    let start = std::time::Instant::now();
    loop {
        let got = condition(cp, &["metalmachine", name], "Ready");
        if got == want {
            return;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            panic!(
                "MetalMachine {name}: Ready is {got:?}, not {want:?} within {secs} s\n{}\n{}\n{}",
                cp.kubectl(&["get", "metalmachine", name, "-n", NS, "-o", "yaml"]),
                a.log(),
                capi.log("capi")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A copy of the recorded machine `tree` with a "disk" (a file full of 0xa5) as the
/// device node of each of `disks`.
fn wipe_root(tree: &str, disks: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/machines/").to_string() + tree;
    let ok = std::process::Command::new("cp")
        .args([
            "-r",
            &format!("{src}/."),
            &root.path().display().to_string(),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "copy {src}");
    std::fs::create_dir_all(root.path().join("dev")).unwrap();
    for d in disks {
        std::fs::write(root.path().join("dev").join(d), vec![0xa5u8; 1 << 20]).unwrap();
    }
    root
}

/// What the machines and servers look like, and the logs.
fn pool_state(cp: &ControlPlane, a: &Appliance, capi: &ClusterApi) -> String {
    format!(
        "{}\n{}\n{}\n{}",
        cp.kubectl(&["get", "machines,metalmachines", "-n", NS, "-o", "wide"]),
        cp.kubectl(&["get", "servers", "-o", "wide"]),
        a.log(),
        capi.log("capi")
    )
}

/// The `/configdata` token on the kernel command line of a boot script.
fn token(script: &str) -> String {
    let t = param(script, "token");
    assert!(!t.is_empty(), "a token in the script:\n{script}");
    t
}

fn events(cp: &ControlPlane, name: &str) -> String {
    cp.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "-o",
        "custom-columns=TYPE:.type,REASON:.reason,NOTE:.note,MESSAGE:.message",
    ])
}

/// Waits for an event with `reason` on `name` (it follows its condition by a moment);
/// the events of `name`.
fn wait_event(cp: &ControlPlane, name: &str, reason: &str) -> String {
    within(
        30,
        &format!("an event {reason} on {name}"),
        || {
            let ev = events(cp, name);
            ev.contains(reason).then_some(ev)
        },
        || events(cp, name),
    )
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn the_guide_s_cluster_is_provisioned_by_real_cluster_api_and_cabpt() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "");
    // Register, then accept into the Talos environment (the guide's `default` one).
    register(&a, "a", UUID_1);
    wait_for_server(&cp, UUID_1);
    accept(&cp, UUID_1);
    let bmc = Bmc::start();
    bmc_secret(&cp, "controlplane-0-bmc", "password");
    let applied = std::time::Instant::now();
    apply(&cp, &guide_manifests(&cp, UUID_1, &bmc));

    // Cluster API and CABPT do their part, Arges its: the Cluster is Provisioned, the
    // MetalMachine ready with its providerID, the machine powered on.
    wait_ready(&cp, &a, &capi, "controlplane-0", "True/Provisioned", 120);
    eprintln!(
        "guide manifests applied to MetalMachine ready (claimed, PXE set, powered on): {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    let clusters = eventually(60, "kubectl get clusters says Provisioned", || {
        let t = cp.kubectl(&["get", "clusters", "-n", NS]);
        t.contains("Provisioned").then_some(t)
    });
    assert!(clusters.contains("example-0"), "{clusters}");
    assert_eq!(
        cp.field(
            &["metalmachine", "controlplane-0", "-n", NS],
            "{.spec.providerID}"
        ),
        format!("arges://{UUID_1}")
    );
    assert_eq!(
        cp.field(
            &["metalcluster", "example-0", "-n", NS],
            "{.spec.controlPlaneEndpoint.host}:{.status.initialization.provisioned}"
        ),
        "10.0.0.10:true"
    );
    eventually(60, "the Machine takes the providerID", || {
        let p = cp.field(
            &["machine", "controlplane-0", "-n", NS],
            "{.spec.providerID}",
        );
        (p == format!("arges://{UUID_1}")).then_some(())
    });
    assert!(bmc.ipmitool_says_on(), "the machine was powered on");
    assert!(
        bmc.requests().contains("boot pxe"),
        "PXE first: {}",
        bmc.requests()
    );
    assert_eq!(
        cp.field(
            &["server", UUID_1],
            "{.status.inUse}/{.status.claim.machine}"
        ),
        format!("true/{NS}/controlplane-0")
    );
    let data = cp.field(&["talosconfig", "controlplane-0", "-n", NS], "{.spec.data}");
    assert!(data.contains("clusterName: example-0"), "{data}");

    // The machine boots into its install environment, with a token on its command line;
    // /configdata serves the Machine's bootstrap data to it, and to nobody else.
    let script = boot_script(&a, UUID_1, MAC_1);
    assert!(script.contains("/env/talos/"), "{script}");
    let t = token(&script);
    let (code, body) = configdata(&a, false, UUID_1, &t);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // What CABPT made of the TalosConfig (it normalises the YAML) is what is served.
    let value = test_support::cluster_api::bootstrap_data(&cp, NS, "controlplane-0");
    assert_eq!(body, value, "the bootstrap data Secret's value");
    assert!(String::from_utf8_lossy(&body).contains("endpoint: https://10.0.0.10:6443"));
    let (code, _) = configdata(&a, false, UUID_2, &t);
    assert_eq!(code, 403, "another machine with this token");
    let (code, _) = configdata(&a, false, UUID_1, "guess");
    assert_eq!(code, 403, "a wrong token");
    eventually(30, "the Server shows the install in progress", || {
        (cp.field(&["server", UUID_1], "{.status.phase}") == "Installing").then_some(())
    });

    // The install environment reports; the machine boots its disk from now on.
    let (code, body) = configdata(&a, true, UUID_1, &t);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    eventually(30, "the MetalMachine says installed", || {
        (condition(&cp, &["metalmachine", "controlplane-0"], "Installed") == "True/InstallReported")
            .then_some(())
    });
    assert!(boot_script(&a, UUID_1, MAC_1).contains("boot from local disk"));
    for reason in [
        "SecretFound",
        "Claimed",
        "NetworkBooting",
        "InstallReported",
    ] {
        wait_event(&cp, "controlplane-0", reason);
    }

    // Deleting the Cluster releases the server: wiped (the default), then free.
    cp.kubectl(&["delete", "cluster", "example-0", "-n", NS, "--timeout=120s"]);
    assert_eq!(
        cp.kubectl(&["get", "metalmachines,machines", "-n", NS, "-o", "name"])
            .trim(),
        ""
    );
    eventually(30, "the Server is released for its wipe", || {
        let s = cp.field(
            &["server", UUID_1],
            "{.status.inUse}/{.status.clean}/{.status.phase}",
        );
        (s == "false/false/Wiping").then_some(())
    });
    // The release power-cycled the machine through its BMC: that opened a window, and
    // the wipe boot claiming it carries the wipe's own registration secret.
    let wipe = boot_script(&a, UUID_1, MAC_1);
    assert!(wipe.contains("arges.mode=wipe"), "{wipe}");
    let secret = param(&wipe, "arges.token");
    assert_eq!(secret.len(), 64, "{wipe}");
    // The wipe environment's agent wipes the disks (device nodes under a copy of the
    // recorded machine), then registers in wipe mode: clean and free again. A forged
    // report (the shared token, which any hand-run agent has) counts for nothing.
    let root = wipe_root("a", &["nvme0n1", "sda", "loop0"]);
    let wipe_agent = |token: &str| {
        std::process::Command::new(test_support::bin())
            .args(["agent", "--appliance", &a.url(""), "--token", token])
            .args([
                "--timeout",
                "20",
                "--uuid",
                UUID_1,
                "--mode",
                "wipe",
                "--root",
            ])
            .arg(root.path())
            .output()
            .unwrap()
    };
    let forged = wipe_agent(REG_TOKEN);
    assert_eq!(forged.status.code(), Some(3), "{forged:?}");
    assert!(
        String::from_utf8_lossy(&forged.stderr).contains("wipe report counts only"),
        "{forged:?}"
    );
    assert_eq!(
        cp.field(&["server", UUID_1], "{.status.clean}/{.status.phase}"),
        "false/Wiping",
        "a forged wipe report leaves the server dirty"
    );
    let out = wipe_agent(&secret);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "power-off");
    for disk in ["nvme0n1", "sda"] {
        let bytes = std::fs::read(root.path().join("dev").join(disk)).unwrap();
        assert!(bytes.iter().all(|b| *b == 0), "{disk} was wiped");
    }
    eventually(30, "the Server is clean and available", || {
        let s = cp.field(&["server", UUID_1], "{.status.clean}/{.status.phase}");
        (s == "true/Available").then_some(())
    });
    let s = a.server_json(UUID_1);
    assert_eq!(s["has_config"], false, "the bootstrap data is gone: {s}");
}

/// The Secret `bmc` (admin/password) Servers' `spec.bmc` names, in the appliance's
/// namespace.
fn server_bmc_secret(cp: &ControlPlane) {
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "bmc",
        "-n",
        "arges-system",
        "--from-literal=user=admin",
        "--from-literal=pass=password",
    ]);
}

/// Machines a and b registered on `a` (and the Servers `more`), all accepted, and the
/// guide's cluster provisioned on the first, powered through the returned BMC.
fn guide_cluster_provisioned(
    cp: &ControlPlane,
    capi: &ClusterApi,
    a: &Appliance,
    more: &[&str],
) -> Bmc {
    register(a, "a", UUID_1);
    register(a, "b", UUID_2);
    for uuid in [UUID_1, UUID_2].iter().chain(more) {
        wait_for_server(cp, uuid);
        accept(cp, uuid);
    }
    let bmc = Bmc::start();
    bmc_secret(cp, "controlplane-0-bmc", "password");
    apply(cp, &guide_manifests(cp, UUID_1, &bmc));
    wait_ready(cp, a, capi, "controlplane-0", "True/Provisioned", 120);
    bmc
}

/// Machines 1 to `n` registered on `a`, each accepted with a BMC of its own, and the
/// ServerClass `qemu` that takes them: their BMCs and UUIDs.
fn qemu_class_of(cp: &ControlPlane, a: &Appliance, n: u32) -> (Vec<Bmc>, Vec<String>) {
    let bmcs: Vec<Bmc> = (0..n).map(|_| Bmc::start()).collect();
    let uuids: Vec<String> = (1..=n).map(|i| register_machine(a, i)).collect();
    for (uuid, bmc) in uuids.iter().zip(&bmcs) {
        wait_for_server(cp, uuid);
        accept_with_bmc(cp, uuid, bmc);
    }
    apply(
        cp,
        "apiVersion: metal.arges.dev/v1alpha1\nkind: ServerClass\nmetadata:\n  name: qemu\nspec:\n  qualifiers:\n    vendors: [QEMU]\n",
    );
    (bmcs, uuids)
}

/// Registers machine `i` (a QEMU machine with one disk) over the API; its UUID.
fn register_machine(a: &Appliance, i: u32) -> String {
    a.register(&Registration::numbered(i))
}

/// Accepts Server `uuid` into `talos`, with its BMC at `bmc` (credentials from the
/// Secret `bmc` in the appliance's namespace).
fn accept_with_bmc(cp: &ControlPlane, uuid: &str, bmc: &Bmc) {
    let patch = format!(
        r#"{{"spec":{{"accepted":true,"environmentRef":{{"name":"talos"}},"bmc":{{"endpoint":"ipmi://{}","credentialsSecretRef":{{"name":"bmc"}}}}}}}}"#,
        bmc.addr
    );
    cp.kubectl(&["patch", "server", uuid, "--type=merge", "-p", &patch]);
}

/// A Cluster whose workers come from a MachineDeployment of `replicas`, on the
/// MetalMachineTemplate `pool` (servers of the class `qemu`).
fn pool_manifests(replicas: u32) -> String {
    format!(
        r#"apiVersion: cluster.x-k8s.io/v1beta2
kind: Cluster
metadata: {{name: pool, namespace: {NS}}}
spec:
  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalCluster, name: pool}}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalCluster
metadata: {{name: pool, namespace: {NS}}}
spec:
  controlPlaneEndpoint: {{host: 10.0.0.20, port: 6443}}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalMachineTemplate
metadata: {{name: pool, namespace: {NS}}}
spec:
  template:
    spec:
      serverClassRef: {{name: qemu}}
---
apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
kind: TalosConfigTemplate
metadata: {{name: pool, namespace: {NS}}}
spec:
  template:
    spec:
      generateType: none
      data: |
        version: v1alpha1
        machine: {{type: worker}}
        cluster: {{clusterName: pool, controlPlane: {{endpoint: "https://10.0.0.20:6443"}}}}
---
apiVersion: cluster.x-k8s.io/v1beta2
kind: MachineDeployment
metadata: {{name: pool, namespace: {NS}}}
spec:
  clusterName: pool
  replicas: {replicas}
  # Cluster API's defaulting webhook would set these; the tests register no admission
  # webhooks, so they are spelled out.
  rollout: {{strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}}}
  deletion: {{order: Random}}
  selector: {{matchLabels: {{pool: workers}}}}
  template:
    metadata: {{labels: {{pool: workers}}}}
    spec:
      clusterName: pool
      version: v1.35.4
      bootstrap:
        configRef: {{apiGroup: bootstrap.cluster.x-k8s.io, kind: TalosConfigTemplate, name: pool}}
      infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalMachineTemplate, name: pool}}
"#
    )
}

/// Every MetalMachine: (name, Ready status/reason, providerID, uid).
fn metal_machines(cp: &ControlPlane) -> Vec<(String, String, String, String)> {
    let table = cp.kubectl(&[
        "get",
        "metalmachines",
        "-n",
        NS,
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}/{.status.conditions[?(@.type=="Ready")].reason} {.spec.providerID} {.metadata.uid}{"\n"}{end}"#,
    ]);
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 4).then(|| (f[0].into(), f[1].into(), f[2].into(), f[3].into()))
        })
        .collect()
}

/// Every Server: (name, claim uid, phase).
fn server_claims(cp: &ControlPlane) -> Vec<(String, String, String)> {
    let table = cp.kubectl(&[
        "get",
        "servers",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} {.status.claim.uid} {.status.phase}{"\n"}{end}"#,
    ]);
    table
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].to_string(),
                f.get(1).unwrap_or(&"").to_string(),
                f.get(2).unwrap_or(&"").to_string(),
            )
        })
        .collect()
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn machines_of_a_class_never_share_a_server_and_freed_servers_are_reused() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "release = \"power-off\"");
    server_bmc_secret(&cp);
    let (bmcs, _) = qemu_class_of(&cp, &a, 6);
    eventually(60, "the class counts six free servers", || {
        (cp.field(&["serverclass", "qemu"], "{.status.available}") == "6").then_some(())
    });

    // Nine machines at once for six servers.
    let applied = std::time::Instant::now();
    apply(&cp, &pool_manifests(9));
    let settled = within(
        180,
        "six machines ready and three waiting for a server",
        || {
            let mms = metal_machines(&cp);
            let ready = mms.iter().filter(|m| m.1 == "True/Provisioned").count();
            let waiting = mms.iter().filter(|m| m.1 == "False/NoFreeServer").count();
            (mms.len() == 9 && ready == 6 && waiting == 3).then_some(mms)
        },
        || pool_state(&cp, &a, &capi),
    );
    eprintln!(
        "nine MachineDeployment machines for six servers: settled (six claimed, powered, ready) in {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    let mut ids: Vec<&String> = settled
        .iter()
        .filter(|m| m.1 == "True/Provisioned")
        .map(|m| &m.2)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "six distinct providerIDs: {settled:?}");
    let claims = server_claims(&cp);
    for (server, uid, _) in &claims {
        let holders: Vec<_> = settled.iter().filter(|m| &m.3 == uid).collect();
        assert_eq!(
            holders.len(),
            1,
            "Server {server} is held by exactly one machine: {settled:?}"
        );
        assert_eq!(
            holders[0].2,
            format!("arges://{server}"),
            "and that machine names it"
        );
    }
    for bmc in &bmcs {
        assert!(bmc.ipmitool_says_on());
    }
    let waiting = settled
        .iter()
        .find(|m| m.1 == "False/NoFreeServer")
        .unwrap();
    wait_event(&cp, &waiting.0, "NoFreeServer");

    // Down to four: the servers released are powered off and free (release =
    // power-off), and the machines that waited get the servers freed.
    cp.kubectl(&[
        "patch",
        "machinedeployment",
        "pool",
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    within(
        180,
        "four machines, all ready, two servers free",
        || {
            let mms = metal_machines(&cp);
            let claims = server_claims(&cp);
            let free = claims
                .iter()
                .filter(|c| c.1.is_empty() && c.2 == "Available")
                .count();
            (mms.len() == 4 && mms.iter().all(|m| m.1 == "True/Provisioned") && free == 2)
                .then_some(())
        },
        || pool_state(&cp, &a, &capi),
    );
    let off = bmcs.iter().filter(|b| !b.ipmitool_says_on()).count();
    assert_eq!(off, 2, "the released servers were powered off");
}

/// A Machine `name` of cluster `example-0` on the MetalMachine `name`, with its own
/// TalosConfig (or, with `data_secret`, a bootstrap data Secret name and no config).
fn machine_manifests(
    name: &str,
    server: &str,
    bmc: Option<&Bmc>,
    data_secret: Option<&str>,
) -> String {
    let bmc = bmc
        .map(|b| format!("\n  bmc:\n    endpoint: ipmi://{}\n    credentialsSecretRef: {{name: controlplane-0-bmc}}", b.addr))
        .unwrap_or_default();
    let bootstrap = match data_secret {
        Some(s) => format!("dataSecretName: {s}"),
        None => format!(
            "configRef: {{apiGroup: bootstrap.cluster.x-k8s.io, kind: TalosConfig, name: {name}}}"
        ),
    };
    let config = if data_secret.is_some() {
        String::new()
    } else {
        format!(
            "---\napiVersion: bootstrap.cluster.x-k8s.io/v1alpha3\nkind: TalosConfig\nmetadata: {{name: {name}, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: example-0}}}}\nspec:\n  generateType: none\n  data: |\n    version: v1alpha1\n    machine: {{type: worker}}\n"
        )
    };
    format!(
        "apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2\nkind: MetalMachine\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  serverRef: {{apiVersion: metal.arges.dev/v1alpha1, kind: Server, name: {server}}}{bmc}\n---\napiVersion: cluster.x-k8s.io/v1beta2\nkind: Machine\nmetadata: {{name: {name}, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: example-0}}}}\nspec:\n  clusterName: example-0\n  version: v1.35.4\n  bootstrap: {{{bootstrap}}}\n  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalMachine, name: {name}}}\n{config}"
    )
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn failures_say_why_and_provisioning_recovers_across_restarts() {
    let (mut cp, capi) = control_plane();
    let mut a = provider_appliance(&cp, "");
    register(&a, "a", UUID_1);
    register(&a, "b", UUID_2);
    for uuid in [UUID_1, UUID_2] {
        wait_for_server(&cp, uuid);
        accept(&cp, uuid);
    }
    let bmc = Bmc::start();

    // A wrong BMC password: the server is claimed, the power-on refused, and said so.
    bmc_secret(&cp, "controlplane-0-bmc", "not-the-password");
    apply(&cp, &guide_manifests(&cp, UUID_1, &bmc));
    wait_ready(
        &cp,
        &a,
        &capi,
        "controlplane-0",
        "False/PowerFailedCredentials",
        120,
    );
    assert!(!bmc.ipmitool_says_on());
    let ev = wait_event(&cp, "controlplane-0", "PowerFailedCredentials");
    assert!(ev.contains("Warning"), "{ev}");
    assert!(
        !ev.contains("not-the-password"),
        "no password in events: {ev}"
    );
    let claimed = cp.field(&["server", UUID_1], "{.status.claim.uid}");
    assert_eq!(
        claimed,
        cp.field(
            &["metalmachine", "controlplane-0", "-n", NS],
            "{.metadata.uid}"
        )
    );

    // A second machine naming the same server waits, and says why.
    apply(
        &cp,
        &machine_manifests("intruder", UUID_1, Some(&bmc), None),
    );
    wait_ready(&cp, &a, &capi, "intruder", "False/ServerInUse", 60);
    wait_event(&cp, "intruder", "ServerInUse");

    // Bootstrap data that does not exist.
    apply(
        &cp,
        &machine_manifests("nodata", UUID_2, None, Some("no-such-secret")),
    );
    wait_ready(&cp, &a, &capi, "nodata", "False/BootstrapDataMissing", 60);

    // The appliance dies mid-provision; the password is fixed while it is down. Back up,
    // it carries on with the same claim and powers the machine on.
    a.kill9();
    bmc_secret(&cp, "controlplane-0-bmc", "password");
    a.restart_after_kill9();
    wait_ready(&cp, &a, &capi, "controlplane-0", "True/Provisioned", 120);
    assert!(bmc.ipmitool_says_on());
    assert_eq!(
        cp.field(&["server", UUID_1], "{.status.claim.uid}"),
        claimed,
        "the same claim"
    );
    assert_eq!(
        condition(&cp, &["metalmachine", "intruder"], "Ready"),
        "False/ServerInUse",
        "and the intruder still does not get it"
    );

    // No BMC anywhere: claimed, then stuck with the reason. The apiserver restarts
    // meanwhile; once the Server gets a BMC the machine is provisioned.
    cp.kubectl(&["delete", "machine", "nodata", "-n", NS, "--timeout=60s"]);
    apply(&cp, &machine_manifests("nobmc", UUID_2, None, None));
    wait_ready(&cp, &a, &capi, "nobmc", "False/NoBMC", 60);
    cp.stop_apiserver();
    std::thread::sleep(Duration::from_secs(3));
    cp.restart_apiserver();
    let bmc_2 = Bmc::start();
    server_bmc_secret(&cp);
    let patch = format!(
        r#"{{"spec":{{"bmc":{{"endpoint":"ipmi://{}","credentialsSecretRef":{{"name":"bmc"}}}}}}}}"#,
        bmc_2.addr
    );
    cp.kubectl(&["patch", "server", UUID_2, "--type=merge", "-p", &patch]);
    wait_ready(&cp, &a, &capi, "nobmc", "True/Provisioned", 120);
    assert!(bmc_2.ipmitool_says_on());
    let m = a.metrics();
    assert!(
        m.contains("arges_capi_reconciles_total{kind=\"MetalMachine\",result=\"blocked\"}"),
        "{m}"
    );

    // The Cluster is deleted while the appliance is down: once back, it releases each
    // server once, as each one's policy says (UUID_2's own: power off, free at once),
    // and lets every machine go.
    cp.kubectl(&[
        "patch",
        "server",
        UUID_2,
        "--type=merge",
        "-p",
        r#"{"spec":{"release":"PowerOff"}}"#,
    ]);
    a.kill9();
    cp.kubectl(&["delete", "cluster", "example-0", "-n", NS, "--wait=false"]);
    std::thread::sleep(Duration::from_secs(2));
    a.restart_after_kill9();
    within(
        120,
        "every machine gone, one server released for its wipe and one free",
        || {
            let left = cp.kubectl(&["get", "metalmachines,machines", "-n", NS, "-o", "name"]);
            let mut phases: Vec<(String, String)> = server_claims(&cp)
                .into_iter()
                .filter(|c| c.1.is_empty())
                .map(|c| (c.0, c.2))
                .collect();
            phases.sort();
            let want = [
                (UUID_1.to_string(), "Wiping".to_string()),
                (UUID_2.to_string(), "Available".to_string()),
            ];
            (left.trim().is_empty() && phases == want).then_some(())
        },
        || pool_state(&cp, &a, &capi),
    );
    let m = a.metrics();
    for released in ["result=\"wipe\"} 1", "result=\"free\"} 1"] {
        assert!(
            m.contains(&format!(
                "arges_provisioning_steps_total{{step=\"release\",{released}"
            )),
            "each server released once: {m}"
        );
    }
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn two_appliances_claiming_for_one_class_bind_each_machine_once() {
    let (cp, capi) = control_plane();
    let racks = [
        provider_appliance_as(&cp, "rack-a", "release = \"power-off\""),
        provider_appliance_as(&cp, "rack-b", "release = \"power-off\""),
    ];
    server_bmc_secret(&cp);
    let bmcs: Vec<Bmc> = (0..4).map(|_| Bmc::start()).collect();
    // Two servers in each rack, all of one class.
    for (i, bmc) in (1..=4).zip(&bmcs) {
        let uuid = register_machine(&racks[(i as usize - 1) / 2], i);
        wait_for_server(&cp, &uuid);
        accept_with_bmc(&cp, &uuid, bmc);
    }
    apply(
        &cp,
        "apiVersion: metal.arges.dev/v1alpha1\nkind: ServerClass\nmetadata:\n  name: qemu\nspec:\n  qualifiers:\n    vendors: [QEMU]\n",
    );
    eventually(60, "the class counts four free servers", || {
        (cp.field(&["serverclass", "qemu"], "{.status.available}") == "4").then_some(())
    });
    // Both leaders race for every machine; each machine ends on one server, and no
    // server stays claimed for a machine bound elsewhere.
    apply(&cp, &pool_manifests(3));
    within(
        120,
        "three machines ready, each on its own server, one server free",
        || {
            let mms = metal_machines(&cp);
            let claims = server_claims(&cp);
            let held: Vec<_> = claims.iter().filter(|c| !c.1.is_empty()).collect();
            let consistent = held.iter().all(|(server, uid, _)| {
                mms.iter()
                    .any(|m| &m.3 == uid && m.2 == format!("arges://{server}"))
            });
            (mms.len() == 3
                && mms.iter().all(|m| m.1 == "True/Provisioned")
                && held.len() == 3
                && consistent)
                .then_some(())
        },
        || {
            format!(
                "{}\n--- rack-a ---\n{}\n--- rack-b ---\n{}",
                pool_state(&cp, &racks[0], &capi),
                racks[0].log(),
                racks[1].log()
            )
        },
    );
    let on = bmcs.iter().filter(|b| b.ipmitool_says_on()).count();
    assert_eq!(on, 3, "exactly the three claimed machines were powered on");
    let given_back: usize = racks
        .iter()
        .map(|r| {
            r.log()
                .matches("machine bound elsewhere; releasing")
                .count()
        })
        .sum();
    eprintln!("claims given back after losing a bind race: {given_back}");
}

/// `/boot.ipxe` for `uuid`/`mac` asked from loopback address `from` (curl binds it).
fn boot_from(a: &Appliance, from: &str, uuid: &str, mac: &str) -> String {
    a.boot_script(uuid, mac, from).1
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn a_tripped_window_stops_its_machine_until_armed_and_a_machine_without_bmc_goes_by_arming() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "");
    let bmc = guide_cluster_provisioned(&cp, &capi, &a, &[]);
    eventually(
        30,
        "the Server shows the window its power-on opened",
        || {
            let w = cp.field(&["server", UUID_1], "{.status.window.state}");
            (w == "open").then_some(())
        },
    );

    // The machine boots in the window its power-on opened; an impostor naming its UUID
    // and MAC asks too. The window trips: nobody gets the configuration.
    let t = token(&boot_script(&a, UUID_1, MAC_1));
    let impostor = boot_from(&a, "127.0.0.9", UUID_1, MAC_1);
    assert!(impostor.contains("stands in alarm"), "{impostor}");
    assert_eq!(configdata(&a, false, UUID_1, &t).0, 403);
    eventually(30, "the Server shows the alarm", || {
        let s = cp.field(
            &["server", UUID_1],
            "{.status.phase}/{.status.alarm.reason}/{.status.alarm.second}/{.status.conditions[?(@.type==\"ProvisioningWindow\")].status}",
        );
        (s == "Alarm/SecondRequester/127.0.0.9/False").then_some(())
    });
    eventually(
        30,
        "a Warning event on the Server names both sources",
        || {
            let ev = cp.kubectl(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                &format!("involvedObject.name={UUID_1}"),
                "-o",
                "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message",
            ]);
            (ev.contains("SecondRequester") && ev.contains("127.0.0.9") && ev.contains("127.0.0.1"))
                .then_some(())
        },
    );
    wait_ready(
        &cp,
        &a,
        &capi,
        "controlplane-0",
        "False/ProvisioningWindowTripped",
        60,
    );
    // Each power-on into the install sets the next boot to PXE first.
    let cycles = |b: &Bmc| b.requests().matches("boot pxe").count();
    let before = cycles(&bmc);

    // The operator arms the Server again: the alarm clears, Arges powers the machine into
    // its install again (a fresh window), and the real machine provisions.
    cp.kubectl(&[
        "patch",
        "server",
        UUID_1,
        "--type=merge",
        "-p",
        r#"{"spec":{"arm":"after-the-impostor"}}"#,
    ]);
    wait_ready(&cp, &a, &capi, "controlplane-0", "True/Provisioned", 120);
    let shown = || {
        cp.field(
            &["server", UUID_1],
            "{.status.phase}/{.status.window.state}/{.status.alarm}",
        )
    };
    within(
        30,
        "the alarm is gone and a new window is open",
        || (shown() == "Installing/open/").then_some(()),
        shown,
    );
    assert!(cycles(&bmc) > before, "powered again: {}", bmc.requests());
    let t = token(&boot_script(&a, UUID_1, MAC_1));
    let (code, body) = configdata(&a, false, UUID_1, &t);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        body,
        test_support::cluster_api::bootstrap_data(&cp, NS, "controlplane-0")
    );

    // A machine without a BMC waits until an operator arms its Server and powers it by
    // hand; then it provisions through that window.
    apply(&cp, &machine_manifests("nobmc", UUID_2, None, None));
    wait_ready(&cp, &a, &capi, "nobmc", "False/NoBMC", 60);
    cp.kubectl(&[
        "patch",
        "server",
        UUID_2,
        "--type=merge",
        "-p",
        r#"{"spec":{"arm":"by-hand"}}"#,
    ]);
    wait_ready(&cp, &a, &capi, "nobmc", "True/Provisioned", 60);
    assert_eq!(
        condition(&cp, &["metalmachine", "nobmc"], "PoweredOn"),
        "True/Armed"
    );
    let t = token(&boot_script(&a, UUID_2, "b8:ca:3a:00:00:0b"));
    let (code, body) = configdata(&a, false, UUID_2, &t);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("type: worker"));
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn a_tenant_machine_reads_no_secret_outside_its_namespace_and_redirects_no_servers_bmc() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "");
    let third = a.register(&Registration::numbered(3));
    // The guide's cluster, on the first server: the tenant's machines join it.
    // Kept: the simulator stops when dropped.
    let _bmc = guide_cluster_provisioned(&cp, &capi, &a, &[&third]);
    let with_bmc = |name: &str, server: &str, bmc_yaml: &str| {
        machine_manifests(name, server, None, None).replacen(
            "\n---\n",
            &format!("\n  bmc:\n{bmc_yaml}\n---\n"),
            1,
        )
    };
    let tenant_host = Bmc::start();

    // A Secret in the appliance's namespace, named by a tenant: refused, unread.
    cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "bmc-admin",
        "-n",
        "arges-system",
        "--from-literal=user=admin",
        "--from-literal=pass=password",
    ]);
    apply(
        &cp,
        &with_bmc(
            "reach",
            UUID_2,
            &format!(
                "    endpoint: ipmi://{}\n    credentialsSecretRef: {{name: bmc-admin, namespace: arges-system}}",
                tenant_host.addr
            ),
        ),
    );
    wait_ready(&cp, &a, &capi, "reach", "False/SecretOutsideNamespace", 60);
    wait_event(&cp, "reach", "SecretOutsideNamespace");

    // The Server has a BMC of its own: a tenant's endpoint may not replace it.
    let own = Bmc::start();
    cp.kubectl(&[
        "patch",
        "server",
        &third,
        "--type=merge",
        "-p",
        &format!(
            r#"{{"spec":{{"bmc":{{"endpoint":"ipmi://{}","credentialsSecretRef":{{"name":"bmc-admin"}}}}}}}}"#,
            own.addr
        ),
    ]);
    eventually(30, "the Server's own BMC reaches the appliance", || {
        let (_, body) = a.request(
            "GET",
            &format!("/api/v1/servers/{third}"),
            Some(ADMIN_TOKEN),
            b"",
        );
        let s: serde_json::Value = serde_json::from_slice(&body).ok()?;
        (s["bmc"]["address"] == own.addr.to_string()).then_some(())
    });
    bmc_secret(&cp, "tenant-bmc", "password");
    apply(
        &cp,
        &with_bmc(
            "redirect",
            &third,
            &format!(
                "    endpoint: ipmi://{}\n    credentialsSecretRef: {{name: tenant-bmc}}",
                tenant_host.addr
            ),
        ),
    );
    wait_ready(&cp, &a, &capi, "redirect", "False/BMCConflict", 60);
    assert!(
        tenant_host.requests().is_empty(),
        "the tenant's host was never contacted: {}",
        tenant_host.requests()
    );
}

/// Cluster `racks` on MetalCluster `racks`, bootstrap data in Secret `racks-bootstrap`,
/// and a Machine with its MetalMachine (servers of class `qemu`) for each
/// (name, failure domain).
fn rack_manifests(machines: &[(&str, &str)]) -> String {
    let mut out = format!(
        r#"apiVersion: cluster.x-k8s.io/v1beta2
kind: Cluster
metadata: {{name: racks, namespace: {NS}}}
spec:
  # The endpoint on the Cluster itself, which the MetalCluster takes (the contract's
  # "provided by other means").
  controlPlaneEndpoint: {{host: 10.0.0.30, port: 6443}}
  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalCluster, name: racks}}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalCluster
metadata: {{name: racks, namespace: {NS}}}
spec: {{}}
---
apiVersion: v1
kind: Secret
metadata: {{name: racks-bootstrap, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: racks}}}}
type: cluster.x-k8s.io/secret
stringData: {{value: "machine: {{type: controlplane}}"}}
"#
    );
    for (name, rack) in machines {
        out.push_str(&format!(
            r#"---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalMachine
metadata: {{name: {name}, namespace: {NS}}}
spec:
  serverClassRef: {{name: qemu}}
---
apiVersion: cluster.x-k8s.io/v1beta2
kind: Machine
metadata: {{name: {name}, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: racks}}}}
spec:
  clusterName: racks
  version: v1.35.4
  failureDomain: {rack}
  bootstrap: {{dataSecretName: racks-bootstrap}}
  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalMachine, name: {name}}}
"#
        ));
    }
    out
}

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn racks_are_failure_domains_and_each_machine_lands_in_the_rack_it_asks_for() {
    let (cp, capi) = control_plane();
    let racks = [
        provider_appliance_as(&cp, "rack-a", "release = \"power-off\""),
        provider_appliance_as(&cp, "rack-b", "release = \"power-off\""),
        provider_appliance_as(
            &cp,
            "rack-c",
            "release = \"power-off\"\ncontrol_plane = false",
        ),
    ];
    server_bmc_secret(&cp);
    let bmcs: Vec<Bmc> = (0..3).map(|_| Bmc::start()).collect();
    // One server in each rack, all of one class.
    let uuids: Vec<String> = (1..=3)
        .zip(&bmcs)
        .map(|(i, bmc)| {
            let uuid = register_machine(&racks[i as usize - 1], i);
            wait_for_server(&cp, &uuid);
            accept_with_bmc(&cp, &uuid, bmc);
            uuid
        })
        .collect();
    apply(
        &cp,
        "apiVersion: metal.arges.dev/v1alpha1\nkind: ServerClass\nmetadata:\n  name: qemu\nspec:\n  qualifiers:\n    vendors: [QEMU]\n",
    );
    // A control plane of three, one per rack.
    apply(
        &cp,
        &rack_manifests(&[("cp-a", "rack-a"), ("cp-b", "rack-b"), ("cp-c", "rack-c")]),
    );
    // The MetalCluster lists the racks (rack C not for control planes), and Cluster API
    // copies them to the Cluster: the contract field is read.
    let domains = "{range .status.failureDomains[*]}{.name}={.controlPlane} {end}";
    let want = "rack-a=true rack-b=true rack-c=false ";
    eventually(
        60,
        "the racks as the MetalCluster's failure domains",
        || (cp.field(&["metalcluster", "racks", "-n", NS], domains) == want).then_some(()),
    );
    eventually(60, "the Cluster shows the failure domains", || {
        (cp.field(&["cluster", "racks", "-n", NS], domains) == want).then_some(())
    });
    assert_eq!(
        condition(&cp, &["metalcluster", "racks"], "Ready"),
        "True/Provisioned",
        "provisioned from the Cluster's endpoint"
    );
    assert_eq!(
        condition(&cp, &["metalcluster", "racks"], "Paused"),
        "False/NotPaused"
    );
    let landed = || {
        ["cp-a", "cp-b", "cp-c"]
            .iter()
            .zip(["rack-a", "rack-b", "rack-c"])
            .zip(&uuids)
            .all(|((m, rack), uuid)| {
                cp.field(
                    &["metalmachine", m, "-n", NS],
                    "{.spec.providerID} {.status.failureDomain}",
                ) == format!("arges://{uuid} {rack}")
                    && condition(&cp, &["metalmachine", m], "Ready") == "True/Provisioned"
            })
    };
    let state = || {
        format!(
            "{}\n--- rack-a ---\n{}",
            pool_state(&cp, &racks[0], &capi),
            racks[0].log()
        )
    };
    within(
        120,
        "each machine on its own rack's server",
        || landed().then_some(()),
        state,
    );
    // A fourth Machine for rack A, which has no second server: it waits, and says why;
    // the others stay as they are.
    apply(&cp, &rack_manifests(&[("cp-a2", "rack-a")]));
    within(
        60,
        "the fourth machine waits for a server in its rack",
        || {
            (condition(&cp, &["metalmachine", "cp-a2"], "Ready") == "False/NoFreeServer")
                .then_some(())
        },
        state,
    );
    assert!(landed(), "{}", state());
    let message = cp.field(
        &["metalmachine", "cp-a2", "-n", NS],
        r#"{.status.conditions[?(@.type=="Ready")].message}"#,
    );
    assert!(message.contains("in rack rack-a"), "{message}");
    // Cluster API surfaces where each machine was placed.
    eventually(30, "the Machine shows its failure domain", || {
        (cp.field(&["machine", "cp-b", "-n", NS], "{.status.failureDomain}") == "rack-b")
            .then_some(())
    });
    let on = bmcs.iter().filter(|b| b.ipmitool_says_on()).count();
    assert_eq!(on, 3, "exactly the three placed machines were powered on");
}

/// A clusterctl repository holding Arges's release (`deploy/clusterctl`) as v0.1.0, with
/// a clusterctl config naming it (`clusterctl.yaml` in the folder).
fn clusterctl_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let version = dir.path().join("infrastructure-arges/v0.1.0");
    std::fs::create_dir_all(&version).unwrap();
    let release = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/clusterctl");
    for entry in std::fs::read_dir(release).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, version.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("clusterctl.yaml"),
        format!(
            "providers:\n  - name: arges\n    type: InfrastructureProvider\n    url: {}/infrastructure-components.yaml\nCLUSTERCTL_DISABLE_VERSIONCHECK: \"true\"\n",
            version.display()
        ),
    )
    .unwrap();
    dir
}

/// Runs the real clusterctl (built from the Cluster API release the tests use) with the
/// repository's config against `cp`, with `env`; its standard output.
fn clusterctl(
    cp: &ControlPlane,
    repo: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> String {
    let out = std::process::Command::new(test_support::control_plane::bin_dir().join("clusterctl"))
        .arg("--config")
        .arg(repo.join("clusterctl.yaml"))
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig())
        // Its overrides folder and state stay in the test's folder.
        .env("XDG_CONFIG_HOME", repo)
        .env("HOME", repo)
        .envs(env.iter().copied())
        .output()
        .expect("clusterctl runs");
    assert!(
        out.status.success(),
        "clusterctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every object of a YAML stream.
fn yaml_objects(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
#[ignore = "real kube-apiserver, Cluster API and clusterctl (built from Go modules); tests/run-all.sh runs it"]
fn clusterctl_reads_the_release_and_its_template_makes_a_cluster_that_provisions() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "");
    let repo = clusterctl_repository();
    let arges = ["--infrastructure", "arges:v0.1.0"];

    // The provider as clusterctl installs it: its variables listed, substituted, every
    // object labelled as the provider's, and accepted by the apiserver.
    let mut args = vec!["generate", "provider"];
    args.extend(arges);
    let described = clusterctl(
        &cp,
        repo.path(),
        &[&args[..], &["--describe"]].concat(),
        &[],
    );
    for v in [
        "ARGES_WATCH_NAMESPACE",
        "ARGES_LOG_LEVEL",
        "ARGES_DHCP_MODE",
        "ARGES_RELEASE",
        "ARGES_DATA_DIR",
    ] {
        assert!(described.contains(v), "{v} is not listed:\n{described}");
    }
    let components = clusterctl(&cp, repo.path(), &args, &[("ARGES_WATCH_NAMESPACE", NS)]);
    let objects = yaml_objects(&components);
    assert!(objects.len() > 10, "{components}");
    for o in &objects {
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["cluster.x-k8s.io/provider"], "infrastructure-arges",
            "{}",
            o["metadata"]["name"]
        );
        assert!(
            labels.get("clusterctl.cluster.x-k8s.io").is_some(),
            "{}",
            o["metadata"]["name"]
        );
    }
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let manager = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(manager["name"], "manager");
    let watched = manager["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ARGES_WATCH_NAMESPACE")
        .unwrap();
    assert_eq!(watched["value"], NS);
    let out = cp.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=clusterctl",
            "-f",
            "-",
        ],
        &components,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A Server of the class the template names, with its BMC.
    server_bmc_secret(&cp);
    let bmc = Bmc::start();
    let uuid = register_machine(&a, 1);
    wait_for_server(&cp, &uuid);
    accept_with_bmc(&cp, &uuid, &bmc);
    apply(
        &cp,
        "apiVersion: metal.arges.dev/v1alpha1\nkind: ServerClass\nmetadata:\n  name: control-plane\nspec:\n  qualifiers:\n    vendors: [QEMU]\n",
    );

    // The default flavor: generated, applied, provisioned (CABPT makes the Talos
    // configuration from the template's TalosConfig).
    let values = [
        ("CONTROL_PLANE_ENDPOINT_HOST", "10.0.0.30"),
        ("CONTROL_PLANE_SERVER_CLASS", "control-plane"),
        ("WORKER_SERVER_CLASS", "control-plane"),
    ];
    let mut args = vec![
        "generate",
        "cluster",
        "example-9",
        "--target-namespace",
        NS,
        "--kubernetes-version",
        "v1.35.4",
    ];
    args.extend(arges);
    let cluster = clusterctl(&cp, repo.path(), &args, &values);
    apply(&cp, &cluster);
    wait_ready(
        &cp,
        &a,
        &capi,
        "example-9-control-plane-0",
        "True/Provisioned",
        180,
    );
    assert_eq!(
        cp.field(
            &["metalmachine", "example-9-control-plane-0", "-n", NS],
            "{.spec.providerID}"
        ),
        format!("arges://{uuid}")
    );
    assert!(bmc.ipmitool_says_on(), "powered through its Server's BMC");
    assert_eq!(
        cp.field(
            &["cluster", "example-9", "-n", NS],
            "{.spec.controlPlaneEndpoint.host}"
        ),
        "10.0.0.30",
        "the template's endpoint reached the Cluster"
    );

    // The clusterclass flavor: its ClusterClass comes with it, and every object but the
    // Talos control-plane provider's template is accepted. That provider is not installed
    // here, and clusterctl looks the class's templates up in a cluster it can reach: this
    // generation reaches none.
    let offline = [&values[..], &[("KUBECONFIG", "/nonexistent")]].concat();
    let cc = clusterctl(
        &cp,
        repo.path(),
        &[&args[..], &["--flavor", "clusterclass"]].concat(),
        &offline,
    );
    let kept: Vec<serde_json::Value> = yaml_objects(&cc)
        .into_iter()
        .filter(|o| o["kind"] != "TalosControlPlaneTemplate")
        .collect();
    let kinds: Vec<&str> = kept.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"ClusterClass") && kinds.contains(&"MetalClusterTemplate"),
        "{kinds:?}"
    );
    let text = kept
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("---\n");
    let out = cp.kubectl_stdin(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        &text,
    );
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}
