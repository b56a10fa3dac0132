//! A boot lab in network namespaces: a LAN with the appliance on it, a site DHCP server
//! (dnsmasq, addresses only) on a second host, and QEMU machines with real firmware.
//!
//! ```text
//!   netns <lab>-site            netns <lab>-lan
//!   dnsmasq on eth0 ──veth──── br0 10.77.0.2  arges (proxyDHCP, TFTP :69, HTTP :8080)
//!   10.77.0.1, fd77::1           └── tap0 ── QEMU (SeaBIOS+iPXE ROM, or OVMF)
//! ```
//!
//! Every address lives inside these namespaces; nothing reaches the host's networks.
//! Dropping the lab kills every process it started and deletes the namespaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use test_support::{bin, command_in, log_tail, repo, require};

pub const REG_TOKEN: &str = "registration-token-netboot-0001";
pub const ADMIN_TOKEN: &str = "admin-token-netboot-000000000001";
pub const APPLIANCE_IP: &str = "10.77.0.2";
const SITE_IP: &str = "10.77.0.1";

/// How long one machine may take to do what a test waits for (TCG is slow, CI slower);
/// `ARGES_BOOT_DEADLINE_SECS` changes it.
fn boot_deadline() -> Duration {
    Duration::from_secs(boot_deadline_secs())
}

/// [`boot_deadline`] in seconds.
pub fn boot_deadline_secs() -> u64 {
    std::env::var("ARGES_BOOT_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    command_in(Some(ns), program)
}

/// Checks everything the lab needs, failing with the reason (never skipping).
pub fn require_peers() {
    for program in ["ip", "qemu-system-x86_64", "dnsmasq", "curl"] {
        require(program);
    }
    for file in [
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        "/usr/lib/ipxe/ipxe.efi",
        "/usr/lib/ipxe/undionly.kpxe",
        "/dev/net/tun",
    ] {
        assert!(
            Path::new(file).exists(),
            "the netboot tests need {file} (packages ovmf, ipxe; /dev/net/tun for QEMU's tap)"
        );
    }
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "the netboot tests create network namespaces and bind ports 67 and 69: run them as root"
    );
}

/// The discovery kernel and initramfs: `ARGES_DISCOVERY_DIR` when the test command built
/// them already, else built once here by `deploy/build-initramfs.sh`.
pub fn discovery_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("ARGES_DISCOVERY_DIR") {
            return PathBuf::from(d);
        }
        let out =
            std::env::temp_dir().join(format!("arges-netboot-discovery-{}", std::process::id()));
        run(Command::new("bash")
            .arg(repo().join("deploy/build-initramfs.sh"))
            .arg("--out")
            .arg(&out)
            .stderr(Stdio::inherit()));
        out
    })
}

/// One lab: namespaces, the site's dnsmasq and the appliance.
pub struct Lab {
    pub name: String,
    pub dir: tempfile::TempDir,
    appliance: Option<Child>,
    dnsmasq: Option<Child>,
    machines: Vec<Child>,
}

impl Lab {
    /// The namespace of the LAN (the appliance, the bridge, the machines).
    pub fn lan(&self) -> String {
        format!("{}-lan", self.name)
    }
    fn site(&self) -> String {
        format!("{}-site", self.name)
    }

    /// Builds the namespaces and starts dnsmasq and the appliance with `extra` config.
    pub fn start(tag: &str, extra_config: &str) -> Lab {
        let mut lab = Self::prepare(tag);
        lab.start_appliance(extra_config);
        lab
    }

