//! The Redfish transport against sushy-emulator (sushy-tools from PyPI) over TLS with its
//! own certificate and basic auth: certificate checks by CA and by pin, wrong credentials
//! and an absent BMC. Power and the boot override through the `redfish` driver are in
//! `power.rs`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use arges::bmc::redfish::{RedfishClient, RedfishError, RedfishTarget, TlsPolicy};

use test_support::runtime;

/// sushy-emulator and the Python that has bcrypt: `ARGES_SUSHY_VENV`, which
/// `tests/run-all.sh` prepares, or a `sushy-emulator` on PATH.
fn sushy() -> (PathBuf, PathBuf) {
    if let Some(venv) = std::env::var_os("ARGES_SUSHY_VENV") {
        let v = PathBuf::from(venv);
        return (v.join("bin/sushy-emulator"), v.join("bin/python"));
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("sushy-emulator"))
                .find(|f| f.is_file())
        })
        .expect("these tests need sushy-emulator (tests/run-all.sh installs sushy-tools into ARGES_SUSHY_VENV)");
    let python = on_path.with_file_name("python");
    (on_path, python)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA in `dir`: `ca.key` and `ca.pem`.
fn make_ca(dir: &Path, name: &str) {
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", "ca.key", "-out", "ca.pem",
        ],
    );
}

pub struct Sushy {
    dir: tempfile::TempDir,
    pub authority: String,
    child: Child,
}

impl Sushy {
    pub fn start() -> Sushy {
        let (emulator, python) = sushy();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A CA, and the BMC's certificate from it (SAN 127.0.0.1), as a site would have.
        make_ca(d, "arges-test-ca");
        openssl(
            d,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bmc", "-keyout", "bmc.key",
                "-out", "bmc.csr",
            ],
        );
        std::fs::write(
            d.join("ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "bmc.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext",
                "-out",
                "bmc.pem",
            ],
        );
        let hash = Command::new(&python)
            .args([
                "-c",
                "import bcrypt; print(bcrypt.hashpw(b'password', bcrypt.gensalt()).decode())",
            ])
            .output()
            .expect("python with bcrypt");
        std::fs::write(
            d.join("htpasswd"),
            format!("admin:{}", String::from_utf8_lossy(&hash.stdout).trim()),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.join("sushy.conf"),
            format!(
                "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\nSUSHY_EMULATOR_SSL_CERT = '{d}/bmc.pem'\nSUSHY_EMULATOR_SSL_KEY = '{d}/bmc.key'\nSUSHY_EMULATOR_AUTH_FILE = '{d}/htpasswd'\nSUSHY_EMULATOR_FAKE_DRIVER = True\nSUSHY_EMULATOR_STATE_DIR = '{d}/state'\nSUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '27946b59-9e44-4fa7-8e91-f3527a1ef094', 'name': 'node-1', 'power_state': 'Off', 'nics': [{{'mac': '52:54:00:aa:bb:01'}}]}}]\n",
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new(emulator)
            .arg("--config")
            .arg(d.join("sushy.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sushy.log")).unwrap())
            .spawn()
            .expect("start sushy-emulator");
        let sushy = Sushy {
            authority: format!("127.0.0.1:{port}"),
            dir,
            child,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&sushy.authority).is_ok() {
                return sushy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sushy-emulator did not start: {}",
            std::fs::read_to_string(sushy.dir.path().join("sushy.log")).unwrap_or_default()
        );
    }

    fn target(&self, tls: TlsPolicy) -> RedfishTarget {
        RedfishTarget {
            authority: self.authority.clone(),
            user: "admin".into(),
            password: "password".into(),
            tls,
            timeout: Duration::from_secs(10),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn ca(&self) -> TlsPolicy {
        TlsPolicy::Ca(self.dir.path().join("ca.pem"))
    }

    /// The sha256 of the BMC certificate's DER, as an operator would pin it.
    fn pin(&self) -> TlsPolicy {
        use sha2::Digest;
        let out = Command::new("openssl")
            .args(["x509", "-in"])
            .arg(self.dir.path().join("bmc.pem"))
            .args(["-outform", "DER"])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty());
        TlsPolicy::Pinned(hex::encode(sha2::Sha256::digest(&out.stdout)))
    }
}

impl Drop for Sushy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_logged_in_client_reads_the_bmc_and_logs_out() {
    let bmc = Sushy::start();
    let rt = runtime();
    rt.block_on(async {
        let c = RedfishClient::login(&bmc.target(bmc.ca())).await.unwrap();
        let a = c
            .send("GET", "/redfish/v1/Systems", None, None)
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert!(
            a.body["Members"][0]["@odata.id"].is_string(),
            "{:?}",
            a.body
        );
        c.logout().await.unwrap();
    });
}

#[test]
fn certificates_credentials_and_absence_are_told_apart() {
    let bmc = Sushy::start();
    let rt = runtime();
    rt.block_on(async {
        // Pinned: the right pin works, a wrong one is refused at the handshake.
        let c = RedfishClient::login(&bmc.target(bmc.pin())).await.unwrap();
        let a = c
            .send("GET", "/redfish/v1/Systems", None, None)
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        let wrong_pin = TlsPolicy::Pinned("00".repeat(32));
        let e = RedfishClient::login(&bmc.target(wrong_pin))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, RedfishError::Tls(..)), "{e}");
        // A CA that did not sign it.
        let other = tempfile::tempdir().unwrap();
        make_ca(other.path(), "other");
        let e = RedfishClient::login(&bmc.target(TlsPolicy::Ca(other.path().join("ca.pem"))))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, RedfishError::Tls(..)), "{e}");
        // Explicitly insecure: works (and is warned about in the log).
        RedfishClient::login(&bmc.target(TlsPolicy::InsecureAcceptAny))
            .await
            .unwrap();
        // Wrong password.
        let mut t = bmc.target(bmc.ca());
        t.password = "nope".into();
        let e = RedfishClient::login(&t).await.err().unwrap();
        assert!(matches!(e, RedfishError::Credentials(..)), "{e}");
        assert!(!e.to_string().contains("nope"));
        // Nothing listens.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut t = bmc.target(bmc.ca());
        t.authority = format!("127.0.0.1:{port}");
        let e = RedfishClient::login(&t).await.err().unwrap();
        assert!(matches!(e, RedfishError::Connect(..)), "{e}");
    });
}
