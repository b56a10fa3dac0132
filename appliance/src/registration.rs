//! Registration wire types: what the discovery agent sends and what the appliance answers,
//! and the rules a registration must meet before it reaches the inventory.
//!
//! The only types the agent and the HTTP edge share. [`RegistrationRequest::validate`]
//! normalises what the agent reported (UUID and MACs in one spelling) and refuses
//! garbage with the field it found it in, so what the inventory stores (and mirrors to
//! Kubernetes) always fits the Server schema.

use serde::{Deserialize, Serialize};

/// Hardware facts read by the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hardware {
    pub vendor: String,
    pub product: String,
    pub serial: String,
    pub cpu: Cpu,
    pub memory_bytes: u64,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    /// The local BMC's LAN address, when the machine has one and it could be read.
    pub bmc: Option<BmcAddress>,
}

/// Processors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cpu {
    /// Logical processors.
    pub count: u32,
    pub model: String,
}

/// A network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    /// Addresses the interface held while the agent ran (CIDR notation).
    pub addresses: Vec<String>,
}

/// A block device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub serial: String,
    pub rotational: bool,
}

/// A BMC's LAN address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BmcAddress {
    pub ip: String,
    pub mac: String,
}

/// Body of `POST /api/v1/register` (the token travels as a bearer token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistrationRequest {
    /// SMBIOS system UUID.
    pub uuid: String,
    pub hardware: Hardware,
    /// What the environment was booted for, from the command line.
    pub mode: RegistrationMode,
}

/// What the agent should do once registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NextAction {
    /// Power the machine off (the default after discovery).
    PowerOff,
    /// Reboot: the next boot decision already says something else.
    Reboot,
    /// Stay up and register again after a while.
    Wait,
}

/// Answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationResponse {
    /// The inventory id the machine was registered under.
    pub server_id: String,
    pub action: NextAction,
    /// Set when the machine's UUID is shared with another machine (firmware bug).
    #[serde(default)]
    pub uuid_conflict: bool,
}

/// Bounds on what one registration may report.
pub mod limits {
    /// NICs of one machine.
    pub const NICS: usize = 64;
    /// Addresses of one NIC.
    pub const ADDRESSES: usize = 32;
    /// Disks of one machine.
    pub const DISKS: usize = 256;
    /// Bytes of a name (interface, disk).
    pub const NAME: usize = 64;
    /// Bytes of a descriptive string (vendor, product, serial, model).
    pub const TEXT: usize = 256;
    /// Logical processors.
    pub const CPUS: u32 = 1 << 16;
}

/// A registration that breaks a rule: the field (`hardware.nics[2].mac`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A registration that met the rules, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRegistration {
    /// Lower case.
    pub uuid: String,
    /// MACs normalised, BMC address checked.
    pub hardware: Hardware,
    /// The machine's MACs, each once, in the order reported.
    pub macs: Vec<String>,
    pub mode: RegistrationMode,
}

/// What the environment that registered was booted for: `discover` (the default; also
/// an empty string, as older agents sent) or `wipe`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum RegistrationMode {
    #[default]
    Discover,
    Wipe,
}

impl RegistrationMode {
    pub fn name(self) -> &'static str {
        match self {
            RegistrationMode::Discover => "discover",
            RegistrationMode::Wipe => "wipe",
        }
    }
}

impl From<RegistrationMode> for &'static str {
    fn from(m: RegistrationMode) -> Self {
        m.name()
    }
}

impl std::str::FromStr for RegistrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "discover" => Ok(RegistrationMode::Discover),
            "wipe" => Ok(RegistrationMode::Wipe),
            other => Err(format!(
                "mode: {:?} is neither discover nor wipe",
                truncated(other)
            )),
        }
    }
}

impl TryFrom<String> for RegistrationMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(field_err(
            field,
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(field_err(field, "contains control characters"));
    }
    Ok(())
}