    /// Builds the namespaces and starts dnsmasq; the appliance is not started yet.
    pub fn prepare(tag: &str) -> Lab {
        require_peers();
        let name = format!("arges{}{tag}", std::process::id() % 100_000);
        let lab = Lab {
            name,
            dir: tempfile::tempdir().expect("temp dir"),
            appliance: None,
            dnsmasq: None,
            machines: Vec::new(),
        };
        // A leftover from a killed run with the same name goes first.
        for ns in [lab.lan(), lab.site()] {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
        let (lan, site) = (lab.lan(), lab.site());
        ip(&["netns", "add", &lan]);
        ip(&["netns", "add", &site]);
        let nsip = |ns: &str, args: &[&str]| run(in_ns(ns, "ip").args(args));
        nsip(&lan, &["link", "set", "lo", "up"]);
        nsip(&site, &["link", "set", "lo", "up"]);
        nsip(&lan, &["link", "add", "br0", "type", "bridge"]);
        nsip(
            &lan,
            &[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        );
        nsip(
            &lan,
            &["addr", "add", &format!("{APPLIANCE_IP}/24"), "dev", "br0"],
        );
        nsip(
            &lan,
            &[
                "link", "add", "vsite", "type", "veth", "peer", "name", "eth0", "netns", &site,
            ],
        );
        nsip(&lan, &["link", "set", "vsite", "master", "br0", "up"]);
        nsip(&lan, &["tuntap", "add", "dev", "tap0", "mode", "tap"]);
        nsip(&lan, &["link", "set", "tap0", "master", "br0", "up"]);
        nsip(&lan, &["link", "set", "br0", "up"]);
        nsip(
            &site,
            &["addr", "add", &format!("{SITE_IP}/24"), "dev", "eth0"],
        );
        nsip(
            &site,
            &["addr", "add", "fd77::1/64", "dev", "eth0", "nodad"],
        );
        nsip(&site, &["link", "set", "eth0", "up"]);
        let mut lab = lab;
        lab.start_dnsmasq();
        lab
    }

    fn start_dnsmasq(&mut self) {
        let d = self.dir.path();
        // The site's ordinary DHCP server: addresses only, no boot options. The router
        // advertisement saves iPXE its ~15 s wait for IPv6.
        let child = in_ns(&self.site(), "dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=eth0",
                "--bind-interfaces",
                "--user=root",
                "--dhcp-authoritative",
                "--dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h",
                "--dhcp-range=fd77::,ra-only,64",
                "--enable-ra",
                "--log-dhcp",
            ])
            .arg(format!("--dhcp-leasefile={}", d.join("leases").display()))
            .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("dnsmasq.log")).expect("log file"))
            .spawn()
            .expect("start dnsmasq");
        self.dnsmasq = Some(child);
    }

    /// Starts the appliance in the LAN with the lab's config plus `extra`.
    pub fn start_appliance(&mut self, extra: &str) {
        let discovery = discovery_dir();
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("tftp")).expect("tftp root");
        let kernel = discovery.join("vmlinuz");
        let initrd = discovery.join("initramfs.img");
        let config = format!(
            r#"data_dir = "{data}"
[http]
listen = ["0.0.0.0:8080"]
tls_listen = ["0.0.0.0:8443"]
[tftp]
listen = ["0.0.0.0:69"]
root = "{tftp}"
[tokens]
registration = "{REG_TOKEN}"
admin = "{ADMIN_TOKEN}"
[dhcp]
mode = "proxy"
interfaces = ["br0"]
[environments.discovery]
kernel = "{kernel}"
initrds = ["{initrd}"]
cmdline = "console=ttyS0,115200 arges.appliance={{{{ appliance.agent_url }}}} arges.pin={{{{ appliance.pin }}}} arges.token={{{{ registration_token }}}} arges.mode={{{{ action }}}}"
[environments.install]
kernel = "{kernel}"
initrds = ["{initrd}"]
cmdline = "console=ttyS0,115200 arges.mode=install arges.marker=install-{{{{ server.id }}}}"
{extra}
"#,
            data = d.join("data").display(),
            tftp = d.join("tftp").display(),
            kernel = kernel.display(),
            initrd = initrd.display(),
        );
        std::fs::write(d.join("appliance.toml"), config).expect("config");
        let ready = d.join("ready.json");
        let mut child = in_ns(&self.lan(), bin())
            .args(["run", "--config"])
            .arg(d.join("appliance.toml"))
            .arg("--ready-file")
            .arg(&ready)
            .env("ARGES_LOG", "info,arges=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("appliance.log")).expect("log file"))
            .spawn()
            .expect("start the appliance");
        test_support::process::wait_started(
            &mut child,
            "the appliance",
            30,
            || ready.exists(),
            || self.log("appliance.log"),
        );
        self.appliance = Some(child);
    }

    /// A log file of the lab, for failure messages (the last 6000 characters).
    pub fn log(&self, name: &str) -> String {
        log_tail(&self.dir.path().join(name), 6000)
    }

    /// Everything a failure message needs.
    pub fn logs(&self, serial: &str) -> String {
        format!(
            "{}\n{}\n{}",
            self.log(serial),
            self.log("appliance.log"),
            self.log("dnsmasq.log")
        )
    }

    /// `curl` inside the LAN namespace against the appliance's loopback-reachable HTTP.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let mut c = in_ns(&self.lan(), "curl");
        c.args(["-sS", "--fail-with-body", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
            .arg(format!("http://127.0.0.1:8080{path}"));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        run(&mut c)
    }

    /// Registers a machine as its agent would.
    pub fn register(&self, body: &str) -> String {
        run(in_ns(&self.lan(), "curl")
            .args(["-sS", "--fail-with-body", "-X", "POST"])
            .arg("-H")
            .arg(format!("Authorization: Bearer {REG_TOKEN}"))
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg("http://127.0.0.1:8080/api/v1/register"))
    }

    /// The inventory's servers.
    pub fn servers(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&self.api("GET", "/api/v1/servers", None)).expect("JSON");
        match v {
            serde_json::Value::Array(a) => a,
            other => other["servers"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// The appliance's `/metrics`.
    pub fn metrics(&self) -> String {
        self.api("GET", "/metrics", None)
    }

    /// Powers on a machine; returns its index for [`Lab::wait_exit`].
    pub fn boot(&mut self, m: &Machine) -> usize {
        let d = self.dir.path();
        let _ = std::fs::remove_file(d.join(&m.serial_log));
        let args = self.qemu_args(m);
        let child = in_ns(&self.lan(), "qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(d.join(format!("{}.qemu.log", m.serial_log))).expect("log"),
            )
            .spawn()
            .expect("start QEMU");
        self.machines.push(child);
        self.machines.len() - 1
    }

    /// QEMU's arguments for `m` (its serial console appends to the machine's log).
    pub fn qemu_args(&self, m: &Machine) -> Vec<String> {
        let d = self.dir.path();
        let serial = d.join(&m.serial_log);
        let mut args: Vec<String> = vec![
            "-machine".into(),
            "q35,accel=tcg".into(),
            "-m".into(),
            "512".into(),
            "-smp".into(),
            "1".into(),
            "-uuid".into(),
            m.uuid.clone(),
            "-display".into(),
            "none".into(),
            "-vga".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            // Appended to, so a machine powered on again by its BMC keeps one log.
            "-chardev".into(),
            format!("file,id=console,path={},append=on", serial.display()),
            "-serial".into(),
            "chardev:console".into(),
            "-no-reboot".into(),
            "-netdev".into(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
            "-drive".into(),
            format!("if=none,id=d0,format=raw,file={}", m.disk.display()),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive=d0,serial={},bootindex=2",
                m.disk_serial
            ),
        ];
        let nic = format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", m.mac);
        match m.firmware {
            Firmware::Bios => {
                let sercon = d.join("sercon");
                std::fs::write(&sercon, [0xf8u8, 0x03]).expect("sercon");
                args.extend([
                    "-device".into(),
                    nic,
                    "-fw_cfg".into(),
                    format!("name=etc/sercon-port,file={}", sercon.display()),
                ]);
            }
            Firmware::Uefi | Firmware::UefiHttp => {
                let vars = d.join(format!("{}.vars.fd", m.serial_log));
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF vars");
                // No iPXE option ROM: the firmware's own PXE or HTTP boot client runs and
                // loads ipxe.efi from the appliance.
                args.extend([
                    "-drive".into(),
                    "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
                        .into(),
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                    "-device".into(),
                    format!("{nic},romfile="),
                ]);
                if m.firmware == Firmware::UefiHttp {
                    args.extend([
                        "-fw_cfg".into(),
                        "name=opt/org.tianocore/IPv4PXESupport,string=n".into(),
                        "-fw_cfg".into(),
                        "name=opt/org.tianocore/IPv6PXESupport,string=n".into(),
                    ]);
                }
            }
        }
        args
    }

    /// Waits until machine `i` powers off (QEMU exits), or the deadline.
    pub fn wait_exit(&mut self, i: usize, m: &Machine) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(status) = self.machines[i].try_wait().expect("QEMU status") {
                assert!(
                    status.success(),
                    "QEMU failed ({status}):\n{}\n{}",
                    self.log(&format!("{}.qemu.log", m.serial_log)),
                    self.logs(&m.serial_log)
                );
                return start.elapsed();
            }
            assert!(
                start.elapsed() < boot_deadline(),
                "machine {} did not power off within {:?}:\n{}",
                m.uuid,
                boot_deadline(),
                self.logs(&m.serial_log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the machine's serial log shows `needle`.
    pub fn wait_serial(&mut self, m: &Machine, needle: &str) -> Duration {
        let start = Instant::now();
        loop {
            let text = std::fs::read(self.dir.path().join(&m.serial_log)).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains(needle) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < boot_deadline(),
                "machine {} never printed {needle:?}:\n{}",
                m.uuid,
                self.logs(&m.serial_log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The machine's serial output so far.
    pub fn serial(&self, m: &Machine) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join(&m.serial_log)).unwrap_or_default(),
        )
        .into_owned()
    }

    /// Stops machine `i` (one that halts rather than powering off).
    pub fn kill(&mut self, i: usize) {
        let _ = self.machines[i].kill();
        let _ = self.machines[i].wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self
            .machines
            .iter_mut()
            .chain(self.appliance.iter_mut())
            .chain(self.dnsmasq.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [self.lan(), self.site()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if std::env::var_os("ARGES_KEEP_LAB").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("lab folder kept: {}", dir.keep().display());
        }
    }
}

/// Which firmware a machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the iPXE option ROM (ipxe-qemu).
    Bios,
    /// OVMF's own PXE client, which loads ipxe.efi over TFTP.
    Uefi,
    /// OVMF with PXE disabled: UEFI HTTP boot loads ipxe.efi over HTTP.
    UefiHttp,
}

/// A virtual machine's identity and disk.
pub struct Machine {
    pub firmware: Firmware,
    pub uuid: String,
    pub mac: String,
    pub disk: PathBuf,
    pub disk_serial: String,
    pub serial_log: String,
}

impl Machine {
    /// A machine with a blank 64 MiB disk; `n` keeps identities apart.
    pub fn new(lab: &Lab, firmware: Firmware, n: u8) -> Machine {
        let disk = lab.dir.path().join(format!("disk{n}.img"));
        let f = std::fs::File::create(&disk).expect("disk");
        f.set_len(64 << 20).expect("disk size");
        Machine {
            firmware,
            uuid: format!("8c5e3f00-77aa-4b1e-9a00-0000000000{n:02x}"),
            mac: format!("52:54:00:77:00:{n:02x}"),
            disk,
            disk_serial: format!("ARGESDISK{n}"),
            serial_log: format!("serial{n}.log"),
        }
    }

    /// Makes the disk bootable: its boot sector prints `marker` on COM1 and halts.
    pub fn with_boot_sector(self, marker: &str) -> Machine {
        use std::io::{Seek, SeekFrom, Write};
        // 16-bit real mode at 0x7c00: ds=0; si=msg; for each byte: out 0x3f8; then hlt.
        let mut code: Vec<u8> = vec![
            0x31, 0xC0, // xor ax, ax
            0x8E, 0xD8, // mov ds, ax
            0xBE, 0x18, 0x7C, // mov si, 0x7c18
            0xBA, 0xF8, 0x03, // mov dx, 0x3f8
            0xAC, // next: lodsb
            0x84, 0xC0, // test al, al
            0x74, 0x03, // jz done
            0xEE, // out dx, al
            0xEB, 0xF8, // jmp next
            0xFA, // done: cli
            0xF4, // hlt
            0xEB, 0xFC, // jmp done
            0x90, 0x90, // pad to 0x18
        ];
        assert_eq!(code.len(), 0x18);
        code.extend_from_slice(marker.as_bytes());
        code.extend_from_slice(b"\r\n\0");
        code.resize(510, 0);
        code.extend_from_slice(&[0x55, 0xAA]);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .expect("disk");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(&code).expect("boot sector");
        self
    }
}
