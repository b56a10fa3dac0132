//! A Kubernetes control plane to try the README's getting-started path on one machine:
//! etcd, kube-apiserver, the Cluster API core manager and the Talos bootstrap provider,
//! built from Go modules by `tests/k8s/build-binaries.sh` (cached), all on loopback,
//! with Arges's CRDs and RBAC applied. It is the Kubernetes tests' own harness.
//!
//! `cargo run --release --example dev-control-plane` prints the kubeconfig and kubectl
//! to use, then runs until Ctrl-C, which stops everything and removes its folder.

use test_support::{cluster_api, control_plane};

fn main() {
    let cp = control_plane::ControlPlane::start();
    cp.apply_crds();
    let rbac = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac/rbac.yaml");
    cp.kubectl(&["apply", "-f", rbac]);
    let capi = cluster_api::ClusterApi::start(&cp);
    let kubectl = control_plane::bin_dir().join("kubectl");
    println!(
        "control plane ready (kube-apiserver, Cluster API core, CABPT)\n\n  export KUBECONFIG={}\n  alias kubectl={}\n\nCtrl-C stops it.",
        cp.kubeconfig().display(),
        kubectl.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _ = runtime.block_on(tokio::signal::ctrl_c());
    drop(capi);
    drop(cp);
}
