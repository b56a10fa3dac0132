//! The real Cluster API beside the test control plane: the core controller manager
//! (`sigs.k8s.io/cluster-api`) and the Talos bootstrap provider (CABPT), built from Go
//! modules by `tests/k8s/build-binaries.sh`, with the CRDs of those same modules.
//!
//! Cluster API stores v1beta2 while CABPT (on Cluster API v1.10) reads v1beta1, so the
//! apiserver must convert: both managers run their webhook servers with a certificate
//! made here, and every multi-version CRD gets a conversion webhook pointing at its
//! manager on loopback. The admission webhooks (defaulting, validation) are not
//! registered: the CRDs' own schemas and defaults validate, as in an envtest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use base64::Engine;

use crate::control_plane::{ControlPlane, bin_dir};
use crate::process::free_port;

/// `clusterctl init` of every provider the tests install, at the releases they pin
/// (deploy/versions.env), from the local repository (tests/k8s/clusterctl-repository.sh).
pub const CLUSTERCTL_INIT: [&str; 9] = [
    "init",
    "--core",
    "cluster-api:v1.14.2",
    "--bootstrap",
    "talos:v0.6.11",
    "--infrastructure",
    "arges:v0.1.0",
    "--control-plane",
    "-",
];

/// `clusterctl generate cluster example-9` from Arges's default template into `namespace`:
/// one control-plane machine and one worker, at the tests' Kubernetes release.
pub fn generate_example_9(namespace: &str) -> [&str; 11] {
    [
        "generate",
        "cluster",
        "example-9",
        "--target-namespace",
        namespace,
        "--kubernetes-version",
        "v1.35.4",
        "--worker-machine-count",
        "1",
        "--infrastructure",
        "arges:v0.1.0",
    ]
}

/// The running Cluster API controllers.
pub struct ClusterApi {
    dir: PathBuf,
    capi: Option<Child>,
    cabpt: Option<Child>,
    capi_health: u16,
    cabpt_health: u16,
}

/// The provider folder the build script links: binaries and `crds/`.
fn providers() -> PathBuf {
    let dir = bin_dir().join("capi");
    for f in ["cluster-api", "cabpt", "crds"] {
        assert!(
            dir.join(f).exists(),
            "{f} is missing from {}: run tests/k8s/build-binaries.sh",
            dir.display()
        );
    }
    dir
}

impl ClusterApi {
    /// Installs the CRDs and starts both managers against `cp`, ready.
    pub fn start(cp: &ControlPlane) -> ClusterApi {
        let dir = cp.dir.path().join("cluster-api");
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).expect("cert dir");
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(certs.join("tls.key"))
            .arg("-out")
            .arg(certs.join("tls.crt"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl could not make the webhook certificate");
        let ca = std::fs::read(certs.join("tls.crt")).expect("webhook certificate");
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let (capi_webhook, cabpt_webhook) = (free_port(), free_port());
        let crds = providers().join("crds");
        let mut names = Vec::new();
        let mut manifests = String::new();
        let mut files: Vec<_> = std::fs::read_dir(&crds)
            .expect("crds")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("crd");
            let mut crd: serde_json::Value = serde_yaml_ng::from_str(&text).expect("crd yaml");
            let group = crd["spec"]["group"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let bootstrap = group == "bootstrap.cluster.x-k8s.io";
            if bootstrap {
                // The contract label kustomize adds in CABPT's own release manifests.
                crd["metadata"]["labels"]["cluster.x-k8s.io/v1beta1"] = "v1alpha3".into();
            }
            let versions = crd["spec"]["versions"].as_array().map_or(0, Vec::len);
            if versions > 1 {
                let port = if bootstrap {
                    cabpt_webhook
                } else {
                    capi_webhook
                };
                crd["spec"]["conversion"] = serde_json::json!({
                    "strategy": "Webhook",
                    "webhook": {
                        "conversionReviewVersions": ["v1", "v1beta1"],
                        "clientConfig": {
                            "url": format!("https://127.0.0.1:{port}/convert"),
                            "caBundle": ca,
                        },
                    },
                });
            }
            names.push(format!(
                "crd/{}",
                crd["metadata"]["name"].as_str().unwrap_or_default()
            ));
            manifests.push_str(&serde_json::to_string(&crd).expect("json"));
            manifests.push('\n');
        }
        // Forced: over a clusterctl install, these take the conversion settings back.
        let out = cp.kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &manifests,
        );
        assert!(
            out.status.success(),
            "the Cluster API CRDs do not apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut wait = vec!["wait", "--for=condition=established", "--timeout=60s"];
        wait.extend(names.iter().map(String::as_str));
        cp.kubectl(&wait);

        let (capi_health, cabpt_health) = (free_port(), free_port());
        let start = |name: &str, binary: &str, webhook: u16, health: u16| -> Child {
            cp.command(providers().join(binary))
                .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
                .arg(format!("--webhook-port={webhook}"))
                .arg(format!("--webhook-cert-dir={}", certs.display()))
                .arg(format!("--health-addr=127.0.0.1:{health}"))
                .arg(format!("--diagnostics-address=127.0.0.1:{}", free_port()))
                .arg("--insecure-diagnostics")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
                .spawn()
                .unwrap_or_else(|e| panic!("start {binary}: {e}"))
        };
        let mut capi = ClusterApi {
            capi: Some(start("capi", "cluster-api", capi_webhook, capi_health)),
            cabpt: Some(start("cabpt", "cabpt", cabpt_webhook, cabpt_health)),
            dir,
            capi_health,
            cabpt_health,
        };
        capi.wait_ready(cp);
        capi
    }

    fn wait_ready(&mut self, cp: &ControlPlane) {
        let start = Instant::now();
        for (name, port) in [("capi", self.capi_health), ("cabpt", self.cabpt_health)] {
            loop {
                if http_ok(cp, port, "/readyz") {
                    break;
                }
                let child = if name == "capi" {
                    &mut self.capi
                } else {
                    &mut self.cabpt
                };
                if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
                    panic!("{name} exited with {status}:\n{}", self.log(name));
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "{name} not ready in 120 s:\n{}",
                    self.log(name)
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }

    /// The tail of a manager's log (`capi` or `cabpt`).
    pub fn log(&self, name: &str) -> String {
        tail(&self.dir.join(format!("{name}.log")))
    }
}

/// The bootstrap data of Machine `machine` in `ns`: its data Secret's `value`.
pub fn bootstrap_data(cp: &ControlPlane, ns: &str, machine: &str) -> Vec<u8> {
    let secret = cp.field(
        &["machine", machine, "-n", ns],
        "{.spec.bootstrap.dataSecretName}",
    );
    let value = cp.field(&["secret", &secret, "-n", ns], "{.data.value}");
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .expect("base64 in the Secret")
}

/// Whether `GET http://127.0.0.1:port/path` answers 200, asked where the control plane
/// runs (curl, so it works inside a namespace too).
fn http_ok(cp: &ControlPlane, port: u16, path: &str) -> bool {
    cp.command("curl")
        .args(["-sf", "-m", "2", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .status()
        .is_ok_and(|s| s.success())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let cut = text.len().saturating_sub(6000);
    let cut = (cut..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    format!("--- {} ---\n{}", path.display(), &text[cut..])
}

impl Drop for ClusterApi {
    fn drop(&mut self) {
        for c in [self.capi.take(), self.cabpt.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
