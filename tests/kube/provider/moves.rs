//! `clusterctl move` of a provisioned cluster from one management cluster to another,
//! both real apiservers with the real Cluster API controllers beside them, and the
//! appliance following the move: no machine powered, wiped, re-claimed or re-imaged.
//!
//! Both management clusters are made by the real `clusterctl init` from the local
//! repository (`tests/k8s/clusterctl-repository.sh`): its CRDs, labels and provider
//! inventory are what `move` reads. They have no node, so the providers' Deployments
//! never run; their controllers run beside the apiserver instead (`ClusterApi`, and the
//! appliance as a process), and the admission webhooks, which would point at those
//! Deployments' Services, are removed. cert-manager's API is installed first (its CRDs),
//! so clusterctl finds cert-manager and does not wait for pods that cannot run.
//! `clusterctl init` onto a real node, with every pod Ready, is the netboot suite's.

use std::path::Path;
use std::time::Instant;

use super::*;
use test_support::control_plane::bin_dir;
use test_support::run_script;

/// A folder holding the local clusterctl repository of every provider and its config.
fn full_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_script(
        "tests/k8s/clusterctl-repository.sh",
        &[bin_dir().as_os_str(), dir.path().as_os_str()],
        &[],
    );
    dir
}

/// A management cluster as `clusterctl init --infrastructure arges --bootstrap talos`
/// leaves one, with Cluster API's controllers running beside it and the namespace of the
/// tests' clusters.
fn management_cluster(repo: &Path) -> (ControlPlane, ClusterApi) {
    let cp = ControlPlane::start();
    let cert_manager =
        std::fs::read_to_string(bin_dir().join("cert-manager/cert-manager.yaml")).unwrap();
    let crds: Vec<String> = yaml_objects(&cert_manager)
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .map(|o| serde_json::to_string(&o).unwrap())
        .collect();
    assert!(crds.len() >= 6, "cert-manager's CRDs: {}", crds.len());
    let out = cp.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &crds.join("\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/certificates.cert-manager.io",
        "crd/issuers.cert-manager.io",
    ]);
    clusterctl(&cp, repo, &test_support::cluster_api::CLUSTERCTL_INIT, &[]);
    cp.kubectl(&[
        "delete",
        "validatingwebhookconfigurations,mutatingwebhookconfigurations",
        "--all",
    ]);
    // The CRDs convert through Services without pods: no conversion until ClusterApi
    // points them at its managers.
    let converting = cp.kubectl(&[
        "get",
        "crd",
        "-o",
        r#"jsonpath={range .items[?(@.spec.conversion.strategy=="Webhook")]}{.metadata.name}{"\n"}{end}"#,
    ]);
    for crd in converting.lines().filter(|l| !l.is_empty()) {
        cp.kubectl(&[
            "patch",
            "crd",
            crd,
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/conversion","value":{"strategy":"None"}}]"#,
        ]);
    }
    let capi = ClusterApi::start(&cp);
    cp.kubectl(&["create", "namespace", NS]);
    (cp, capi)
}

