//! Registration wire types: what the discovery agent sends and what the appliance answers.
//!
//! The only types the agent and the HTTP edge share; the inventory stores [`Hardware`] as
//! the agent reported it.

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
    /// What the environment was booted for (`discover` or `wipe`), from the command line.
    pub mode: String,
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
