//! The getting-started guide, deployed as an operator deploys it: a real node (kubelet,
//! containerd, runc, the CNI bridge) in the lab's namespace, the images built from this
//! repository and the providers' Go modules imported into it, and the guide's
//! `kustomize build ./mgmt | kubectl apply -f -` (kubectl's kustomize) bringing up
//! Cluster API core, CABPT and the Arges appliance as pods. The appliance pod uses the
//! node's network, the lab's bridge, so a QEMU machine behind an `ipmi_sim` BMC boots
//! from it and registers; the pod is deleted and its replacement keeps the inventory; the
//! guide's second apply puts the metadata server's endpoint on the default Environment's
//! command line; and the guide's cluster, applied with kubectl, provisions the machine
//! through that command line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

use crate::cluster;
use crate::lab::{self, APPLIANCE_IP, Firmware, Lab, Machine, discovery_dir};
use test_support::control_plane::{ControlPlane, bin_dir};
use test_support::ipmi_sim::{Bmc, GENERIC};
use test_support::node::Node;
use test_support::{repo, run_script, within};

const NS: &str = "arges-system";
const NODE: &str = "head-1";

/// The image tarballs: `ARGES_IMAGES` when the test command built them, else built once
/// here by `deploy/build-images.sh --test-images`.
fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("ARGES_IMAGES") {
            return PathBuf::from(d);
        }
        let out = std::env::temp_dir().join(format!("arges-images-{}", std::process::id()));
        run_script(
            "deploy/build-images.sh",
            &[
                "--test-images".as_ref(),
                bin_dir().as_os_str(),
                out.as_os_str(),
            ],
            &[],
        );
        out
    })
}

/// A copy of `deploy/`'s Kubernetes folders, with the providers rendered into
/// `mgmt/providers` and the guide's two patch files written as the guide writes them:
/// the appliance's public URL, and the environment's `talos.config=` argument.
fn guide_tree(dir: &Path, environment_arg: &str) -> PathBuf {
    let deploy = dir.join("deploy");
    if !deploy.exists() {
        std::fs::create_dir_all(&deploy).expect("deploy copy");
        for folder in ["crds", "rbac", "mgmt"] {
            let ok = Command::new("cp")
                .arg("-r")
                .arg(repo().join("deploy").join(folder))
                .arg(&deploy)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "cannot copy deploy/{folder}");
        }
        run_script(
            "deploy/render-providers.sh",
            &[deploy.join("mgmt/providers").as_os_str()],
            &[("KUBECTL", bin_dir().join("kubectl").as_os_str())],
        );
    }
    let mgmt = deploy.join("mgmt");
    std::fs::write(
        mgmt.join("discovery_kubeconfig_patch.yaml"),
        format!(
            "- op: add\n  path: /spec/template/spec/containers/0/args/-\n  value: --public-url=http://{APPLIANCE_IP}:8080\n"
        ),
    )
    .expect("patch");
    std::fs::write(
        mgmt.join("default_environment_patch.yaml"),
        format!("- op: add\n  path: /spec/kernel/args/-\n  value: {environment_arg}\n"),
    )
    .expect("patch");
    mgmt
}

/// `kustomize build ./mgmt | kubectl apply -f -`, with kubectl's kustomize.
fn apply(cp: &ControlPlane, mgmt: &Path) -> std::process::Output {
    let built = cp.kubectl(&["kustomize", &mgmt.display().to_string()]);
    cp.kubectl_stdin(&["apply", "-f", "-"], &built)
}