/// `objects` as Cluster API's defaulting webhook would leave them (these management
/// clusters run no admission webhooks): a MachineDeployment's rollout strategy, deletion
/// order and selector, with its template's labels.
fn as_defaulted(objects: &str) -> String {
    let mut out = Vec::new();
    for mut o in yaml_objects(objects) {
        if o["kind"] == "MachineDeployment" {
            let labels = serde_json::json!({
                "cluster.x-k8s.io/cluster-name": o["spec"]["clusterName"],
                "cluster.x-k8s.io/deployment-name": o["metadata"]["name"],
            });
            let spec = &mut o["spec"];
            spec["rollout"] = serde_json::json!({"strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}});
            spec["deletion"] = serde_json::json!({"order": "Random"});
            spec["selector"] = serde_json::json!({ "matchLabels": labels });
            spec["template"]["metadata"] = serde_json::json!({ "labels": labels });
        }
        out.push(serde_json::to_string(&o).unwrap());
    }
    out.join("\n")
}

/// Every Node of a workload "cluster" (apiserver `workload`), one per provisioned
/// server, named after its machine: what Cluster API looks for to set a Machine's
/// `nodeRef` (and `move` insists on). The QEMU machines of the netboot suite never run
/// Talos, so these stand in for the nodes they would become.
fn add_node(workload: &ControlPlane, name: &str, provider_id: &str) {
    apply(
        workload,
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  providerID: {provider_id}\n"
        ),
    );
}

/// `(Machine, its providerID, its nodeRef)` of every Machine in `NS`.
fn machines(cp: &ControlPlane) -> Vec<(String, String, String)> {
    cp.kubectl(&[
        "get",
        "machines",
        "-n",
        NS,
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} {.spec.providerID} {.status.nodeRef.name}{"\n"}{end}"#,
    ])
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() == 3).then(|| (f[0].into(), f[1].into(), f[2].into()))
    })
    .collect()
}

/// Adds to `workload` the Node of each Machine that has a provider ID (the control
/// plane's first: the workers' bootstrap waits for it), until all `count` Machines have
/// their `nodeRef`; `(machine, providerID)`, sorted.
fn machines_with_nodes(
    cp: &ControlPlane,
    workload: &ControlPlane,
    count: usize,
    state: impl Fn() -> String,
) -> Vec<(String, String)> {
    let mut added = std::collections::HashSet::new();
    let mut out = within(
        300,
        &format!("{count} Machines with their nodeRef"),
        || {
            let m = machines(cp);
            for (name, id, node) in &m {
                if !id.is_empty() && node.is_empty() && added.insert(name.clone()) {
                    add_node(workload, name, id);
                }
            }
            (m.len() == count && m.iter().all(|(_, _, n)| !n.is_empty()))
                .then(|| m.into_iter().map(|(m, id, _)| (m, id)).collect::<Vec<_>>())
        },
        &state,
    );
    out.sort();
    out
}

/// The appliance's record of a server that a move must leave as it is (its claim, its
/// provisioning window, its environment and power record; the last contact times left
/// out), and apart from it the uid of the Server object the claim is held through (the
/// move makes that object again).
fn server_record(a: &Appliance, uuid: &str) -> (serde_json::Value, String) {
    let (code, body) = a.request(
        "GET",
        &format!("/api/v1/servers/{uuid}"),
        Some(ADMIN_TOKEN),
        b"",
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.contains("seen") && !k.contains("updated"));
    }
    let held_through = v["provisioning"]["claim"]
        .as_object_mut()
        .and_then(|c| c.remove("server_object"))
        .and_then(|o| o.as_str().map(String::from))
        .unwrap_or_default();
    (v, held_through)
}

