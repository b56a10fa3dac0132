//! The core's sections of `appliance.toml`: `[policy]` (the built-in boot policy) and
//! `[windows]` (provisioning windows, see `SECURITY.md`), and their checks. Which
//! environments exist is the assembly's to check: it sees them all.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Invalid;

/// What a registered but not yet accepted machine boots.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unaccepted {
    /// Boot from local disk until accepted.
    #[default]
    LocalDisk,
    /// Run discovery again (refreshes the hardware record).
    Discover,
}

/// How "boot from local disk" is told to the firmware.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalDiskMethod {
    /// iPXE `exit`: the firmware tries its next boot device (most BIOS, many UEFI).
    #[default]
    Exit,
    /// iPXE `sanboot` of the first disk (firmware that loops back to the network on exit).
    Sanboot,
    /// Answer `/boot.ipxe` with HTTP 404 so iPXE fails and the firmware moves on.
    #[serde(rename = "http-404")]
    Http404,
}

impl LocalDiskMethod {
    /// The method's name in config and templates.
    pub fn name(self) -> &'static str {
        match self {
            LocalDiskMethod::Exit => "exit",
            LocalDiskMethod::Sanboot => "sanboot",
            LocalDiskMethod::Http404 => "http-404",
        }
    }
}

/// `[policy]` as written: the built-in boot policy.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    pub unaccepted: Unaccepted,
    /// Environment for accepted machines that have none of their own.
    pub default_environment: Option<String>,
    pub local_disk_method: LocalDiskMethod,
    /// Per-architecture override of `local_disk_method` (keys: `x86_64`, `i386`, `arm64`, …).
    pub local_disk_method_by_arch: BTreeMap<String, LocalDiskMethod>,
    /// Servers registered but not accepted yet, at most; past it a new machine's
    /// registration is refused (503) until an operator accepts or deletes some. 0: no
    /// cap. (A flood of registrations must not fill the inventory, nor, in Kubernetes
    /// mode, etcd.)
    pub max_unaccepted: Option<usize>,
    /// Replaced by `[windows] secs`; kept only to say so clearly.
    #[serde(default, skip_serializing)]
    pub boot_token_ttl_secs: Option<u64>,
}

/// `[policy]`, checked.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub unaccepted: Unaccepted,
    pub default_environment: Option<String>,
    pub local_disk_method: LocalDiskMethod,
    pub local_disk_method_by_arch: BTreeMap<String, LocalDiskMethod>,
    /// 0: no cap.
    pub max_unaccepted: usize,
}

impl PolicyConfig {
    /// The local-disk method for a machine architecture.
    pub fn local_disk_method(&self, arch: &str) -> LocalDiskMethod {
        self.local_disk_method_by_arch
            .get(arch)
            .copied()
            .unwrap_or(self.local_disk_method)
    }
}

impl TryFrom<&PolicySection> for PolicyConfig {
    type Error = Invalid;

    fn try_from(p: &PolicySection) -> Result<Self, Invalid> {
        if p.boot_token_ttl_secs.is_some() {
            return Err(Invalid::new(
                "policy.boot_token_ttl_secs",
                "was replaced by [windows] secs: a machine's secrets now go out only in a provisioning window the appliance opens (default 900 seconds; see SECURITY.md)",
            ));
        }
        Ok(PolicyConfig {
            unaccepted: p.unaccepted,
            default_environment: p.default_environment.clone(),
            local_disk_method: p.local_disk_method,
            local_disk_method_by_arch: p.local_disk_method_by_arch.clone(),
            max_unaccepted: p.max_unaccepted.unwrap_or(1000),
        })
    }
}

/// `[windows]` as written: provisioning windows, the only spans in which a machine is
/// handed its secrets (see `SECURITY.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsSection {
    /// How long a window stays open after the appliance powers a machine on (or an
    /// operator arms it), seconds: the boot must claim it and use its secret by then.
    pub secs: u64,
    /// Honest retries of a used secret (a configuration fetch or a registration whose
    /// answer was lost), each from the address that used it first.
    pub retries: u32,
    /// How long after its first use a secret may be retried, seconds.
    pub retry_secs: u64,
}

impl Default for WindowsSection {
    fn default() -> Self {
        WindowsSection {
            secs: 900,
            retries: 2,
            retry_secs: 120,
        }
    }
}

/// `[windows]`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowsConfig {
    /// How long a provisioning window stays open.
    pub length: Duration,
    /// Honest retries of a used secret, from the address that used it.
    pub retries: u32,
    /// How long after its first use a secret may be retried.
    pub retry_for: Duration,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig::try_from(&WindowsSection::default()).expect("the default windows are valid")
    }
}

impl TryFrom<&WindowsSection> for WindowsConfig {
    type Error = Invalid;

    fn try_from(w: &WindowsSection) -> Result<Self, Invalid> {
        if !(30..=3600).contains(&w.secs) {
            return Err(Invalid::new(
                "windows.secs",
                format!("{} is outside 30 to 3600 seconds", w.secs),
            ));
        }
        if w.retries > 10 {
            return Err(Invalid::new("windows.retries", "must be 0 to 10"));
        }
        if w.retry_secs > w.secs {
            return Err(Invalid::new(
                "windows.retry_secs",
                format!("must not exceed windows.secs ({})", w.secs),
            ));
        }
        Ok(WindowsConfig {
            length: Duration::from_secs(w.secs),
            retries: w.retries,
            retry_for: Duration::from_secs(w.retry_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_minutes_not_hours() {
        let w = |secs, retries, retry_secs| {
            WindowsConfig::try_from(&WindowsSection {
                secs,
                retries,
                retry_secs,
            })
        };
        assert_eq!(w(900, 2, 120).unwrap(), WindowsConfig::default());
        assert_eq!(w(10, 2, 5).unwrap_err().key, "windows.secs");
        assert_eq!(w(7200, 2, 5).unwrap_err().key, "windows.secs");
        assert_eq!(w(900, 11, 5).unwrap_err().key, "windows.retries");
        assert_eq!(w(60, 2, 120).unwrap_err().key, "windows.retry_secs");
    }

    #[test]
    fn the_old_token_lifetime_says_what_replaced_it() {
        let p = PolicySection {
            boot_token_ttl_secs: Some(3600),
            ..Default::default()
        };
        let e = PolicyConfig::try_from(&p).unwrap_err();
        assert!(e.message.contains("[windows] secs"), "{e}");
    }
}
