//! The whole story with real firmware: a QEMU machine behind an `ipmi_sim` BMC whose
//! chassis control starts and stops the VM, the appliance in Kubernetes mode beside a
//! real control plane, Cluster API core and CABPT, all inside the lab's namespace.
//!
//! The machine is powered on (PXE first) and registers; a MetalMachine claims it; Arges
//! sets its next boot to PXE and powers it on into the install environment (a stand-in:
//! the discovery initramfs in `install` mode, since Talos images cannot be had here),
//! which fetches its configuration from `/configdata` with its token and reports done.
//! Another machine asking for that configuration is refused, and the next boot is the
//! machine's disk.

use serde_json::Value;
use sha2::Digest;

use crate::lab::{self, APPLIANCE_IP, Firmware, Lab, Machine, discovery_dir};
use test_support::cluster_api::ClusterApi;
use test_support::control_plane::ControlPlane;
use test_support::ipmi_sim::{Bmc, GENERIC};
use test_support::within as wait;

/// The guide's namespace for its clusters.
pub const NS: &str = "arges-examples";

/// ipmi_sim's chassis control for a QEMU machine: `power 1` starts the VM (booting the
/// network first, or its disk when the boot device says so), `power 0` stops it, `reset`
/// restarts it, and the power state is whether it runs.
pub const VM_CHASSIS: &str = r#"#!/bin/sh
d=$1; shift; mc=$1; op=$2; shift 2
running() { [ -f "$d/qemu.pid" ] && kill -0 "$(cat "$d/qemu.pid")" 2>/dev/null; }
start() {
  boot="$(cat "$d/boot" 2>/dev/null || echo pxe)"
  script="$d/qemu-$boot.sh"; [ -f "$script" ] || script="$d/qemu-pxe.sh"
  sh "$script" </dev/null >/dev/null 2>&1 &
  echo $! > "$d/qemu.pid"
}
stop() { running && kill "$(cat "$d/qemu.pid")"; while running; do sleep 0.1; done; rm -f "$d/qemu.pid"; }
if [ "$op" = get ]; then
  for p in "$@"; do
    case $p in
      power) if running; then echo power:1; else echo power:0; fi ;;
      boot) echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)" ;;
    esac
  done
else
  while [ $# -gt 1 ]; do
    echo "$1 $2" >> "$d/log"
    case "$1 $2" in
      "power 1") running || start ;;
      "power 0") stop ;;
      "reset 1") stop; start ;;
      *) echo "$2" > "$d/$1" ;;
    esac
    shift 2
  done
fi
"#;

/// Writes the VM's start scripts into the BMC's state folder: network first, or disk.
pub fn wire_vm(lab: &Lab, m: &Machine, bmc: &Bmc) {
    let args = lab.qemu_args(m);
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let pxe: Vec<String> = args.iter().map(|a| quote(a)).collect();
    let disk: Vec<String> = args
        .iter()
        .map(|a| {
            quote(
                &a.replace("bootindex=1", "bootindex=X")
                    .replace("bootindex=2", "bootindex=1")
                    .replace("bootindex=X", "bootindex=2"),
            )
        })
        .collect();
    for (name, a) in [("qemu-pxe.sh", pxe), ("qemu-disk.sh", disk)] {
        std::fs::write(
            bmc.state_dir().join(name),
            format!("exec qemu-system-x86_64 {}\n", a.join(" ")),
        )
        .unwrap();
    }
}

/// `curl` in the LAN from the appliance's own address (not the machine's).
fn curl_status(lab: &Lab, method: &str, url: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.lan(),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
        ])
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guide's cluster (on today's API versions) for the machine `uuid` behind the IPMI
/// BMC at `bmc`, with the BMC inline as the guide writes it.
pub fn guide_cluster(uuid: &str, bmc: &str) -> String {
    format!(
        r#"apiVersion: cluster.x-k8s.io/v1beta2
kind: Cluster
metadata: {{name: example-0, namespace: {NS}}}
spec:
  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalCluster, name: example-0}}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalCluster
metadata: {{name: example-0, namespace: {NS}}}
spec:
  apiEndpoints: [{{host: 10.77.0.50, port: 6443}}]
---
apiVersion: bootstrap.cluster.x-k8s.io/v1alpha3
kind: TalosConfig
metadata: {{name: controlplane-0, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: example-0}}}}
spec:
  generateType: none
  data: |
    version: v1alpha1
    machine: {{type: init}}
    cluster: {{clusterName: example-0, controlPlane: {{endpoint: "https://10.77.0.50:6443"}}}}