/// Power operations the appliance has sent to BMCs, by its metrics (sum of every
/// `arges_bmc_operations_total` series).
fn bmc_operations(a: &Appliance) -> u64 {
    a.metrics()
        .lines()
        .filter(|l| l.starts_with("arges_bmc_operations_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
#[ignore = "two real kube-apiservers, Cluster API and clusterctl (built from Go modules); tests/run-all.sh runs it"]
fn clusterctl_move_carries_a_provisioned_cluster_without_touching_a_machine() {
    let repo = full_repository();
    let (a_cp, a_capi) = management_cluster(repo.path());
    let (b_cp, b_capi) = management_cluster(repo.path());
    for cp in [&a_cp, &b_cp] {
        let providers = cp.kubectl(&["get", "providers", "-A", "--no-headers"]);
        assert_eq!(
            providers.lines().count(),
            3,
            "clusterctl's inventory:\n{providers}"
        );
    }
    let mut a = provider_appliance(&a_cp, "release = \"power-off\"");

    // Two servers with their BMCs; the Secret their Servers name carries clusterctl's
    // move label, so moving the appliance's namespace carries it too.
    server_bmc_secret(&a_cp);
    a_cp.kubectl(&[
        "label",
        "secret",
        "bmc",
        "-n",
        "arges-system",
        "clusterctl.cluster.x-k8s.io/move=",
    ]);
    let (bmcs, uuids) = qemu_class_of(&a_cp, &a, 2);

    // The template's cluster, one control-plane machine and one worker; its kubeconfig
    // names the workload "cluster" (the second apiserver, where the nodes appear).
    let args = test_support::cluster_api::generate_example_9(NS);
    let values = [
        ("CONTROL_PLANE_ENDPOINT_HOST", "10.0.0.30"),
        ("CONTROL_PLANE_SERVER_CLASS", "qemu"),
        ("WORKER_SERVER_CLASS", "qemu"),
    ];
    let cluster = clusterctl(&a_cp, repo.path(), &args, &values);
    apply(&a_cp, &as_defaulted(&cluster));
    let workload = std::fs::read_to_string(b_cp.kubeconfig()).unwrap();
    a_cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "example-9-kubeconfig",
        "-n",
        NS,
        "--type=cluster.x-k8s.io/secret",
        &format!("--from-literal=value={workload}"),
    ]);
    a_cp.kubectl(&[
        "label",
        "secret",
        "example-9-kubeconfig",
        "-n",
        NS,
        "cluster.x-k8s.io/cluster-name=example-9",
    ]);
    let state = |cp: &ControlPlane, a: &Appliance, capi: &ClusterApi| {
        format!(
            "{}\n{}",
            cp.kubectl(&[
                "get",
                "cluster,machines,metalmachines",
                "-n",
                NS,
                "-o",
                "wide"
            ]),
            pool_state(cp, a, capi)
        )
    };
    let before = machines_with_nodes(&a_cp, &b_cp, 2, || state(&a_cp, &a, &a_capi));
    let ready = |cp: &ControlPlane, a: &Appliance, capi: &ClusterApi| {
        let mms = within(
            120,
            "both MetalMachines Ready",
            || {
                let mms = metal_machines(cp);
                (mms.len() == 2 && mms.iter().all(|m| m.1 == "True/Provisioned")).then_some(mms)
            },
            || state(cp, a, capi),
        );
        let mut ids: Vec<(String, String)> =
            mms.into_iter().map(|(name, _, id, _)| (name, id)).collect();
        ids.sort();
        ids
    };
    let placed = ready(&a_cp, &a, &a_capi);
    for (uuid, bmc) in uuids.iter().zip(&bmcs) {
        assert!(bmc.ipmitool_says_on(), "{uuid} was powered on to provision");
    }
    let records: Vec<(serde_json::Value, String)> =
        uuids.iter().map(|u| server_record(&a, u)).collect();
    let bmc_log: Vec<String> = bmcs.iter().map(Bmc::requests).collect();
    assert!(
        bmc_log.iter().all(|l| !l.is_empty()),
        "the simulators counted the provisioning's power operations"
    );
    let ops = bmc_operations(&a);
    assert!(ops > 0, "the appliance counts its BMC operations");

    // The move: the cluster's namespace, then the appliance's (the BMC Secret).
    let to = b_cp.kubeconfig().display().to_string();
    let started = Instant::now();
    clusterctl(
        &a_cp,
        repo.path(),
        &["move", "-n", NS, "--to-kubeconfig", &to],
        &[],
    );
    clusterctl(
        &a_cp,
        repo.path(),
        &["move", "-n", "arges-system", "--to-kubeconfig", &to],
        &[],
    );
    let moved_in = started.elapsed();
    assert!(
        metal_machines(&a_cp).is_empty(),
        "the old management cluster keeps no MetalMachine"
    );
    assert_eq!(
        b_cp.field(&["secret", "bmc", "-n", "arges-system"], "{.data.user}"),
        "YWRtaW4=",
        "the BMC Secret moved (user admin)"
    );

    // The appliance follows the new cluster: the same inventory, B's service account.
    a.terminate();
    let dir = std::mem::replace(&mut a.dir, tempfile::tempdir().unwrap());
    drop(a);
    let kubeconfig = b_cp.service_account_kubeconfig();
    let b = Appliance::start_in(dir, &["--kubeconfig", &kubeconfig.display().to_string()]);
    let followed = Instant::now();
    assert_eq!(
        ready(&b_cp, &b, &b_capi),
        placed,
        "the same servers, Ready again"
    );
    let after = machines_with_nodes(&b_cp, &b_cp, 2, || state(&b_cp, &b, &b_capi));
    assert_eq!(after, before, "the same Machines on the same providers");
    for (uuid, claim) in server_claims(&b_cp).iter().map(|(u, c, _)| (u, c)) {
        assert!(!claim.is_empty(), "Server {uuid} shows its claim again");
    }
    eprintln!(
        "clusterctl move (both namespaces): {:.1} s; the appliance on the new cluster to every MetalMachine Ready: {:.1} s",
        moved_in.as_secs_f64(),
        followed.elapsed().as_secs_f64()
    );

    // Nothing touched a machine: no BMC request, no power operation counted, every
    // server's claim and provisioning window as they were.
    let bmc_after: Vec<String> = bmcs.iter().map(Bmc::requests).collect();
    assert_eq!(
        bmc_after, bmc_log,
        "a BMC was asked something across the move"
    );
    assert_eq!(
        bmc_operations(&b),
        0,
        "the appliance sent no BMC operation since it followed"
    );
    for (uuid, before) in uuids.iter().zip(&records) {
        let (record, held_through) = server_record(&b, uuid);
        assert_eq!(
            &record, &before.0,
            "{uuid}'s record changed across the move"
        );
        assert_ne!(held_through, before.1);
        assert_eq!(
            held_through,
            b_cp.field(&["server", uuid], "{.metadata.uid}"),
            "{uuid}'s claim is held through its Server in the new cluster"
        );
    }

    // What the new cluster sees, as clusterctl describes it: every Machine, with the
    // conditions Arges sets (the MetalCluster's and each MetalMachine's Ready, mirrored
    // by Cluster API) once Cluster API has read them again.
    let describe = || {
        clusterctl(
            &b_cp,
            repo.path(),
            &[
                "describe",
                "cluster",
                "example-9",
                "-n",
                NS,
                "--show-conditions",
                "all",
                "--grouping=false",
            ],
            &[],
        )
    };
    let described = within(
        120,
        "clusterctl describe shows both machines' infrastructure ready",
        || {
            let text = describe();
            (text
                .matches("is powered and booting its install environment")
                .count()
                >= 2)
                .then_some(text)
        },
        describe,
    );
    eprintln!("{described}");
    for (machine, _) in &after {
        assert!(
            described.contains(machine.as_str()),
            "{machine} is not described:\n{described}"
        );
    }
    assert!(
        described.contains("the control plane answers at 10.0.0.30:6443"),
        "the MetalCluster's condition:\n{described}"
    );

    // A delete in the new cluster releases the servers as before (this appliance powers
    // a released server off).
    b_cp.kubectl(&["delete", "cluster", "example-9", "-n", NS, "--wait=false"]);
    within(
        180,
        "both Servers released",
        || {
            server_claims(&b_cp)
                .iter()
                .all(|(_, c, _)| c.is_empty())
                .then_some(())
        },
        || state(&b_cp, &b, &b_capi),
    );
    assert!(
        bmc_operations(&b) > 0,
        "the release powered the servers off"
    );
    for bmc in &bmcs {
        assert!(!bmc.ipmitool_says_on(), "a released server is off");
    }
}
