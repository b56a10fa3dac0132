//! A real Kubernetes control plane for tests: etcd and kube-apiserver on loopback, built
//! from Go modules by `tests/k8s/build-binaries.sh` (cached outside the work tree).
//!
//! `ControlPlane::start()` is the one line a test needs: it generates the service-account
//! keys, lets kube-apiserver make its own serving certificate, authenticates an admin by
//! a static token, turns RBAC on, waits for `/readyz` and writes a kubeconfig. It can stop
//! and restart the apiserver (same etcd, same ports), and stops everything on drop.
//! `ControlPlane::start_in(netns)` runs it all inside a network namespace instead (the
//! netboot lab's), where the appliance under test lives. `ControlPlane::for_node(netns)`
//! is that, ready for a [`crate::node::Node`]'s pods: the apiserver listens on every
//! address at port 443, with the `kubernetes` Service's address (10.96.0.1) on the
//! namespace's loopback, so pods reach it without kube-proxy; and it calls webhooks at
//! their pods' addresses (`--enable-aggregator-routing`), without Service routing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::process::{command_in, free_port, log_tail, repo};

/// The `kubernetes` Service's address in the tests' service range (10.96.0.0/24).
pub const SERVICE_IP: &str = "10.96.0.1";

/// The control plane's admin (a static token; not the appliance's admin token).
pub const KUBE_ADMIN_TOKEN: &str = "arges-test-admin-token-0001";

