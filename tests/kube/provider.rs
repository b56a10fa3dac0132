//! Arges as a Cluster API infrastructure provider, beside the real Cluster API core
//! manager and the real Talos bootstrap provider (`cluster_api.rs`): the guide's cluster
//! from `deploy/examples/cluster/`, claims by class under contention, release and reuse,
//! and the failure paths (wrong BMC password, a server in use, missing bootstrap data,
//! no BMC, an appliance and an apiserver restarted mid-provision).

use std::time::Duration;

use crate::cluster_api::ClusterApi;
use crate::control_plane::{ControlPlane, eventually};
use crate::harness::{ADMIN_TOKEN, Appliance, REG_TOKEN};
use crate::ipmi_sim::Bmc;
use crate::{UUID_1, UUID_2, boot_script, ensure_namespace, register, wait_for_server};

const NS: &str = "arges-examples";
const MAC_1: &str = "b8:ca:3a:00:00:0a";

/// The control plane with the Cluster API controllers and every CRD.
fn control_plane() -> (ControlPlane, ClusterApi) {
    let cp = ControlPlane::start();
    cp.apply_crds();
    ensure_namespace(&cp);
    let capi = ClusterApi::start(&cp);
    cp.kubectl(&["create", "namespace", NS]);
    (cp, capi)
}

/// An appliance in Kubernetes mode (identity `rack-1`) with the shipped IPMI driver.
fn provider_appliance(cp: &ControlPlane, extra: &str) -> Appliance {
    let dir = Appliance::prepare(&format!(
        "[kubernetes]\nidentity = \"rack-1\"\nnamespace = \"arges-system\"\n{extra}\n[bmc]\npoll_ms = 200\n"
    ));
    let ipmi = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/out/ipmi.wasm");
    std::fs::create_dir_all(dir.path().join("data/plugins")).unwrap();
    std::fs::copy(ipmi, dir.path().join("data/plugins/ipmi.wasm"))
        .unwrap_or_else(|e| panic!("{ipmi}: {e} (run plugins/build.sh first)"));
    Appliance::start_in(
        dir,
        &["--kubeconfig", &cp.kubeconfig().display().to_string()],
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

/// `status/reason` of condition `type_` of a namespaced object.
fn condition(cp: &ControlPlane, object: &[&str], type_: &str) -> String {
    let mut args = object.to_vec();
    args.extend(["-n", NS]);
    cp.field(
        &args,
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}"),
    )
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

/// The token on the kernel command line of a boot script.
fn token(script: &str) -> String {
    let at = script.find("token=").expect("a token in the script") + "token=".len();
    script[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
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

#[test]
#[ignore = "real kube-apiserver and Cluster API (built from Go modules); tests/run-all.sh runs it"]
fn the_guide_s_cluster_is_provisioned_by_real_cluster_api_and_cabpt() {
    let (cp, capi) = control_plane();
    let a = provider_appliance(&cp, "");
    // Register, then accept into the Talos environment (the guide's `default` one).
    register(&a, "a", UUID_1);
    wait_for_server(&cp, UUID_1);
    cp.kubectl(&[
        "patch",
        "server",
        UUID_1,
        "--type=merge",
        "-p",
        r#"{"spec":{"accepted":true,"environmentRef":{"name":"talos"}}}"#,
    ]);
    let bmc = Bmc::start();
    bmc_secret(&cp, "controlplane-0-bmc", "password");
    apply(&cp, &guide_manifests(&cp, UUID_1, &bmc));

    // Cluster API and CABPT do their part, Arges its: the Cluster is Provisioned, the
    // MetalMachine ready with its providerID, the machine powered on.
    wait_ready(&cp, &a, &capi, "controlplane-0", "True/Provisioned", 120);
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
    let (code, body) = a.request(
        "GET",
        &format!("/configdata?uuid={UUID_1}&token={t}"),
        None,
        b"",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // What CABPT made of the TalosConfig (it normalises the YAML) is what is served.
    let secret = cp.field(
        &["machine", "controlplane-0", "-n", NS],
        "{.spec.bootstrap.dataSecretName}",
    );
    let value = cp.field(&["secret", &secret, "-n", NS], "{.data.value}");
    let value =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value.trim()).unwrap();
    assert_eq!(body, value, "the bootstrap data Secret's value");
    assert!(String::from_utf8_lossy(&body).contains("endpoint: https://10.0.0.10:6443"));
    let (code, _) = a.request(
        "GET",
        &format!("/configdata?uuid={UUID_2}&token={t}"),
        None,
        b"",
    );
    assert_eq!(code, 403, "another machine with this token");
    let (code, _) = a.request(
        "GET",
        &format!("/configdata?uuid={UUID_1}&token=guess"),
        None,
        b"",
    );
    assert_eq!(code, 403, "a wrong token");
    eventually(30, "the Server shows the install in progress", || {
        (cp.field(&["server", UUID_1], "{.status.phase}") == "Installing").then_some(())
    });

    // The install environment reports; the machine boots its disk from now on.
    let (code, body) = a.request(
        "POST",
        &format!("/configdata/done?uuid={UUID_1}&token={t}"),
        None,
        b"",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    eventually(30, "the MetalMachine says installed", || {
        (condition(&cp, &["metalmachine", "controlplane-0"], "Installed") == "True/InstallReported")
            .then_some(())
    });
    assert!(boot_script(&a, UUID_1, MAC_1).contains("boot from local disk"));
    let ev = events(&cp, "controlplane-0");
    for reason in [
        "SecretFound",
        "Claimed",
        "NetworkBooting",
        "InstallReported",
    ] {
        assert!(ev.contains(reason), "an event for {reason}:\n{ev}");
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
    let wipe = boot_script(&a, UUID_1, MAC_1);
    assert!(wipe.contains("arges.mode=wipe"), "{wipe}");
    // The wipe environment's agent wipes the disks (device nodes under a copy of the
    // recorded machine), then registers in wipe mode: clean and free again.
    let root = wipe_root("a", &["nvme0n1", "sda", "loop0"]);
    let out = std::process::Command::new(crate::harness::bin())
        .args(["agent", "--appliance", &a.url(""), "--token", REG_TOKEN])
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
        .unwrap();
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
    let (_, body) = a.request(
        "GET",
        &format!("/api/v1/servers/{UUID_1}"),
        Some(ADMIN_TOKEN),
        b"",
    );
    let s: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(s["has_config"], false, "the bootstrap data is gone: {s}");
}
