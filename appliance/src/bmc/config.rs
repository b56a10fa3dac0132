//! `[bmc]`: the power manager's section of `appliance.toml`, and its check.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::manager::ManagerSettings;
use crate::config::Invalid;

/// `[bmc]` as written: how BMC operations are queued, retried and confirmed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BmcSection {
    /// One exchange with a BMC, milliseconds.
    pub exchange_timeout_ms: u64,
    /// Tries of one step that failed for a reason that may pass.
    pub attempts: u32,
    /// First pause before a retry (doubled each time), milliseconds.
    pub backoff_ms: u64,
    /// How long a power change may take to show, seconds.
    pub settle_s: u64,
    /// Pause between power-state polls, milliseconds.
    pub poll_ms: u64,
    /// Operations queued for one BMC before more are refused.
    pub queue_limit: usize,
    /// The key that seals stored BMC passwords (default: `bmc-credentials.key` in the
    /// data folder, created on first use).
    pub key_file: Option<PathBuf>,
}

impl Default for BmcSection {
    fn default() -> Self {
        let d = ManagerSettings::default();
        BmcSection {
            exchange_timeout_ms: d.exchange_timeout.as_millis() as u64,
            attempts: d.attempts,
            backoff_ms: d.backoff.as_millis() as u64,
            settle_s: d.settle.as_secs(),
            poll_ms: d.poll.as_millis() as u64,
            queue_limit: d.queue_limit,
            key_file: None,
        }
    }
}

/// `[bmc]`, checked (the key file's place is the assembly's: it defaults into the data
/// folder).
#[derive(Debug, Clone, PartialEq)]
pub struct BmcConfig {
    pub manager: ManagerSettings,
    /// The key sealing stored BMC passwords.
    pub key_file: PathBuf,
}

impl TryFrom<&BmcSection> for ManagerSettings {
    type Error = Invalid;

    fn try_from(b: &BmcSection) -> Result<Self, Invalid> {
        if b.attempts == 0 || b.attempts > 20 {
            return Err(Invalid::new("bmc.attempts", "must be 1 to 20"));
        }
        if b.exchange_timeout_ms < 10 || b.poll_ms < 10 || b.queue_limit == 0 {
            return Err(Invalid::new(
                "bmc",
                "exchange_timeout_ms and poll_ms are at least 10, queue_limit at least 1",
            ));
        }
        Ok(ManagerSettings {
            exchange_timeout: Duration::from_millis(b.exchange_timeout_ms),
            attempts: b.attempts,
            backoff: Duration::from_millis(b.backoff_ms),
            settle: Duration::from_secs(b.settle_s),
            poll: Duration::from_millis(b.poll_ms),
            queue_limit: b.queue_limit,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let b = BmcSection {
            attempts: 5,
            backoff_ms: 250,
            settle_s: 90,
            ..Default::default()
        };
        let m = ManagerSettings::try_from(&b).unwrap();
        assert_eq!(m.attempts, 5);
        assert_eq!(m.backoff, Duration::from_millis(250));
        assert_eq!(m.settle, Duration::from_secs(90));
        for bad in [
            BmcSection {
                attempts: 0,
                ..Default::default()
            },
            BmcSection {
                attempts: 99,
                ..Default::default()
            },
            BmcSection {
                poll_ms: 1,
                ..Default::default()
            },
            BmcSection {
                queue_limit: 0,
                ..Default::default()
            },
        ] {
            let e = ManagerSettings::try_from(&bad).unwrap_err();
            assert!(e.key.starts_with("bmc"), "{e}");
        }
    }
}
