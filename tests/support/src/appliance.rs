//! A running appliance for tests: the real `arges` binary on port 0 in a temp folder, plus
//! helpers to talk to it with real clients (curl, or a plain socket).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REG_TOKEN: &str = "registration-token-for-tests-0001";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-000000000001";

use crate::fixtures::Registration;
use crate::process::{bin, repo, require, run};

/// The appliance's config for tests, with `extra` TOML appended.
pub fn config(extra: &str) -> String {
    config_with(NO_RATE_LIMITS, extra)
}

/// Top-level keys of the test config: tests that are not about the per-source limits
/// hammer the appliance from one address, so those limits are off (rates) or wide
/// (connections).
pub const NO_RATE_LIMITS: &str = "http.boot_per_source_per_sec = 0\nhttp.registrations_per_source_per_sec = 0\nhttp.max_connections_per_source = 1024\n";

/// The test config with `top` (top-level keys, which TOML wants before any table) in
/// place of [`NO_RATE_LIMITS`], and `extra` tables appended.
pub fn config_with(top: &str, extra: &str) -> String {
    format!(
        "{top}\n[tokens]\nregistration = \"{REG_TOKEN}\"\nadmin = \"{ADMIN_TOKEN}\"\n\n\
         [environments.discovery]\nkernel = \"discovery/vmlinuz\"\ninitrds = [\"discovery/initramfs.img\"]\n\
         cmdline = \"console=ttyS0 arges.appliance={{{{ appliance.url }}}} arges.token={{{{ registration_token }}}} arges.mode={{{{ action }}}}\"\n\n\
         [environments.talos]\nkernel = \"talos/vmlinuz\"\ninitrds = [\"talos/initramfs.xz\"]\n\
         cmdline = \"talos.platform=metal talos.config={{{{ appliance.url }}}}/configdata?uuid={{{{ machine.uuid }}}}&token={{{{ boot_token }}}}\"\n\n{extra}"
    )
}

pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub tftp: SocketAddr,
    /// The first proxyDHCP socket, when DHCP is on.
    pub dhcp: Option<SocketAddr>,
    /// The first HTTPS listener for machines, when there is one.
    pub https: Option<SocketAddr>,
    /// The admin API's first own listener, when it has one.
    pub admin: Option<SocketAddr>,
    child: Option<Child>,
    args: Vec<String>,
}

impl Appliance {
    /// Starts with the test config plus `extra`.
    pub fn start(extra: &str) -> Appliance {
        Self::start_in(Self::prepare(extra), &[])
    }

    /// A folder with the test config plus `extra` and the environments' assets, not started.
    pub fn prepare(extra: &str) -> tempfile::TempDir {
        Self::prepare_with(NO_RATE_LIMITS, extra)
    }

    /// Like [`Appliance::prepare`], with `top` as the config's top-level keys (see
    /// [`config_with`]).
    pub fn prepare_with(top: &str, extra: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("appliance.toml"), config_with(top, extra))
            .expect("write config");
        for (p, body) in [
            ("assets/discovery/vmlinuz", "discovery kernel"),
            ("assets/discovery/initramfs.img", "discovery initrd"),
            ("assets/talos/vmlinuz", "talos kernel"),
            ("assets/talos/initramfs.xz", "talos initrd"),
        ] {
            let p = dir.path().join("data").join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        dir
    }