impl RegistrationRequest {
    /// Checks every field against the rules and normalises it.
    pub fn validate(&self) -> Result<ValidRegistration, FieldError> {
        let uuid = normalize_uuid(&self.uuid).ok_or_else(|| {
            field_err(
                "uuid",
                format!("{:?} is not an SMBIOS UUID", truncated(&self.uuid)),
            )
        })?;
        let mode = self.mode;
        let mut h = self.hardware.clone();
        text("hardware.vendor", &h.vendor, limits::TEXT)?;
        text("hardware.product", &h.product, limits::TEXT)?;
        text("hardware.serial", &h.serial, limits::TEXT)?;
        text("hardware.cpu.model", &h.cpu.model, limits::TEXT)?;
        if h.cpu.count > limits::CPUS {
            return Err(field_err(
                "hardware.cpu.count",
                format!("{} is more than {}", h.cpu.count, limits::CPUS),
            ));
        }
        if h.nics.is_empty() {
            return Err(field_err(
                "hardware.nics",
                "at least one NIC with its MAC is required: a machine is known by its UUID and MACs",
            ));
        }
        if h.nics.len() > limits::NICS {
            return Err(field_err(
                "hardware.nics",
                format!("{} NICs, at most {} allowed", h.nics.len(), limits::NICS),
            ));
        }
        let mut macs: Vec<String> = Vec::new();
        for (i, n) in h.nics.iter_mut().enumerate() {
            let at = |f: &str| format!("hardware.nics[{i}].{f}");
            text(&at("name"), &n.name, limits::NAME)?;
            n.mac = normalize_mac(&n.mac).ok_or_else(|| {
                field_err(
                    at("mac"),
                    format!("{:?} is not a MAC address", truncated(&n.mac)),
                )
            })?;
            if n.addresses.len() > limits::ADDRESSES {
                return Err(field_err(
                    at("addresses"),
                    format!(
                        "{} addresses, at most {} allowed",
                        n.addresses.len(),
                        limits::ADDRESSES
                    ),
                ));
            }
            for (j, a) in n.addresses.iter().enumerate() {
                if !is_cidr(a) {
                    return Err(field_err(
                        format!("hardware.nics[{i}].addresses[{j}]"),
                        format!(
                            "{:?} is not an address (a.b.c.d/len or ::/len)",
                            truncated(a)
                        ),
                    ));
                }
            }
            if !macs.contains(&n.mac) {
                macs.push(n.mac.clone());
            }
        }
        if h.disks.len() > limits::DISKS {
            return Err(field_err(
                "hardware.disks",
                format!("{} disks, at most {} allowed", h.disks.len(), limits::DISKS),
            ));
        }
        for (i, d) in h.disks.iter().enumerate() {
            text(&format!("hardware.disks[{i}].name"), &d.name, limits::NAME)?;
            text(
                &format!("hardware.disks[{i}].model"),
                &d.model,
                limits::TEXT,
            )?;
            text(
                &format!("hardware.disks[{i}].serial"),
                &d.serial,
                limits::TEXT,
            )?;
        }
        if let Some(b) = &mut h.bmc {
            if !b.ip.is_empty() && b.ip.parse::<std::net::IpAddr>().is_err() {
                return Err(field_err(
                    "hardware.bmc.ip",
                    format!("{:?} is not an IP address", truncated(&b.ip)),
                ));
            }
            if !b.mac.is_empty() {
                b.mac = normalize_mac(&b.mac).ok_or_else(|| {
                    field_err(
                        "hardware.bmc.mac",
                        format!("{:?} is not a MAC address", truncated(&b.mac)),
                    )
                })?;
            }
            if b.ip.is_empty() && b.mac.is_empty() {
                h.bmc = None;
            }
        }
        Ok(ValidRegistration {
            uuid,
            hardware: h,
            macs,
            mode,
        })
    }
}

/// The start of a value for an error message (a garbage field may be long).
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `addr/len` (or a bare address), IPv4 or IPv6.
fn is_cidr(a: &str) -> bool {
    let (ip, len) = a.split_once('/').map_or((a, None), |(i, l)| (i, Some(l)));
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_none_or(|l| l.parse::<u8>().is_ok_and(|l| l <= max))
}

