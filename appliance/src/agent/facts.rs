//! Reads a machine's hardware facts from sysfs and procfs.
//!
//! Everything is read under a root folder (`/` on a real machine) so tests can point the
//! reader at a recorded tree. Missing files are not errors: firmware and kernels differ in
//! what they expose, and a partial record is better than no registration.

use std::path::{Path, PathBuf};

use crate::registration::{Cpu, Disk, Hardware, Nic, normalize_mac};

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Facts read from one root.
#[derive(Debug, Clone)]
pub struct FactReader {
    root: PathBuf,
}

/// Devices that are not disks a machine could install to.
const VIRTUAL_BLOCK_PREFIXES: [&str; 8] = ["loop", "ram", "zram", "dm-", "sr", "nbd", "md", "fd"];

impl FactReader {
    /// A reader under `root` (use `/` for the running machine).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FactReader { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// The SMBIOS system UUID.
    pub fn uuid(&self) -> String {
        read(self.path("sys/class/dmi/id/product_uuid"))
    }

    /// Everything but the BMC (see [`super::bmc`]).
    pub fn hardware(&self) -> Hardware {
        let dmi = |f: &str| read(self.path(&format!("sys/class/dmi/id/{f}")));
        Hardware {
            vendor: dmi("sys_vendor"),
            product: dmi("product_name"),
            serial: dmi("product_serial"),
            cpu: self.cpu(),
            memory_bytes: self.memory(),
            nics: self.nics(),
            disks: self.disks(),
            bmc: None,
        }
    }

    fn cpu(&self) -> Cpu {
        let info = read(self.path("proc/cpuinfo"));
        let count = info.lines().filter(|l| l.starts_with("processor")).count() as u32;
        let model = info
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Cpu { count, model }
    }

    fn memory(&self) -> u64 {
        read(self.path("proc/meminfo"))
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn entries(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn nics(&self) -> Vec<Nic> {
        let mut nics = Vec::new();
        for name in self.entries("sys/class/net") {
            if name == "lo" {
                continue;
            }
            let Some(mac) =
                normalize_mac(&read(self.path(&format!("sys/class/net/{name}/address"))))
            else {
                continue;
            };
            if mac == "00:00:00:00:00:00" {
                continue;
            }
            let physical = self.path(&format!("sys/class/net/{name}/device")).exists();
            nics.push((
                physical,
                Nic {
                    name,
                    mac,
                    addresses: Vec::new(),
                },
            ));
        }
        // Bridges, bonds' slaves aside, ifb and veth have no backing device; drop them
        // unless nothing has one (containers, some virtual NICs).
        let any_physical = nics.iter().any(|(p, _)| *p);
        nics.into_iter()
            .filter(|(p, _)| *p || !any_physical)
            .map(|(_, n)| n)
            .collect()
    }

    fn disks(&self) -> Vec<Disk> {
        let mut disks = Vec::new();
        for name in self.entries("sys/block") {
            if VIRTUAL_BLOCK_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let attr = |f: &str| read(self.path(&format!("sys/block/{name}/{f}")));
            let sectors: u64 = attr("size").parse().unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            let serial = [attr("device/serial"), attr("serial"), attr("device/wwid")]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or_default();
            disks.push(Disk {
                size_bytes: sectors * 512,
                model: attr("device/model"),
                serial,
                rotational: attr("queue/rotational") == "1",
                name,
            });
        }
        disks
    }
}

/// Fills in each NIC's addresses from the running kernel (only meaningful with root `/`).
pub fn add_live_addresses(hw: &mut Hardware) {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return;
    };
    for a in addrs {
        let Some(nic) = hw.nics.iter_mut().find(|n| n.name == a.interface_name) else {
            continue;
        };
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let cidr = if let (Some(v4), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            Some(format!("{}/{}", v4.ip(), m.ip().to_bits().count_ones()))
        } else if let (Some(v6), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            Some(format!("{}/{}", v6.ip(), m.ip().to_bits().count_ones()))
        } else {
            None
        };
        if let Some(c) = cidr {
            nic.addresses.push(c);
        }
    }
}

/// Values of `arges.*` parameters on a kernel command line.
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_recorded_tree() {
        let dir = tempfile::tempdir().unwrap();
        let w = |rel: &str, body: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        w(
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0042-3510-8051-B4C04F595031\n",
        );
        w("sys/class/dmi/id/sys_vendor", "Dell Inc.\n");
        w(
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Xeon\n\nprocessor\t: 1\nmodel name\t: Xeon\n",
        );
        w("proc/meminfo", "MemTotal:       2048 kB\n");
        w("sys/class/net/lo/address", "00:00:00:00:00:00\n");
        w("sys/class/net/eth0/address", "52:54:00:AA:BB:CC\n");
        w("sys/block/vda/size", "2097152\n");
        w("sys/block/vda/serial", "disk-1\n");
        w("sys/block/vda/queue/rotational", "0\n");
        w("sys/block/loop0/size", "100\n");
        let r = FactReader::new(dir.path());
        assert_eq!(r.uuid(), "4C4C4544-0042-3510-8051-B4C04F595031");
        let hw = r.hardware();
        assert_eq!(hw.vendor, "Dell Inc.");
        assert_eq!((hw.cpu.count, hw.cpu.model.as_str()), (2, "Xeon"));
        assert_eq!(hw.memory_bytes, 2048 * 1024);
        assert_eq!(hw.nics.len(), 1);
        assert_eq!(hw.nics[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(hw.disks.len(), 1);
        assert_eq!(
            (hw.disks[0].size_bytes, hw.disks[0].serial.as_str()),
            (1 << 30, "disk-1")
        );
    }

    #[test]
    fn cmdline() {
        let c = "console=ttyS0 arges.appliance=http://10.0.0.1:8080 arges.token=abc arges.mode=discover";
        assert_eq!(cmdline_param(c, "arges.token").as_deref(), Some("abc"));
        assert_eq!(
            cmdline_param(c, "arges.appliance").as_deref(),
            Some("http://10.0.0.1:8080")
        );
        assert_eq!(cmdline_param(c, "arges.missing"), None);
    }
}
