//! OpenIPMI's `ipmi_sim` as a test peer: one simulated BMC on a free loopback port, with
//! a chassis-control script that records power and boot-device requests, and ipmitool as
//! a second opinion. Shared by the IPMI, power and Kubernetes tests.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use arges::bmc::ipmi::IpmiTarget;

use crate::process::{command_in, require};

pub const CHASSIS_SCRIPT: &str = r#"#!/bin/sh
# ipmi_sim chassis control: remembers and records what the client asked for.
d=$1; shift; mc=$1; op=$2; shift 2
if [ "$op" = get ]; then
  for p in "$@"; do
    case $p in
      power) echo "power:$(cat "$d/power" 2>/dev/null || echo 0)" ;;
      boot) echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)" ;;
    esac
  done
else
  while [ $# -gt 1 ]; do echo "$2" > "$d/$1"; echo "$1 $2" >> "$d/log"; shift 2; done
fi
"#;

/// IANA number of the simulator's default maker (OpenIPMI's test value).
pub const GENERIC: u32 = 0x1291;
/// Supermicro's IANA number.
pub const SUPERMICRO: u32 = 10876;

/// One simulated BMC on a free loopback port; killed on drop.
pub struct Bmc {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
    /// The network namespace the simulator runs in (`None`: the host's loopback).
    netns: Option<String>,
}

impl Bmc {
    /// Starts a simulator; a port taken between choosing and binding it is retried.
    pub fn start() -> Bmc {
        Self::start_as(GENERIC)
    }

    /// Starts a simulator whose Get Device ID names `manufacturer`.
    pub fn start_as(manufacturer: u32) -> Bmc {
        Self::start_with(manufacturer, CHASSIS_SCRIPT, None)
    }

    /// Starts a simulator inside `netns` whose chassis control is `script` (called as
    /// `script STATE_DIR MC set|get PARAM [VALUE]...`; see [`CHASSIS_SCRIPT`]).
    pub fn start_with(manufacturer: u32, script: &str, netns: Option<&str>) -> Bmc {
        for _ in 0..3 {
            if let Some(bmc) = Self::try_start(manufacturer, script, netns) {
                return bmc;
            }
        }
        panic!("ipmi_sim did not start in three tries (its log is printed above)");
    }

    /// The folder the chassis script keeps its state in.
    #[allow(dead_code)] // the netboot tests wire a VM to it
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn try_start(manufacturer: u32, chassis: &str, netns: Option<&str>) -> Option<Bmc> {
        require("ipmi_sim");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = d.join("chassis.sh");
        std::fs::write(&script, chassis).unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        std::fs::write(
            d.join("lan.conf"),
            format!(
                "name \"arges-test\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n    allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n    allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n    guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{} {} 0x20\"\n  user 2 true \"admin\" \"password\" admin 10 none md2 md5 straight\n",
                script.display(),
                d.join("state").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("bmc.emu"),
            format!("mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f {manufacturer:#x} 0xf02 persist_sdr\nmc_enable 0x20\n"),
        )
        .unwrap();
        let child = command_in(netns, "ipmi_sim")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("bmc.emu"))
            .arg("-s")
            .arg(d.join("simstate"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sim.log")).unwrap())
            .spawn()
            .expect("start ipmi_sim");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut bmc = Bmc {
            addr,
            dir,
            child,
            netns: netns.map(String::from),
        };
        // Ready once ipmitool gets an answer.
        for _ in 0..100 {
            if bmc.ipmitool(&["power", "status"]).is_some() {
                return Some(bmc);
            }
            if let Ok(Some(_)) = bmc.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "ipmi_sim did not start on {addr}: {}",
            std::fs::read_to_string(bmc.dir.path().join("sim.log")).unwrap_or_default()
        );
        None
    }

    pub fn target(&self) -> IpmiTarget {
        IpmiTarget::new(self.addr, "admin", "password")
    }

    /// ipmitool's view, as a second opinion.
    pub fn ipmitool(&self, args: &[&str]) -> Option<String> {
        require("ipmitool");
        let out = command_in(self.netns.as_deref(), "ipmitool")
            .args([
                "-I",
                "lanplus",
                "-C",
                "3",
                "-H",
                "127.0.0.1",
                "-U",
                "admin",
                "-P",
                "password",
            ])
            .args(["-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether ipmitool (a second opinion) sees the chassis powered on.
    pub fn ipmitool_says_on(&self) -> bool {
        let status = self
            .ipmitool(&["power", "status"])
            .expect("ipmitool power status");
        assert!(status.contains("Chassis Power is"), "ipmitool: {status}");
        status.contains("Chassis Power is on")
    }

    /// What the chassis script was asked to do, in order.
    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/log")).unwrap_or_default()
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