/// Normalises a MAC address to lower-case, colon-separated form; `None` if it is not one.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let hex: String = mac.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let seps_ok = mac
        .chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-' | '.'));
    if hex.len() != 12 || !seps_ok {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    Some(
        lower
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or("00"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Normalises an SMBIOS UUID to lower case; `None` if it is not a UUID.
pub fn normalize_uuid(uuid: &str) -> Option<String> {
    let u = uuid.trim().to_ascii_lowercase();
    let groups: Vec<&str> = u.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then_some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RegistrationRequest {
        RegistrationRequest {
            uuid: "4C4C4544-0042-3510-8051-B4C04F595031".into(),
            hardware: Hardware {
                vendor: "Dell Inc.".into(),
                nics: vec![Nic {
                    name: "eno1".into(),
                    mac: "B8-CA-3A-00-00-0A".into(),
                    addresses: vec!["10.0.0.7/24".into(), "fe80::1/64".into()],
                }],
                bmc: Some(BmcAddress {
                    ip: "10.0.1.7".into(),
                    mac: "B8CA.3A00.0001".into(),
                }),
                ..Default::default()
            },
            mode: RegistrationMode::Discover,
        }
    }

    #[test]
    fn a_registration_is_normalised() {
        let v = request().validate().unwrap();
        assert_eq!(v.uuid, "4c4c4544-0042-3510-8051-b4c04f595031");
        assert_eq!(v.macs, vec!["b8:ca:3a:00:00:0a"]);
        assert_eq!(v.hardware.nics[0].mac, "b8:ca:3a:00:00:0a");
        assert_eq!(v.hardware.bmc.unwrap().mac, "b8:ca:3a:00:00:01");
        assert_eq!(v.mode, RegistrationMode::Discover);
    }

    #[test]
    fn modes_read_and_write_by_name() {
        let mode = |json: &str| serde_json::from_str::<RegistrationMode>(json);
        assert_eq!(mode("\"wipe\"").unwrap(), RegistrationMode::Wipe);
        assert_eq!(mode("\"\"").unwrap(), RegistrationMode::Discover);
        let err = mode("\"install\"").unwrap_err().to_string();
        assert!(err.starts_with("mode: \"install\" is neither"), "{err}");
        assert_eq!(
            serde_json::to_string(&RegistrationMode::Wipe).unwrap(),
            "\"wipe\""
        );
        let missing: RegistrationRequest = serde_json::from_str(r#"{"uuid":"u"}"#).unwrap();
        assert_eq!(missing.mode, RegistrationMode::Discover);
    }

    #[test]
    fn garbage_is_refused_with_its_field() {
        let field = |f: fn(&mut RegistrationRequest)| {
            let mut r = request();
            f(&mut r);
            r.validate().unwrap_err().field
        };
        assert_eq!(field(|r| r.uuid = "x".into()), "uuid");
        assert_eq!(field(|r| r.hardware.nics.clear()), "hardware.nics");
        assert_eq!(
            field(|r| r.hardware.nics[0].mac = "zz:zz".into()),
            "hardware.nics[0].mac"
        );
        assert_eq!(
            field(|r| r.hardware.nics[0].addresses.push("10.0.0.1/33".into())),
            "hardware.nics[0].addresses[2]"
        );
        assert_eq!(
            field(|r| r.hardware.vendor = "v".repeat(300)),
            "hardware.vendor"
        );
        assert_eq!(
            field(|r| r.hardware.serial = "a\nb".into()),
            "hardware.serial"
        );
        assert_eq!(
            field(|r| r.hardware.disks = vec![Disk::default(); 300]),
            "hardware.disks"
        );
        assert_eq!(
            field(|r| r.hardware.bmc.as_mut().unwrap().ip = "10.0.1".into()),
            "hardware.bmc.ip"
        );
        let mut many = request();
        many.hardware.nics = (0..65)
            .map(|i| Nic {
                mac: format!("52:54:00:00:00:{i:02x}"),
                ..Default::default()
            })
            .collect();
        assert_eq!(many.validate().unwrap_err().field, "hardware.nics");
    }

    #[test]
    fn normalizes_identifiers() {
        assert_eq!(
            normalize_mac("52-54-00-AB-cd-01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(
            normalize_mac("5254.00ab.cd01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:0g"), None);
        assert_eq!(
            normalize_uuid(" 4C4C4544-0042-3510-8051-B4C04F595031").as_deref(),
            Some("4c4c4544-0042-3510-8051-b4c04f595031")
        );
        assert_eq!(normalize_uuid("not-a-uuid"), None);
        assert_eq!(
            normalize_uuid("../../etc/passwd-0000-0000-0000-000000000000"),
            None
        );
    }
}