/// `kubectl get pods -n arges-system` as the guide shows it: NAME, READY, STATUS.
fn pod_table(cp: &ControlPlane) -> Vec<(String, String, String)> {
    cp.kubectl(&["get", "pods", "-n", NS, "--no-headers"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// Every pod of the guide's deployments, Running and Ready, by deployment.
fn all_ready(cp: &ControlPlane) -> Option<Vec<(String, String, String)>> {
    let table = pod_table(cp);
    let deployments = [
        "capi-controller-manager-",
        "cabpt-controller-manager-",
        "arges-appliance-",
    ];
    let ready = deployments.iter().all(|d| {
        let pods: Vec<_> = table.iter().filter(|p| p.0.starts_with(d)).collect();
        pods.len() == 1 && pods[0].2 == "Running" && {
            let (r, t) = pods[0].1.split_once('/').unwrap_or(("0", "1"));
            r == t
        }
    });
    ready.then_some(table)
}

fn appliance_pod(cp: &ControlPlane) -> String {
    cp.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=arges-appliance",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
    .trim()
    .to_string()
}

/// Everything a failure needs: pods, events, the appliance's log, the node's logs.
fn state(cp: &ControlPlane, node: &Node) -> String {
    let out = |args: &[&str]| {
        let o = cp.kubectl_output(args);
        format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    [
        out(&["get", "pods", "-A", "-o", "wide"]),
        out(&["get", "events", "-A", "--sort-by=.lastTimestamp"]),
        out(&[
            "logs",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/name=arges-appliance",
            "--tail=60",
        ]),
        node.logs(),
    ]
    .join("\n")
}

/// The admin API of the appliance pod, from the node (the admin port is on its loopback).
fn admin_servers(lab: &Lab, node: &Node) -> Vec<Value> {
    let token = std::fs::read_to_string(node.host_path("/var/lib/arges/admin.token"))
        .expect("the appliance's admin token, in its data folder on the node");
    let out = test_support::command_in(Some(&lab.lan()), "curl")
        .args(["-sS", "--fail-with-body", "--insecure", "-H"])
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg("https://127.0.0.1:9443/api/v1/servers")
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "admin API: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    match v {
        Value::Array(a) => a,
        other => other["servers"].as_array().cloned().unwrap_or_default(),
    }
}

#[test]
#[ignore = "a real node, QEMU and Cluster API in network namespaces (root); tests/run-all.sh runs it"]
fn the_guide_s_deployment_runs_as_pods_on_a_node_and_boots_a_machine() {
    let lab = Lab::prepare("node");
    let cp = ControlPlane::for_node(&lab.lan());
    let node = Node::start(&cp, NODE, APPLIANCE_IP);
    let images = images();
    let mut sizes = Vec::new();
    for image in ["pause", "cluster-api", "cabpt", "arges-appliance"] {
        let tarball = images.join(format!("{image}.tar"));
        node.import(&tarball);
        let size = std::fs::metadata(&tarball).map(|m| m.len()).unwrap_or(0);
        sizes.push(format!("{image} {:.1} MB", size as f64 / 1e6));
    }
    eprintln!("images (compressed layers): {}", sizes.join(", "));
    // The operator's steps before the guide: the head node is labelled, and the
    // discovery environment's kernel and initramfs are on it, in the appliance's data
    // folder (assets/discovery/). The Talos environment's files are the discovery
    // initramfs too (Talos images cannot be had here): its boots print the command line.
    cp.kubectl(&["label", "node", NODE, "metal.arges.dev/head-node=true"]);
    let assets = node.host_path("/var/lib/arges/assets");
    for (dest, src) in [
        ("discovery/vmlinuz", "vmlinuz"),
        ("discovery/initramfs.img", "initramfs.img"),
        ("talos/vmlinuz-amd64", "vmlinuz"),
        ("talos/initramfs-amd64.xz", "initramfs.img"),
    ] {
        let dest = assets.join(dest);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(discovery_dir().join(src), &dest).expect("discovery files");
    }

    // The guide's first apply, with its placeholder environment patch.
    let mgmt = guide_tree(lab.dir.path(), "talos.config=/configdata?uuid=");
    let applied = Instant::now();
    let first = apply(&cp, &mgmt);
    let stderr = String::from_utf8_lossy(&first.stderr);
    // One apply creates the CRDs and cannot map the Environment before they are
    // established: kubectl says so, and that is the only thing it may refuse.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.contains("kind \"Environment\"") || line.contains("ensure CRDs are installed"),
            "the first apply failed for more than the Environment:\n{stderr}"
        );
    }
    let table = within(
        300,
        "every pod of the guide Running and Ready",
        || all_ready(&cp),
        || state(&cp, &node),
    );
    let to_ready = applied.elapsed();
    eprintln!(
        "kubectl apply to all pods Ready: {:.1} s",
        to_ready.as_secs_f64()
    );
    eprintln!("{}", cp.kubectl(&["get", "pods", "-n", NS]));
    assert_eq!(table.len(), 3, "{table:?}");
    let services = cp.kubectl(&["get", "services", "-n", NS, "-o", "wide"]);
    eprintln!("{services}");
    for (name, ports) in [
        ("metal-ipxe", "80/TCP"),
        ("metal-metadata-server", "80/TCP"),
        ("metal-tftp", "69/UDP"),
    ] {
        assert!(
            services
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(ports)),
            "service {name} ({ports}) missing:\n{services}"
        );
    }
    // Applied again (the guide applies twice), the Environment is created too.
    let again = apply(&cp, &mgmt);
    assert!(
        again.status.success(),
        "the apply again: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A bare machine behind an IPMI BMC is powered on by the operator, network first:
    // the pod answers its PXE boot, it registers and powers off.
    let m = Machine::new(&lab, Firmware::Bios, 1).with_boot_sector("ARGES-DISK-BOOTED");
    let bmc = Bmc::start_with(GENERIC, cluster::VM_CHASSIS, Some(&lab.lan()));
    cluster::wire_vm(&lab, &m, &bmc);
    let state = || {
        format!(
            "{}\n{}\n--- chassis ---\n{}\n{}",
            cp.kubectl(&["get", "servers,metalmachines,machines", "-A", "-o", "wide"]),
            lab.logs(&m.serial_log),
            bmc.requests(),
            state(&cp, &node)
        )
    };
    bmc.ipmitool(&["chassis", "bootdev", "pxe"])
        .expect("bootdev");
    bmc.ipmitool(&["power", "on"]).expect("power on");
    within(
        lab::boot_deadline_secs(),
        "the machine in `kubectl get servers`, powered off",
        || {
            let names = cp.kubectl(&["get", "servers", "-o", "name"]);
            (names.contains(&m.uuid) && !bmc.ipmitool_says_on()).then_some(())
        },
        state,
    );
    let registered = |servers: &[Value]| {
        servers
            .iter()
            .find(|s| s["uuid"] == m.uuid.as_str())
            .map(|s| s["hardware"].clone())
    };
    let before = registered(&admin_servers(&lab, &node)).expect("the machine in the inventory");

    // The pod is deleted; its replacement keeps the inventory and the Server.
    let old = appliance_pod(&cp);
    cp.kubectl(&["delete", "pod", "-n", NS, &old]);
    within(
        180,
        "a new appliance pod Ready",
        || (appliance_pod(&cp) != old && all_ready(&cp).is_some()).then_some(()),
        state,
    );
    let after = admin_servers(&lab, &node);
    assert_eq!(
        registered(&after),
        Some(before),
        "the replacement's inventory: {after:#?}"
    );
    assert!(
        cp.kubectl(&["get", "servers", "-o", "name"])
            .contains(&m.uuid)
    );

    // The guide's second step: the metadata server's endpoint in the environment patch,
    // applied again.
    let endpoint = format!("talos.config=http://{APPLIANCE_IP}:8080/configdata?uuid=");
    let mgmt = guide_tree(lab.dir.path(), &endpoint);
    let second = apply(&cp, &mgmt);
    assert!(
        second.status.success(),
        "the second apply: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let args = cp.field(&["environment", "default"], "{.spec.kernel.args}");
    assert!(args.contains(&endpoint), "{args}");
    // Talos stands in as the discovery initramfs, which installs when told so.
    cp.kubectl(&[
        "patch",
        "environment",
        "default",
        "--type=json",
        "-p",
        r#"[{"op":"add","path":"/spec/kernel/args/-","value":"arges.mode=install"}]"#,
    ]);
    cp.kubectl(&[
        "patch",
        "server",
        &m.uuid,
        "--type=merge",
        "-p",
        r#"{"spec":{"accepted":true,"environmentRef":{"name":"default"}}}"#,
    ]);

    // Up to here no pod has logged an error.
    assert_no_errors(&cp, "");

    // The guide's cluster, applied with kubectl: Arges claims the machine, sets PXE and
    // powers it on into the default Environment, whose command line now carries the
    // endpoint, completed with the machine's UUID and this boot's token; the install
    // environment fetches its configuration with them and reports.
    cp.kubectl(&["create", "namespace", cluster::NS]);
    cluster::provision(&cp, &lab, &m, &bmc, state);
    let serial = lab.serial(&m);
    let cmdline = serial
        .lines()
        .rfind(|l| l.contains("Kernel command line"))
        .unwrap_or_default();
    let proof = format!("{endpoint}{}&token=", m.uuid);
    assert!(
        cmdline.contains(&proof) && cmdline.contains("talos.platform=metal"),
        "the install boot's command line has the guide's endpoint, completed: {cmdline}"
    );
    within(
        60,
        "the MetalMachine is ready and installed",
        || {
            let c = cp.field(
                &["metalmachine", "controlplane-0", "-n", cluster::NS],
                "{.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Installed\")].reason}",
            );
            (c == "True/InstallReported").then_some(())
        },
        state,
    );
    bmc.ipmitool(&["power", "off"]);

    // The appliance logged no error through it all. (Cluster API rightly logs that it
    // cannot reach the workload cluster: no real Talos node comes up here.)
    assert_no_errors(&cp, "arges-appliance-");
}

/// No pod whose name starts with `prefix` logged an error.
fn assert_no_errors(cp: &ControlPlane, prefix: &str) {
    for (pod, _, _) in pod_table(cp) {
        if !pod.starts_with(prefix) {
            continue;
        }
        let log = cp.kubectl(&["logs", "-n", NS, &format!("pod/{pod}")]);
        let errors: Vec<&str> = log.lines().filter(|l| is_error(l)).collect();
        assert!(
            errors.is_empty(),
            "{pod} logged errors:\n{}",
            errors.join("\n")
        );
    }
}

/// An error line in the three pods' formats: tracing's (the appliance), klog's
/// (`E1205 10:00:00.000000 …`, Cluster API) and zap's JSON (CABPT).
fn is_error(line: &str) -> bool {
    let klog =
        line.len() > 5 && line.starts_with('E') && line[1..5].bytes().all(|b| b.is_ascii_digit());
    klog || line.contains(" ERROR ")
        || line.contains("\"level\":\"error\"")
        || line.contains("\tERROR\t")
}

/// `clusterctl init` onto the real node, as a Cluster API user installs providers: from a
/// local repository of every provider (tests/k8s/clusterctl-repository.sh), cert-manager
/// first (built from its Go module), then Cluster API core, CABPT and Arges, each in its
/// namespace, every pod Running and Ready.
#[test]
#[ignore = "a real node and clusterctl in network namespaces (root); tests/run-all.sh runs it"]
fn clusterctl_init_installs_every_provider_onto_the_node() {
    let lab = Lab::prepare("ctl");
    let cp = ControlPlane::for_node(&lab.lan());
    let node = Node::start(&cp, NODE, APPLIANCE_IP);
    for image in [
        "pause",
        "cluster-api",
        "cabpt",
        "arges-appliance",
        "cert-manager-controller",
        "cert-manager-cainjector",
        "cert-manager-webhook",
    ] {
        node.import(&images().join(format!("{image}.tar")));
    }
    cp.kubectl(&["label", "node", NODE, "metal.arges.dev/head-node=true"]);
    let repo_dir = lab.dir.path().join("clusterctl");
    run_script(
        "tests/k8s/clusterctl-repository.sh",
        &[bin_dir().as_os_str(), repo_dir.as_os_str()],
        &[],
    );
    let clusterctl = |args: &[&str], env: &[(&str, &str)]| {
        test_support::command_in(Some(&lab.lan()), bin_dir().join("clusterctl"))
            .arg("--config")
            .arg(repo_dir.join("clusterctl.yaml"))
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig())
            .env("HOME", &repo_dir)
            .env("XDG_CONFIG_HOME", &repo_dir)
            .envs(env.iter().copied())
            .output()
            .expect("clusterctl runs")
    };
    let started = Instant::now();
    let out = clusterctl(
        &[
            &test_support::cluster_api::CLUSTERCTL_INIT[..],
            &["--wait-providers", "--wait-provider-timeout", "300"],
        ]
        .concat(),
        &[],
    );
    assert!(
        out.status.success(),
        "clusterctl init failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        state(&cp, &node)
    );
    eprintln!(
        "clusterctl init to providers ready: {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    let pods = cp.kubectl(&["get", "pods", "-A", "--no-headers"]);
    eprintln!("{pods}");
    for (ns, deployment) in [
        ("cert-manager", "cert-manager-"),
        ("cert-manager", "cert-manager-cainjector-"),
        ("cert-manager", "cert-manager-webhook-"),
        ("capi-system", "capi-controller-manager-"),
        ("cabpt-system", "cabpt-controller-manager-"),
        ("arges-system", "arges-appliance-"),
    ] {
        within(
            120,
            &format!("{ns}/{deployment}* Running and Ready"),
            || {
                cp.kubectl(&["get", "pods", "-n", ns, "--no-headers"])
                    .lines()
                    .any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() >= 3
                            && f[0].starts_with(deployment)
                            && !f[0][deployment.len()..].starts_with("cainjector")
                            && !f[0][deployment.len()..].starts_with("webhook")
                            && f[2] == "Running"
                            && f[1].split_once('/').is_some_and(|(r, t)| r == t)
                    })
                    .then_some(())
            },
            || state(&cp, &node),
        );
    }
    // The provider inventory clusterctl keeps: every provider at the version asked for.
    let providers = cp.kubectl(&["get", "providers", "-A", "--no-headers"]);
    for (name, version) in [
        ("cluster-api", "v1.14.2"),
        ("bootstrap-talos", "v0.6.11"),
        ("infrastructure-arges", "v0.1.0"),
    ] {
        assert!(
            providers
                .lines()
                .any(|l| l.contains(name) && l.contains(version)),
            "{name} {version} not in clusterctl's inventory:
{providers}"
        );
    }

    // The default template through the providers' own admission webhooks (served with
    // cert-manager's certificates): accepted and defaulted by Cluster API, and the
    // appliance clusterctl installed takes its MetalCluster up.
    let out = clusterctl(
        &test_support::cluster_api::generate_example_9("default"),
        &[
            ("CONTROL_PLANE_ENDPOINT_HOST", "10.0.0.30"),
            ("CONTROL_PLANE_SERVER_CLASS", "control-plane"),
            ("WORKER_SERVER_CLASS", "workers"),
        ],
    );
    assert!(
        out.status.success(),
        "clusterctl generate cluster: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = cp.kubectl_stdin(&["apply", "-f", "-"], &String::from_utf8_lossy(&out.stdout));
    assert!(
        applied.status.success(),
        "the generated cluster through the webhooks: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eq!(
        cp.field(
            &["machinedeployment", "example-9-workers"],
            "{.spec.selector.matchLabels.cluster\\.x-k8s\\.io/deployment-name}"
        ),
        "example-9-workers",
        "Cluster API's defaulting webhook filled the selector in"
    );
    within(
        120,
        "the MetalCluster Ready from the appliance clusterctl installed",
        || {
            (cp.field(
                &["metalcluster", "example-9"],
                r#"{.status.conditions[?(@.type=="Ready")].status}"#,
            ) == "True")
                .then_some(())
        },
        || state(&cp, &node),
    );
}
