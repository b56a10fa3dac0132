//! `[tftp]`: the TFTP server's section of `appliance.toml`, and its check.
//!
//! Where the server listens and which folders it serves are settled by the config's
//! assembly (command-line flags and the data folder decide them); the engine's tunables
//! and the file cache's limits are checked here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::TftpSettings;
use crate::config::Invalid;
use crate::files::CacheLimits;

/// `[tftp]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpSection {
    /// Addresses to listen on; port 69 when run as root, 6969 otherwise.
    pub listen: Vec<SocketAddr>,
    /// Folder served read-only.
    pub root: Option<PathBuf>,
    pub max_transfers: usize,
    pub max_transfers_per_client: usize,
    /// Requests whose client has not acknowledged yet, at once (a forged source never
    /// does); past it the oldest gives way.
    pub max_handshakes: usize,
    /// First retransmission timeout, milliseconds.
    pub timeout_ms: u64,
    /// Backoff ceiling, milliseconds.
    pub max_timeout_ms: u64,
    pub retries: u32,
    /// Largest block size granted, 8..=65464.
    pub max_blksize: u32,
    /// Largest RFC 7440 window granted, 1..=1024.
    pub max_windowsize: u32,
    /// Files up to this size are served from memory.
    pub cache_file_bytes: u64,
    /// Memory the file cache may use in all.
    pub cache_total_bytes: u64,
    /// Folder of iPXE binaries served (over TFTP and at `/boot/` over HTTP) when the root
    /// does not hold the name asked for. Default: Debian's `ipxe` package folder,
    /// `/usr/lib/ipxe`, when it exists.
    pub ipxe_dir: Option<PathBuf>,
}

impl Default for TftpSection {
    fn default() -> Self {
        let s = TftpSettings::default();
        let c = CacheLimits::default();
        let port = if crate::config::file::is_root() {
            69
        } else {
            6969
        };
        TftpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            root: None,
            max_transfers: s.max_transfers,
            max_transfers_per_client: s.max_transfers_per_client,
            max_handshakes: s.max_handshakes,
            timeout_ms: s.timeout.as_millis() as u64,
            max_timeout_ms: s.max_timeout.as_millis() as u64,
            retries: s.retries,
            max_blksize: u32::from(s.max_blksize),
            max_windowsize: u32::from(s.max_windowsize),
            cache_file_bytes: c.file_bytes,
            cache_total_bytes: c.total_bytes,
            ipxe_dir: None,
        }
    }
}

/// `[tftp]`, checked: the engine's tunables and the file cache's limits.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    pub settings: TftpSettings,
    pub cache: CacheLimits,
}

impl TryFrom<&TftpSection> for TftpConfig {
    type Error = Invalid;

    fn try_from(t: &TftpSection) -> Result<Self, Invalid> {
        if !(8..=65464).contains(&t.max_blksize) {
            return Err(Invalid::new(
                "tftp.max_blksize",
                format!("{} is out of range: expected 8 to 65464", t.max_blksize),
            ));
        }
        if !(1..=1024).contains(&t.max_windowsize) {
            return Err(Invalid::new(
                "tftp.max_windowsize",
                format!("{} is out of range: expected 1 to 1024", t.max_windowsize),
            ));
        }
        for (key, v) in [
            ("tftp.max_transfers", t.max_transfers),
            ("tftp.max_transfers_per_client", t.max_transfers_per_client),
            ("tftp.max_handshakes", t.max_handshakes),
        ] {
            if v == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if t.timeout_ms == 0 || t.max_timeout_ms < t.timeout_ms {
            return Err(Invalid::new(
                "tftp.timeout_ms",
                "must be at least 1 and not above tftp.max_timeout_ms",
            ));
        }
        Ok(TftpConfig {
            settings: TftpSettings {
                max_transfers: t.max_transfers,
                max_transfers_per_client: t.max_transfers_per_client,
                max_handshakes: t.max_handshakes,
                timeout: Duration::from_millis(t.timeout_ms),
                max_timeout: Duration::from_millis(t.max_timeout_ms),
                retries: t.retries,
                max_blksize: t.max_blksize as u16,
                max_windowsize: t.max_windowsize as u16,
            },
            cache: CacheLimits {
                file_bytes: t.cache_file_bytes,
                total_bytes: t.cache_total_bytes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(edit: impl FnOnce(&mut TftpSection)) -> Result<TftpConfig, Invalid> {
        let mut s = TftpSection::default();
        edit(&mut s);
        TftpConfig::try_from(&s)
    }

    #[test]
    fn ranges_are_checked_with_their_key() {
        assert!(check(|_| {}).is_ok());
        let key = |edit: fn(&mut TftpSection)| check(edit).unwrap_err().key;
        assert_eq!(key(|s| s.max_blksize = 4), "tftp.max_blksize");
        assert_eq!(key(|s| s.max_blksize = 70_000), "tftp.max_blksize");
        assert_eq!(key(|s| s.max_windowsize = 0), "tftp.max_windowsize");
        assert_eq!(key(|s| s.max_transfers = 0), "tftp.max_transfers");
        assert_eq!(
            key(|s| s.max_transfers_per_client = 0),
            "tftp.max_transfers_per_client"
        );
        assert_eq!(key(|s| s.timeout_ms = 5000), "tftp.timeout_ms");
        let c = check(|s| s.max_blksize = 1468).unwrap();
        assert_eq!(c.settings.max_blksize, 1468);
    }
}
