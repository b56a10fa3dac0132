//! Typed fixtures: what a machine's agent registers, built up by its methods and sent
//! as the appliance's own wire type, instead of tuples and hand-written JSON.

use arges::registration::{Cpu, Disk, Hardware, Nic, RegistrationMode, RegistrationRequest};

/// A registration, as the discovery agent of one machine sends it.
#[derive(Debug, Clone)]
pub struct Registration(pub RegistrationRequest);

impl Registration {
    /// Machine number `i`: a QEMU machine with one NIC (`52:54:00:xx:xx:xx` from `i`)
    /// and one 16 GiB disk, UUID `00000000-0000-4000-8000-<i>`.
    pub fn numbered(i: u32) -> Registration {
        Registration(RegistrationRequest {
            uuid: format!("00000000-0000-4000-8000-{i:012x}"),
            hardware: Hardware {
                vendor: "QEMU".into(),
                nics: vec![Nic {
                    name: "eth0".into(),
                    mac: format!(
                        "52:54:00:{:02x}:{:02x}:{:02x}",
                        i >> 16 & 0xff,
                        i >> 8 & 0xff,
                        i & 0xff
                    ),
                    ..Default::default()
                }],
                disks: vec![Disk {
                    name: "vda".into(),
                    size_bytes: 1 << 34,
                    ..Default::default()
                }],
                ..Default::default()
            },
            mode: RegistrationMode::Discover,
        })
    }

    /// A recorded Dell server: `uuid`, one NIC `mac`, two disks, two CPUs.
    pub fn server(uuid: &str, mac: &str) -> Registration {
        Registration(RegistrationRequest {
            uuid: uuid.into(),
            hardware: Hardware {
                vendor: "Dell Inc.".into(),
                product: "PowerEdge R640".into(),
                serial: "SVC-a".into(),
                cpu: Cpu {
                    count: 2,
                    model: "Intel(R) Xeon(R) Gold 6130".into(),
                },
                memory_bytes: 67_108_864_000,
                nics: vec![Nic {
                    name: "eth0".into(),
                    mac: mac.into(),
                    ..Default::default()
                }],
                disks: vec![
                    Disk {
                        name: "nvme0n1".into(),
                        size_bytes: 1_920_383_410_176,
                        serial: "nvme-a".into(),
                        ..Default::default()
                    },
                    Disk {
                        name: "sda".into(),
                        size_bytes: 960_197_124_096,
                        model: "PERC H740P".into(),
                        serial: "sda-a".into(),
                        rotational: true,
                    },
                ],
                bmc: None,
            },
            mode: RegistrationMode::Discover,
        })
    }

    /// The same machine, reporting the end of a wipe.
    pub fn wipe(mut self) -> Registration {
        self.0.mode = RegistrationMode::Wipe;
        self
    }

    /// The same machine with one more NIC.
    pub fn with_nic(mut self, name: &str, mac: &str) -> Registration {
        self.0.hardware.nics.push(Nic {
            name: name.into(),
            mac: mac.into(),
            ..Default::default()
        });
        self
    }

    /// The same machine with whatever `edit` changes.
    pub fn edit(mut self, edit: impl FnOnce(&mut RegistrationRequest)) -> Registration {
        edit(&mut self.0);
        self
    }

    pub fn uuid(&self) -> &str {
        &self.0.uuid
    }

    /// The first NIC's MAC.
    pub fn mac(&self) -> &str {
        self.0.hardware.nics.first().map_or("", |n| n.mac.as_str())
    }

    /// The JSON the agent posts.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("a registration serialises")
    }
}
