//! A real Kubernetes node for tests: containerd and kubelet (`tests/k8s/node.sh`) in a
//! network namespace the test made, beside a [`ControlPlane::for_node`], with
//! kube-controller-manager and kube-scheduler, all built from Go modules by
//! `tests/k8s/build-binaries.sh`. Images come from tarballs ([`Node::import`]), never
//! from a registry.
//!
//! The node keeps everything it writes in its temp folder, including the host paths its
//! pods mount ([`Node::host_path`]). What it cannot keep there is put back on drop: its
//! pods' processes and containerd's shims are killed, its cgroups removed, and the
//! kernel settings kubelet changes (`vm.overcommit_memory`, `kernel.panic`,
//! `kernel.panic_on_oops`) restored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::control_plane::{ControlPlane, bin_dir};
use crate::process::{log_tail, repo, require};

/// The kernel settings kubelet sets on the host (its "kernel tunables").
const SYSCTLS: [&str; 3] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
];

pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    kubelet: Option<Child>,
    controllers: Vec<Child>,
    sysctls: Vec<(String, String)>,
}

impl Node {
    /// kube-controller-manager, kube-scheduler, and node `name` at `ip` (an address of
    /// the control plane's network namespace), Ready.
    pub fn start(cp: &ControlPlane, name: &str, ip: &str) -> Node {
        let netns = cp
            .netns
            .clone()
            .expect("a node runs in the control plane's network namespace");
        for tool in ["nsenter", "unshare", "runc"] {
            require(tool);
        }
        assert!(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "the node needs Debian's CNI plugins (apt-get install containernetworking-plugins)"
        );
        let bin = bin_dir();
        for b in [
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "containerd/containerd",
        ] {
            assert!(
                bin.join(b).is_file(),
                "{b} is missing from {}: run tests/k8s/build-binaries.sh",
                bin.display()
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let sysctls = SYSCTLS
            .iter()
            .map(|k| {
                let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).unwrap_or_default();
                (k.to_string(), v.trim().to_string())
            })
            .collect();
        let cpd = cp.dir.path();
        let kubeconfig = cp.kubeconfig();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let kcm = cp
            .command(bin.join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--service-account-private-key-file={}",
                cpd.join("sa.key").display()
            ))
            // Published to every namespace as kube-root-ca.crt, which pods' service
            // account volumes hold.
            .arg(format!(
                "--root-ca-file={}",
                cpd.join("certs/apiserver.crt").display()
            ))
            .arg("--leader-elect=false")
            .stdout(Stdio::null())
            .stderr(log("kube-controller-manager.log"))
            .spawn()
            .expect("start kube-controller-manager");
        let scheduler = cp
            .command(bin.join("kube-scheduler"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .stdout(Stdio::null())
            .stderr(log("kube-scheduler.log"))
            .spawn()
            .expect("start kube-scheduler");
        // nsenter, not `ip netns exec`: that remounts /sys and hides the cgroups.
        let kubelet = {
            use std::os::unix::process::CommandExt;
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{netns}"))
                .arg("bash")
                .arg(repo().join("tests/k8s/node.sh"))
                .arg(dir.path())
                .args([name, ip])
                .arg(&kubeconfig)
                .env("ARGES_K8S_BIN", bin)
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(log("node.log"))
                .spawn()
                .expect("start the node")
        };
        let mut node = Node {
            name: name.to_string(),
            dir,
            kubelet: Some(kubelet),
            controllers: vec![kcm, scheduler],
            sysctls,
        };
        node.wait_ready(cp);
        node
    }

    fn wait_ready(&mut self, cp: &ControlPlane) {
        let start = Instant::now();
        loop {
            let ready = cp.kubectl_output(&[
                "get",
                "node",
                &self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            if String::from_utf8_lossy(&ready.stdout).trim() == "True" {
                return;
            }
            if let Some(Ok(Some(status))) = self.kubelet.as_mut().map(|c| c.try_wait()) {
                panic!("the node exited with {status}:\n{}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "node {} not Ready in 120 s:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Imports an image tarball (docker-archive or OCI) into the node's containerd.
    pub fn import(&self, tarball: &Path) {
        let out = Command::new(bin_dir().join("containerd/ctr"))
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import", "--local"])
            .arg(tarball)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            tarball.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the node's host path `path` (a hostPath volume's, say) really lives.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("host")
            .join(path.trim_start_matches('/'))
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The node's logs (kubelet, containerd, the controllers), for failure messages.
    pub fn logs(&self) -> String {
        [
            "node.log",
            "kubelet.log",
            "containerd.log",
            "kube-controller-manager.log",
            "kube-scheduler.log",
        ]
        .iter()
        .map(|f| log_tail(&self.dir.path().join(f), 3000))
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// The cgroup every pod of this node lives under (node.sh's `cgroupRoot`).
    fn cgroup_root(&self) -> String {
        format!("/arges-node-{}", self.name)
    }
}

/// Every process whose command line contains `needle`, or whose cgroup path (in any
/// hierarchy) starts with `cgroup`.
fn processes(needle: &str, cgroup: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cgroups =
                std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            cmdline.contains(needle)
                || cgroups
                    .lines()
                    .any(|l| l.split(':').nth(2).is_some_and(|p| p.starts_with(cgroup)))
        })
        .collect()
}

/// Removes a cgroup folder and everything under it, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.kubelet.take() {
            // The whole group: node.sh, containerd and kubelet.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGTERM) };
            let _ = c.wait();
        }
        for mut c in self.controllers.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The shims (named by this node's containerd socket) and the containers (in
        // this node's cgroups) outlive containerd; kill them, then remove the cgroups.
        let socket = self.socket().display().to_string();
        let root = self.cgroup_root();
        for _ in 0..50 {
            let left = processes(&socket, &format!("{root}/"));
            if left.is_empty() {
                break;
            }
            for pid in left {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                remove_cgroup(&h.path().join(root.trim_start_matches('/')));
            }
        }
        for (k, v) in &self.sysctls {
            if !v.is_empty() {
                let _ = std::fs::write(Path::new("/proc/sys").join(k), v);
            }
        }
    }
}