    /// Starts in an existing folder holding `appliance.toml` (restarts use this).
    pub fn start_in(dir: tempfile::TempDir, extra_args: &[&str]) -> Appliance {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--config".into(),
            dir.path().join("appliance.toml").display().to_string(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ];
        if !extra_args.contains(&"--tftp") {
            args.extend(["--tftp".into(), "127.0.0.1:0".into()]);
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut a = Appliance {
            dir,
            http: "0.0.0.0:0".parse().unwrap(),
            tftp: "0.0.0.0:0".parse().unwrap(),
            dhcp: None,
            https: None,
            admin: None,
            child: None,
            args,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("arges.log"))
            .unwrap();
        let mut args = self.args.clone();
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        let child = Command::new(bin())
            .args(&args)
            .env("ARGES_LOG", "info,arges=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn arges");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready file");
                self.http = v["http"][0].as_str().unwrap().parse().unwrap();
                self.tftp = v["tftp"][0].as_str().unwrap().parse().unwrap();
                self.dhcp = v["dhcp"][0].as_str().map(|a| a.parse().unwrap());
                self.https = v["https"][0].as_str().map(|a| a.parse().unwrap());
                self.admin = v["admin"][0].as_str().map(|a| a.parse().unwrap());
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("arges exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "arges did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        String::from_utf8_lossy(&self.request("GET", "/metrics", None, b"").1).into_owned()
    }

    /// Waits (at most 60 s) until `/metrics` has a line starting with `line`.
    pub fn wait_metric(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.metrics();
            if m.lines().any(|l| l.starts_with(line)) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "metric {line:?} never appeared:\n{m}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("arges.log")).unwrap_or_default()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn tftp_root(&self) -> PathBuf {
        self.data().join("tftp")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as systemd and the kubelet stop a service; the exit status, once it
    /// exits (waited for at most 60 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("arges did not exit after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops with SIGTERM (asserting a clean exit) and starts again on the same folder
    /// and ports.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "{status}:\n{}", self.log());
        self.spawn();
    }

    /// Kills and starts again on the same folder and ports.
    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `/boot.ipxe` for `uuid` and `mac`, asked as iPXE asks (arch x86_64) with curl from
    /// loopback address `from` (a second "machine" is another address): status, script.
    pub fn boot_script(&self, uuid: &str, mac: &str, from: &str) -> (u16, String) {
        let url = self.url(&format!("/boot.ipxe?uuid={uuid}&mac={mac}&arch=x86_64"));
        let (status, body, _) = curl(&["--interface", from, &url]);
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The real discovery agent registers the recorded machine `tree` (under
    /// `tests/data/machines/`) with `token`, as `uuid` when given.
    pub fn agent(&self, tree: &str, token: &str, uuid: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new(bin());
        cmd.args(["agent", "--appliance", &self.url(""), "--token", token])
            .args(["--timeout", "20", "--root"])
            .arg(repo().join("tests/data/machines").join(tree));
        if let Some(uuid) = uuid {
            cmd.args(["--uuid", uuid]);
        }
        run(&mut cmd)
    }

    /// `arges loadtest` aimed at this appliance with the shared registration token; the
    /// caller adds the storm's size and bounds.
    pub fn loadtest(&self) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(["loadtest", "--http", &self.http.to_string()])
            .args(["--tftp", &self.tftp.to_string(), "--token", REG_TOKEN]);
        cmd
    }

    /// Registers `machine` over the API with the shared token; its UUID.
    pub fn register(&self, machine: &Registration) -> String {
        let (code, resp) =
            self.request("POST", "/api/v1/register", Some(REG_TOKEN), &machine.body());
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&resp));
        machine.uuid().to_string()
    }

    /// One HTTP request over a plain socket (for hammering without a process per call).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        raw_http(self.http, method, path, token, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    /// Server `id` as the admin API shows it.
    pub fn server_json(&self, id: &str) -> serde_json::Value {
        let (code, body) = self.request(
            "GET",
            &format!("/api/v1/servers/{id}"),
            Some(ADMIN_TOKEN),
            b"",
        );
        assert_eq!(
            code,
            200,
            "GET server {id}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("a server as JSON")
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// curl with `args`; returns (HTTP status, body, headers in lower case).
pub fn curl(args: &[&str]) -> (u16, Vec<u8>, String) {
    require("curl");
    let dir = tempfile::tempdir().expect("temp dir");
    let (body, head) = (dir.path().join("body"), dir.path().join("head"));
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "120", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}"])
        .args(args));
    let status = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        status,
        std::fs::read(&body).unwrap_or_default(),
        std::fs::read_to_string(&head)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}

/// A minimal HTTP/1.1 client: one request per connection.
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
    out
}

/// Writes `len` bytes of deterministic pseudo-random data.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// A small multi-threaded runtime for tests that call the library's async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The value of `key=` on a script's kernel command line (empty when it is empty).
pub fn param(script: &str, key: &str) -> String {
    let at = format!("{key}=");
    script
        .split_whitespace()
        .flat_map(|w| w.split('&'))
        .find_map(|w| w.strip_prefix(at.as_str()))
        .unwrap_or_default()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}
