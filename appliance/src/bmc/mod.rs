//! BMC power control: the transports the host owns ([`ipmi`] over [`rmcp`], and
//! [`redfish`]), the per-operation connection a driver talks through ([`link`]), the
//! driver seam the plugin host fills ([`driver`]) and the power manager that queues,
//! retries and confirms every action ([`manager`]). Passwords are sealed at rest by
//! [`crate::sealing`].
//!
//! Credentials stay in this module: bmc-driver plugins speak raw IPMI commands or HTTP
//! through a [`link::BmcLink`], never holding a password.

pub mod config;
pub mod driver;
mod failure;
pub mod ipmi;
pub mod link;
pub mod manager;
pub mod redfish;
pub mod rmcp;

use serde::{Deserialize, Serialize};

pub use failure::PowerFailure;

/// A power change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    On,
    Off,
    /// Ask the OS to shut down (ACPI soft-off).
    SoftOff,
    Cycle,
    Reset,
}

/// Where the next boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootDevice {
    Pxe,
    Disk,
    Bios,
    Cdrom,
}

impl BootDevice {
    /// Name as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BootDevice::Pxe => "pxe",
            BootDevice::Disk => "disk",
            BootDevice::Bios => "bios",
            BootDevice::Cdrom => "cdrom",
        }
    }
}

impl std::str::FromStr for PowerAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "on" => PowerAction::On,
            "off" => PowerAction::Off,
            "soft-off" | "soft" => PowerAction::SoftOff,
            "cycle" => PowerAction::Cycle,
            "reset" => PowerAction::Reset,
            _ => {
                return Err(format!(
                    "{s:?} is not one of on, off, soft-off, cycle, reset"
                ));
            }
        })
    }
}

impl PowerAction {
    /// The state the machine ends in.
    pub fn final_state(self) -> PowerState {
        match self {
            PowerAction::Off | PowerAction::SoftOff => PowerState::Off,
            PowerAction::On | PowerAction::Cycle | PowerAction::Reset => PowerState::On,
        }
    }

    /// Name as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::SoftOff => "soft-off",
            PowerAction::Cycle => "cycle",
            PowerAction::Reset => "reset",
        }
    }
}

impl std::str::FromStr for BootDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pxe" | "network" => BootDevice::Pxe,
            "disk" | "hdd" => BootDevice::Disk,
            "bios" | "setup" => BootDevice::Bios,
            "cdrom" | "cd" => BootDevice::Cdrom,
            _ => return Err(format!("{s:?} is not one of pxe, disk, bios, cdrom")),
        })
    }
}

/// The next boot: device, whether it lasts past one boot, UEFI or legacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSetting {
    pub device: BootDevice,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default = "yes")]
    pub efi: bool,
}

fn yes() -> bool {
    true
}

/// Whether a machine is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    On,
    Off,
}

/// How the host reaches a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Ipmi,
    Redfish,
}

/// How a Redfish BMC's certificate is checked, as stored and as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// A PEM file of CA certificates on the head node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The sha256 (hex) of the BMC certificate's DER encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sha256: Option<String>,
    /// Accept any certificate. Only when set; warned about on every use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

impl TlsSettings {
    /// The policy these settings name, or why they name none.
    pub fn policy(&self) -> Result<redfish::TlsPolicy, String> {
        match (&self.ca_file, &self.pin_sha256, self.insecure) {
            (Some(ca), None, false) => Ok(redfish::TlsPolicy::Ca(ca.clone())),
            (None, Some(pin), false) => {
                let pin = pin.to_ascii_lowercase().replace(':', "");
                if pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err("tls.pin_sha256 must be 64 hex digits".into());
                }
                Ok(redfish::TlsPolicy::Pinned(pin))
            }
            (None, None, true) => Ok(redfish::TlsPolicy::InsecureAcceptAny),
            (None, None, false) => Err(
                "a Redfish BMC needs tls.ca_file, tls.pin_sha256 or (explicitly) tls.insecure"
                    .into(),
            ),
            _ => Err("set only one of tls.ca_file, tls.pin_sha256 and tls.insecure".into()),
        }
    }
}

/// A server's BMC as the operator configured it (the credentials are kept apart,
/// sealed: see [`crate::sealing`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BmcSettings {
    /// `host` or `host:port` (623 for IPMI and 443 for Redfish when left out).
    pub address: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// The driver to use; none: the loaded driver whose probe scores highest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default)]
    pub tls: TlsSettings,
    /// The login user (the password is sealed apart).
    pub username: String,
}

impl BmcSettings {
    /// The address with its port, the protocol's default when none is given.
    pub fn authority(&self) -> String {
        let default = match self.protocol {
            Protocol::Ipmi => 623,
            Protocol::Redfish => 443,
        };
        let a = self.address.trim();
        let has_port = if let Some(rest) = a.strip_prefix('[') {
            rest.contains("]:")
        } else {
            a.matches(':').count() == 1
        };
        if has_port {
            a.to_string()
        } else if a.contains(':') {
            format!("[{a}]:{default}")
        } else {
            format!("{a}:{default}")
        }
    }

    /// Checks what can be checked without the BMC.
    pub fn validate(&self) -> Result<(), String> {
        if self.address.trim().is_empty() || self.address.len() > 255 {
            return Err("bmc.address must name a host".into());
        }
        if self.username.is_empty() || self.username.len() > 64 {
            return Err("bmc.username must be 1 to 64 bytes".into());
        }
        if self.protocol == Protocol::Ipmi && self.username.len() > 16 {
            return Err("an IPMI user name is at most 16 bytes".into());
        }
        if self.protocol == Protocol::Redfish {
            self.tls.policy()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: &str, protocol: Protocol) -> BmcSettings {
        BmcSettings {
            address: address.into(),
            protocol,
            driver: None,
            tls: TlsSettings::default(),
            username: "admin".into(),
        }
    }

    #[test]
    fn authority_adds_the_protocol_port_only_when_missing() {
        assert_eq!(
            settings("10.0.0.5", Protocol::Ipmi).authority(),
            "10.0.0.5:623"
        );
        assert_eq!(
            settings("10.0.0.5:6230", Protocol::Ipmi).authority(),
            "10.0.0.5:6230"
        );
        assert_eq!(
            settings("bmc.rack1", Protocol::Redfish).authority(),
            "bmc.rack1:443"
        );
        assert_eq!(
            settings("fd00::5", Protocol::Redfish).authority(),
            "[fd00::5]:443"
        );
        assert_eq!(
            settings("[fd00::5]:8443", Protocol::Redfish).authority(),
            "[fd00::5]:8443"
        );
    }

    #[test]
    fn redfish_needs_exactly_one_tls_choice() {
        let mut s = settings("h", Protocol::Redfish);
        assert!(s.validate().unwrap_err().contains("tls"));
        s.tls.insecure = true;
        assert!(s.validate().is_ok());
        s.tls.pin_sha256 = Some("ab".repeat(32));
        assert!(s.validate().unwrap_err().contains("only one"));
        s.tls.insecure = false;
        assert!(s.validate().is_ok());
        s.tls.pin_sha256 = Some("xyz".into());
        assert!(s.validate().is_err());
    }
}