/// The folder holding kube-apiserver, kubectl and etcd: `ARGES_K8S_BIN`, or built here.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("ARGES_K8S_BIN") {
            return PathBuf::from(d);
        }
        let script = repo().join("tests/k8s/build-binaries.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "building the test control plane failed (needs Go and the Go module proxy)"
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The network namespace everything runs in (`None`: the host's loopback).
    pub netns: Option<String>,
    /// Started for a node's pods ([`ControlPlane::for_node`]).
    for_node: bool,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

impl ControlPlane {
    /// etcd and kube-apiserver, ready.
    pub fn start() -> ControlPlane {
        Self::start_in(None)
    }

    /// etcd and kube-apiserver inside network namespace `netns` (on its loopback), ready.
    pub fn start_in(netns: Option<&str>) -> ControlPlane {
        Self::start_with(netns, false)
    }

    /// etcd and kube-apiserver inside `netns`, reachable from a node's pods at the
    /// `kubernetes` Service's address.
    pub fn for_node(netns: &str) -> ControlPlane {
        let ok = command_in(Some(netns), "ip")
            .args(["addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot put {SERVICE_IP} on {netns}'s loopback");
        Self::start_with(Some(netns), true)
    }

    fn start_with(netns: Option<&str>, for_node: bool) -> ControlPlane {
        let bin = bin_dir();
        for b in ["etcd", "kube-apiserver", "kubectl"] {
            assert!(
                bin.join(b).is_file(),
                "{b} is missing from {}: run tests/k8s/build-binaries.sh",
                bin.display()
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for (args, what) in [
            (
                vec!["genrsa", "-out", "sa.key", "2048"],
                "service-account key",
            ),
            (
                vec!["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
                "its public half",
            ),
        ] {
            let ok = Command::new("openssl")
                .args(&args)
                .current_dir(d)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "openssl could not make the {what}");
        }
        std::fs::write(
            d.join("tokens.csv"),
            format!("{KUBE_ADMIN_TOKEN},arges-test-admin,1,\"system:masters\"\n"),
        )
        .expect("token file");
        let (client, peer) = (free_port(), free_port());
        let etcd = command_in(netns, bin.join("etcd"))
            .args(["--name", "default", "--unsafe-no-fsync"])
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).expect("log"))
            .spawn()
            .expect("start etcd");
        std::fs::write(d.join("etcd.port"), client.to_string()).expect("etcd port");
        let mut cp = ControlPlane {
            // A node's pods dial the Service's port, 443, with nothing to translate it.
            port: if for_node { 443 } else { free_port() },
            netns: netns.map(String::from),
            for_node,
            dir,
            etcd: Some(etcd),
            apiserver: None,
        };
        cp.write_kubeconfig("admin.kubeconfig", KUBE_ADMIN_TOKEN);
        cp.start_apiserver();
        cp
    }

    fn start_apiserver(&mut self) {
        let d = self.dir.path();
        let etcd_port = std::fs::read_to_string(d.join("etcd.port")).expect("etcd port");
        let mut apiserver = self.command(bin_dir().join("kube-apiserver"));
        if self.for_node {
            apiserver.args([
                "--bind-address=0.0.0.0",
                "--enable-aggregator-routing=true",
                "--kubelet-preferred-address-types=InternalIP",
            ]);
        } else {
            apiserver.arg("--bind-address=127.0.0.1");
        }
        let child = apiserver
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--secure-port={}", self.port))
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .args([
                "--service-cluster-ip-range=10.96.0.0/24",
                "--enable-priority-and-fairness=false",
                // Watches end after 5-10 s, so every test also lives through watch expiry.
                "--min-request-timeout=5",
            ])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(d.join("apiserver.log"))
                    .expect("log"),
            )
            .spawn()
            .expect("start kube-apiserver");
        self.apiserver = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let out = self.kubectl_output(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            if let Some(Ok(Some(status))) = self.apiserver.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "kube-apiserver exited with {status}:\n{}",
                    self.log("apiserver.log")
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "kube-apiserver not ready in 120 s:\n{}",
                self.log("apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops kube-apiserver (etcd keeps the state).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts kube-apiserver again on the same port and state.
    pub fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.start_apiserver();
    }

    /// Writes a kubeconfig that authenticates with `token`; returns its path.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let ca = self.dir.path().join("certs/apiserver.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: u\ncurrent-context: test\n",
                self.port,
                ca.display()
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// `program`, where the control plane runs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(self.netns.as_deref(), program)
    }

    /// Applies the shipped RBAC (`deploy/rbac/rbac.yaml`).
    pub fn apply_rbac(&self) {
        let rbac = repo().join("deploy/rbac/rbac.yaml");
        self.kubectl(&["apply", "-f", &rbac.display().to_string()]);
    }

    /// A kubeconfig of the shipped RBAC's service account (`arges` in `arges-system`,
    /// from `deploy/rbac/rbac.yaml`: [`ControlPlane::apply_rbac`] first).
    pub fn service_account_kubeconfig(&self) -> PathBuf {
        let token = self.kubectl(&[
            "create",
            "token",
            "arges",
            "-n",
            "arges-system",
            "--duration=2h",
        ]);
        self.write_kubeconfig("sa.kubeconfig", token.trim())
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    pub fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        self.command(bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl as admin; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One field of an object: `kubectl get <object> -o jsonpath=<path>`.
    pub fn field(&self, object: &[&str], jsonpath: &str) -> String {
        let path = format!("jsonpath={jsonpath}");
        let mut args = vec!["get"];
        args.extend_from_slice(object);
        args.extend(["-o", path.as_str()]);
        self.kubectl(&args)
    }

    /// kubectl with `stdin` as input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .command(bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("kubectl output")
    }

    /// Applies the checked-in CRDs and waits until they serve.
    pub fn apply_crds(&self) {
        let crds = repo().join("deploy/crds/arges.yaml");
        self.kubectl(&["apply", "-f", &crds.display().to_string()]);
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/servers.metal.arges.dev",
            "crd/environments.metal.arges.dev",
            "crd/serverclasses.metal.arges.dev",
            "crd/metalmachines.infrastructure.cluster.x-k8s.io",
        ]);
    }

    pub fn log(&self, name: &str) -> String {
        log_tail(&self.dir.path().join(name), 4000)
    }

    /// An object read whole and typed: `kubectl get <object> -o json` into `K` (the
    /// appliance's own resource types, say), instead of one field by jsonpath.
    pub fn get<K: DeserializeOwned>(&self, object: &[&str]) -> K {
        let mut args = vec!["get"];
        args.extend_from_slice(object);
        args.extend(["-o", "json"]);
        let json = self.kubectl(&args);
        serde_json::from_str(&json).unwrap_or_else(|e| {
            panic!("kubectl get {object:?}: not the type asked for: {e}\n{json}")
        })
    }

    /// Like [`ControlPlane::get`], `None` when the object does not exist.
    pub fn get_opt<K: DeserializeOwned>(&self, object: &[&str]) -> Option<K> {
        let mut args = vec!["get"];
        args.extend_from_slice(object);
        args.extend(["-o", "json", "--ignore-not-found"]);
        let json = self.kubectl(&args);
        (!json.trim().is_empty()).then(|| {
            serde_json::from_str(&json).unwrap_or_else(|e| {
                panic!("kubectl get {object:?}: not the type asked for: {e}\n{json}")
            })
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
