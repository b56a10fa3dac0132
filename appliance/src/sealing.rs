//! Secrets at rest: BMC passwords and machine configurations (a cluster's bootstrap data
//! holds its CA keys), sealed with AES-256-GCM under a key kept in its own file in the
//! data folder (mode 0600, created on first use). Each is bound to its server's id and to
//! what it is as associated data, so sealed bytes copied to another server's row, or a
//! sealed password put where a configuration belongs, do not open. The inventory stores
//! only the sealed bytes; a password is opened just before a login, a configuration just
//! before it is served to its machine, and neither is logged, returned by the admin API
//! or handed to a plugin.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

/// Format byte of a sealed password.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secrets key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets key {0} is not 32 bytes: refusing to use or replace it")]
    KeyLength(PathBuf),
    #[error(
        "the stored {0} does not open with this appliance's key (a different key file, or a damaged record)"
    )]
    Open(String),
    #[error("cannot seal the {0}")]
    Seal(String),
}

/// Seals and opens BMC passwords.
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// The sealer whose key is at `path`, creating the key (0600) when the file is absent.
    pub fn open_or_create(path: &Path) -> Result<Sealer, SealError> {
        let err = |source| SealError::Key {
            path: path.to_path_buf(),
            source,
        };
        let key = match std::fs::read(path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| err(std::io::Error::other(e.to_string())))?;
                write_private(path, &k).map_err(err)?;
                k.to_vec()
            }
            Err(e) => return Err(err(e)),
        };
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| SealError::KeyLength(path.to_path_buf()))?;
        Ok(Sealer { cipher })
    }

    /// A sealer with a fresh random key that lives only in memory (tests of the layers
    /// above, which need sealing but no key file).
    pub fn ephemeral() -> Result<Sealer, SealError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| SealError::Seal(format!("a fresh key: {e}")))?;
        let cipher = Aes256Gcm::new_from_slice(&k).map_err(|_| SealError::Seal("a key".into()))?;
        Ok(Sealer { cipher })
    }

    /// Seals `password` for server `id`.
    pub fn seal(&self, id: &str, password: &str) -> Result<Vec<u8>, SealError> {
        self.seal_as(id.as_bytes(), password.as_bytes())
            .ok_or_else(|| SealError::Seal(format!("BMC password of {id}")))
    }

    /// Opens what [`Sealer::seal`] sealed for `id`.
    pub fn open(&self, id: &str, sealed: &[u8]) -> Result<String, SealError> {
        let bad = || SealError::Open(format!("BMC password of {id}"));
        let plain = self.open_as(id.as_bytes(), sealed).ok_or_else(bad)?;
        String::from_utf8(plain).map_err(|_| bad())
    }

    /// Seals server `id`'s configuration blob.
    pub fn seal_config(&self, id: &str, blob: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_as(&config_aad(id), blob)
            .ok_or_else(|| SealError::Seal(format!("configuration of {id}")))
    }

    /// Opens what [`Sealer::seal_config`] sealed for `id`.
    pub fn open_config(&self, id: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.open_as(&config_aad(id), sealed)
            .ok_or_else(|| SealError::Open(format!("configuration of {id}")))
    }

    fn seal_as(&self, aad: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let sealed = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg, aad })
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn open_as(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().ok()?;
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad,
                },
            )
            .ok()
    }
}

/// What a configuration is sealed to: never the same as a password's (a bare id).
fn config_aad(id: &str) -> Vec<u8> {
    [b"config\0".as_slice(), id.as_bytes()].concat()
}

/// Writes `bytes` to `path` readable by its owner only (0600), atomically.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_server_kind_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("bmc.key");
        let s = Sealer::open_or_create(&key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = s.seal("server-a", "hunter2").unwrap();
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "the password is not in the sealed bytes"
        );
        assert_eq!(s.open("server-a", &sealed).unwrap(), "hunter2");
        assert!(s.open("server-b", &sealed).is_err(), "bound to its server");
        // The same key file opens it after a restart; another key does not.
        let again = Sealer::open_or_create(&key).unwrap();
        assert_eq!(again.open("server-a", &sealed).unwrap(), "hunter2");
        let other = Sealer::open_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("server-a", &sealed).is_err());
        let mut damaged = sealed.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(s.open("server-a", &damaged).is_err());
        // A configuration is sealed apart: neither opens as the other.
        let config = s.seal_config("server-a", b"machine: {ca: key}").unwrap();
        assert!(!config.windows(6).any(|w| w == b"ca: ke"));
        assert_eq!(
            s.open_config("server-a", &config).unwrap(),
            b"machine: {ca: key}"
        );
        assert!(s.open_config("server-b", &config).is_err());
        assert!(s.open("server-a", &config).is_err());
        assert!(s.open_config("server-a", &sealed).is_err());
        std::fs::write(&key, b"short").unwrap();
        assert!(matches!(
            Sealer::open_or_create(&key),
            Err(SealError::KeyLength(_))
        ));
    }
}
