//! `[dhcp]`: the proxyDHCP section of `appliance.toml`, and its check.

use std::net::{Ipv4Addr, SocketAddr};

use serde::Deserialize;

use crate::config::Invalid;

/// Whether and how the appliance answers DHCP.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpMode {
    /// No DHCP at all (the site's DHCP server hands out boot options, or nothing boots
    /// from the network).
    #[default]
    Off,
    /// proxyDHCP beside the site's DHCP server: boot options only, never addresses.
    Proxy,
}

impl std::str::FromStr for DhcpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(DhcpMode::Off),
            "proxy" => Ok(DhcpMode::Proxy),
            other => Err(format!(
                "{other:?} is not a DHCP mode: expected off or proxy"
            )),
        }
    }
}

/// `[dhcp]` as written: proxyDHCP for network-boot clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpSection {
    pub mode: DhcpMode,
    /// Where DHCP broadcasts are received (the DHCP server port).
    pub listen: Vec<SocketAddr>,
    /// Where PXE clients send their ProxyDHCP requests (the PXE port).
    pub pxe_listen: Vec<SocketAddr>,
    /// Answer only requests arriving on these interfaces (empty: every interface).
    pub interfaces: Vec<String>,
    /// DHCP relays (their `giaddr`) whose relayed requests are answered. Empty: none. A
    /// reply to a relayed request goes to the relay the request names, so answering any
    /// relay would let a forged request aim our replies at any host.
    pub relays: Vec<Ipv4Addr>,
    /// The address handed out as boot server; by default our address on the interface
    /// the request came in on.
    pub server_address: Option<Ipv4Addr>,
    /// DHCP user classes that mean "this client is iPXE already": it gets the boot-script
    /// URL instead of an iPXE binary.
    pub ipxe_user_classes: Vec<String>,
    /// Path and query of the boot-script URL handed to iPXE (iPXE expands `${...}`).
    pub boot_script: String,
    pub boot_files: BootFiles,
}

impl Default for DhcpSection {
    fn default() -> Self {
        DhcpSection {
            mode: DhcpMode::Off,
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 67))],
            pxe_listen: vec![SocketAddr::from(([0, 0, 0, 0], 4011))],
            interfaces: Vec::new(),
            relays: Vec::new(),
            server_address: None,
            ipxe_user_classes: vec!["iPXE".into()],
            boot_script: "/boot.ipxe?uuid=${uuid}&mac=${netX/mac}&arch=${buildarch}".into(),
            boot_files: BootFiles::default(),
        }
    }
}

/// `[dhcp.boot_files]`: the iPXE binary each firmware family loads, by file name in the
/// TFTP root (or the iPXE folder).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootFiles {
    /// Legacy BIOS PXE (architecture 0).
    pub bios: String,
    /// 32-bit x86 UEFI (6; 15 over HTTP).
    pub uefi_i386: String,
    /// x86-64 UEFI (7 and 9; 16 and 17 over HTTP).
    pub uefi_x86_64: String,
    /// 64-bit Arm UEFI (11; 19 over HTTP).
    pub uefi_arm64: String,
}

impl Default for BootFiles {
    fn default() -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            uefi_i386: "ipxe-i386.efi".into(),
            uefi_x86_64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
        }
    }
}

/// `[dhcp]`, checked.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub listen: Vec<SocketAddr>,
    pub pxe_listen: Vec<SocketAddr>,
    pub interfaces: Vec<String>,
    pub relays: Vec<Ipv4Addr>,
    pub server_address: Option<Ipv4Addr>,
    pub ipxe_user_classes: Vec<String>,
    pub boot_script: String,
    pub boot_files: BootFiles,
}

impl TryFrom<&DhcpSection> for DhcpConfig {
    type Error = Invalid;

    fn try_from(d: &DhcpSection) -> Result<Self, Invalid> {
        for name in &d.interfaces {
            // IFNAMSIZ is 16 with the NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(Invalid::new(
                    "dhcp.interfaces",
                    format!("{name:?} is not an interface name"),
                ));
            }
        }
        if d.mode == DhcpMode::Proxy && d.listen.is_empty() && d.pxe_listen.is_empty() {
            return Err(Invalid::new(
                "dhcp.listen",
                "proxy mode needs at least one address in dhcp.listen or dhcp.pxe_listen",
            ));
        }
        if !d.boot_script.starts_with('/') || d.boot_script.chars().any(|c| c.is_whitespace()) {
            return Err(Invalid::new(
                "dhcp.boot_script",
                format!(
                    "{:?} must be a path starting with / and hold no spaces",
                    d.boot_script
                ),
            ));
        }
        if d.ipxe_user_classes.iter().any(String::is_empty) {
            return Err(Invalid::new(
                "dhcp.ipxe_user_classes",
                "an empty user class would match every client",
            ));
        }
        let b = &d.boot_files;
        for (key, name) in [
            ("dhcp.boot_files.bios", &b.bios),
            ("dhcp.boot_files.uefi_i386", &b.uefi_i386),
            ("dhcp.boot_files.uefi_x86_64", &b.uefi_x86_64),
            ("dhcp.boot_files.uefi_arm64", &b.uefi_arm64),
        ] {
            if crate::files::sanitize(name).is_err() || name.len() > 120 {
                return Err(Invalid::new(
                    key,
                    format!("{name:?} is not a file name inside the TFTP root"),
                ));
            }
        }
        Ok(DhcpConfig {
            mode: d.mode,
            listen: d.listen.clone(),
            pxe_listen: d.pxe_listen.clone(),
            interfaces: d.interfaces.clone(),
            relays: d.relays.clone(),
            server_address: d.server_address,
            ipxe_user_classes: d.ipxe_user_classes.clone(),
            boot_script: d.boot_script.clone(),
            boot_files: d.boot_files.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_names_its_key() {
        let key = |edit: fn(&mut DhcpSection)| {
            let mut d = DhcpSection::default();
            edit(&mut d);
            DhcpConfig::try_from(&d).unwrap_err().key
        };
        assert_eq!(
            key(|d| d.interfaces = vec!["a/b".into()]),
            "dhcp.interfaces"
        );
        assert_eq!(
            key(|d| {
                d.mode = DhcpMode::Proxy;
                d.listen.clear();
                d.pxe_listen.clear();
            }),
            "dhcp.listen"
        );
        assert_eq!(
            key(|d| d.boot_script = "boot.ipxe".into()),
            "dhcp.boot_script"
        );
        assert_eq!(
            key(|d| d.ipxe_user_classes = vec![String::new()]),
            "dhcp.ipxe_user_classes"
        );
        assert_eq!(
            key(|d| d.boot_files.bios = "../undionly.kpxe".into()),
            "dhcp.boot_files.bios"
        );
        assert!(DhcpConfig::try_from(&DhcpSection::default()).is_ok());
    }
}
