//! `[tokens]`: the appliance's two long-lived tokens, each inline, from a file, or
//! generated once into the data folder.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Invalid;

/// The shortest token accepted, from any source (a generated one is 64).
pub const MIN_TOKEN: usize = 16;

/// `[tokens]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TokensSection {
    pub registration: Option<String>,
    pub registration_file: Option<PathBuf>,
    pub admin: Option<String>,
    pub admin_file: Option<PathBuf>,
}

/// Where a token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
    /// Generated on first start into this file in the data folder.
    Generated(PathBuf),
}

impl TokenSource {
    /// The source `key` (or `key_file`) names; `generated` in the data folder when
    /// neither is set. `resolve` places a relative file.
    pub(super) fn from_keys(
        inline: &Option<String>,
        path: &Option<PathBuf>,
        key: &str,
        generated: PathBuf,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<TokenSource, Invalid> {
        match (inline, path) {
            (Some(_), Some(_)) => Err(Invalid::new(
                key,
                format!("set either {key} or {key}_file, not both"),
            )),
            (Some(t), None) if t.len() < MIN_TOKEN => Err(Invalid::new(
                key,
                format!("must be at least {MIN_TOKEN} characters"),
            )),
            (Some(t), None) => Ok(TokenSource::Inline(t.clone())),
            (None, Some(p)) => Ok(TokenSource::File(resolve(p))),
            (None, None) => Ok(TokenSource::Generated(generated)),
        }
    }

    /// Reads (or for `Generated`, creates on first use) the token. A file's token is held
    /// to the same minimum as an inline one.
    pub fn resolve(&self) -> std::io::Result<String> {
        match self {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => {
                let t = std::fs::read_to_string(p)?.trim().to_string();
                if t.len() < MIN_TOKEN {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the token in {} is {} characters; at least {MIN_TOKEN} are needed",
                            p.display(),
                            t.len()
                        ),
                    ));
                }
                Ok(t)
            }
            TokenSource::Generated(p) => match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
                _ => {
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let token = crate::random_token();
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(p)?;
                    f.write_all(token.as_bytes())?;
                    f.sync_all()?;
                    tracing::info!(path = %p.display(), "generated a new token");
                    Ok(token)
                }
            },
        }
    }
}