---
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha2
kind: MetalMachine
metadata: {{name: controlplane-0, namespace: {NS}}}
spec:
  serverRef: {{apiVersion: metal.arges.dev/v1alpha1, kind: Server, name: {uuid}}}
  bmc: {{endpoint: "ipmi://{bmc}", user: admin, pass: password}}
---
apiVersion: cluster.x-k8s.io/v1beta2
kind: Machine
metadata: {{name: controlplane-0, namespace: {NS}, labels: {{cluster.x-k8s.io/cluster-name: example-0, cluster.x-k8s.io/control-plane: ""}}}}
spec:
  clusterName: example-0
  version: v1.35.4
  bootstrap: {{configRef: {{apiGroup: bootstrap.cluster.x-k8s.io, kind: TalosConfig, name: controlplane-0}}}}
  infrastructureRef: {{apiGroup: infrastructure.cluster.x-k8s.io, kind: MetalMachine, name: controlplane-0}}
"#,
    )
}

/// Applies the guide's cluster for machine `m` behind `bmc` and waits until Arges has
/// claimed it, set PXE, powered it on into its install environment, and the environment
/// fetched its configuration and reported done; returns how long that took.
pub fn provision(
    cp: &ControlPlane,
    lab: &Lab,
    m: &Machine,
    bmc: &Bmc,
    state: impl Fn() -> String,
) -> std::time::Duration {
    let applied = std::time::Instant::now();
    let out = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &guide_cluster(&m.uuid, &bmc.addr.to_string()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(
        lab::boot_deadline_secs(),
        "the install environment reports done",
        || {
            lab.serial(m)
                .contains("arges-init: installation reported done")
                .then_some(())
        },
        state,
    );
    applied.elapsed()
}

#[test]
#[ignore = "QEMU, ipmi_sim, kube-apiserver and Cluster API in network namespaces (root); tests/run-all.sh runs it"]
fn a_bare_machine_behind_a_bmc_becomes_a_cluster_machine() {
    let mut lab = Lab::prepare("capi");
    let cp = ControlPlane::start_in(Some(&lab.lan()));
    cp.apply_crds();
    cp.kubectl(&["create", "namespace", "arges-system"]);
    let capi = ClusterApi::start(&cp);
    cp.kubectl(&["create", "namespace", NS]);

    let plugins = lab.dir.path().join("data/plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let ipmi = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/out/ipmi.wasm");
    std::fs::copy(ipmi, plugins.join("ipmi.wasm"))
        .unwrap_or_else(|e| panic!("{ipmi}: {e} (run plugins/build.sh first)"));
    let d = discovery_dir();
    lab.start_appliance(&format!(
        r#"[environments.talos-standin]
kernel = "{kernel}"
initrds = ["{initrd}"]
cmdline = "console=ttyS0,115200 arges.mode=install talos.config={{{{ appliance.url }}}}/configdata?uuid={{{{ machine.uuid }}}}&token={{{{ boot_token }}}}"
[kubernetes]
kubeconfig = "{kubeconfig}"
identity = "lab"
namespace = "arges-system"
[bmc]
poll_ms = 500
settle_s = 120
"#,
        kernel = d.join("vmlinuz").display(),
        initrd = d.join("initramfs.img").display(),
        kubeconfig = cp.kubeconfig().display(),
    ));
    let m = Machine::new(&lab, Firmware::Bios, 1).with_boot_sector("ARGES-DISK-BOOTED");
    let bmc = Bmc::start_with(GENERIC, VM_CHASSIS, Some(&lab.lan()));
    wire_vm(&lab, &m, &bmc);
    let state = || {
        format!(
            "{}\n{}\n--- chassis ---\n{}\n{}",
            cp.kubectl(&["get", "servers,metalmachines,machines", "-A", "-o", "wide"]),
            lab.logs(&m.serial_log),
            bmc.requests(),
            capi.log("capi")
        )
    };

    // The operator powers the new machine on, network first: it registers and powers off.
    bmc.ipmitool(&["chassis", "bootdev", "pxe"])
        .expect("bootdev");
    bmc.ipmitool(&["power", "on"]).expect("power on");
    wait(
        lab::boot_deadline_secs(),
        "the machine registers and powers off",
        || {
            let out = cp.kubectl_output(&["get", "server", &m.uuid]);
            (out.status.success() && !bmc.ipmitool_says_on()).then_some(())
        },
        state,
    );
    cp.kubectl(&[
        "patch",
        "server",
        &m.uuid,
        "--type=merge",
        "-p",
        r#"{"spec":{"accepted":true,"environmentRef":{"name":"talos-standin"}}}"#,
    ]);

    // The guide's cluster: claimed, PXE next, powered on into the install environment,
    // which fetches its configuration with its token and reports.
    let took = provision(&cp, &lab, &m, &bmc, state);
    eprintln!(
        "cluster manifests applied to the install environment's report: {:.1} s",
        took.as_secs_f64()
    );
    let requests = bmc.requests();
    let second_boot = &requests[requests.find("power 0").unwrap_or(0)..];
    assert!(
        second_boot.contains("boot pxe")
            && second_boot.find("boot pxe") < second_boot.rfind("power 1"),
        "Arges set PXE before powering on: {requests}"
    );
    wait(
        60,
        "the MetalMachine is ready and installed",
        || {
            let c = cp.field(
                &["metalmachine", "controlplane-0", "-n", NS],
                "{.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Installed\")].reason}/{.spec.providerID}",
            );
            (c == format!("True/InstallReported/arges://{}", m.uuid)).then_some(())
        },
        state,
    );
    // Its addresses are the ones its NICs held when it registered (the site's lease).
    let addresses = cp.field(
        &["metalmachine", "controlplane-0", "-n", NS],
        "{range .status.addresses[*]}{.type}={.address} {end}",
    );
    let lease = addresses
        .split_whitespace()
        .find_map(|a| a.strip_prefix("InternalIP="))
        .unwrap_or_default()
        .to_string();
    let in_site_range = lease
        .strip_prefix("10.77.0.")
        .and_then(|host| host.parse::<u8>().ok())
        .is_some_and(|host| (100..=199).contains(&host));
    assert!(
        in_site_range,
        "an address from the site's DHCP range: {addresses}"
    );
    // The window the appliance opened by power-cycling it was claimed by the machine
    // itself (its lease), whose fetch spent the token.
    let server: Value =
        serde_json::from_str(&lab.api("GET", &format!("/api/v1/servers/{}", m.uuid), None))
            .unwrap();
    let w = &server["window"];
    assert!(
        w["opened_by"] == "power on" || w["opened_by"] == "power cycle",
        "{server}"
    );
    assert_eq!(w["claimant"]["source"], lease.as_str(), "{server}");
    assert_eq!(w["closed"]["why"], "used", "{server}");
    assert!(server["alarm"].is_null(), "{server}");
    // What the machine fetched is the Machine's bootstrap data.
    let value = test_support::cluster_api::bootstrap_data(&cp, NS, "controlplane-0");
    let serial = lab.serial(&m);
    assert!(
        serial.contains(&format!(
            "configuration: {} bytes, sha256 {}",
            value.len(),
            hex::encode(sha2::Sha256::digest(&value))
        )),
        "the served configuration is the bootstrap data:\n{serial}"
    );

    // Another machine asking (without the token, from another address) is refused, and
    // so is the token with another machine's UUID.
    let url = |uuid: &str, token: &str| {
        format!("http://{APPLIANCE_IP}:8080/configdata?uuid={uuid}{token}")
    };
    assert_eq!(curl_status(&lab, "GET", &url(&m.uuid, "")), "403");
    let token = serial
        .split("token=")
        .nth(1)
        .map(|t| {
            t.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect::<String>()
        })
        .expect("the token on the install command line");
    let other = "8c5e3f00-77aa-4b1e-9a00-0000000000ff";
    assert_eq!(
        curl_status(&lab, "GET", &url(other, &format!("&token={token}"))),
        "403"
    );
    assert_eq!(
        curl_status(
            &lab,
            "POST",
            &format!("http://{APPLIANCE_IP}:8080/configdata/done?uuid={other}&token={token}")
        ),
        "403"
    );

    // Installed: powered on again by Arges, it boots its own disk.
    wait(
        60,
        "the install environment powers off",
        || (!bmc.ipmitool_says_on()).then_some(()),
        state,
    );
    let reply = lab.api(
        "POST",
        &format!("/api/v1/servers/{}/bmc/power", m.uuid),
        Some(r#"{"action":"on"}"#),
    );
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["event"]["ok"], true, "{reply}");
    wait(
        lab::boot_deadline_secs(),
        "the machine boots its disk",
        || lab.serial(&m).contains("ARGES-DISK-BOOTED").then_some(()),
        state,
    );
    bmc.ipmitool(&["power", "off"]);
}
