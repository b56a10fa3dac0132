//! `[templates]`: files that replace the built-in iPXE templates, and their loading.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ScriptKind, TemplateError, Templates};

/// `[templates]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct TemplatesSection {
    pub discover: Option<PathBuf>,
    pub environment: Option<PathBuf>,
    pub local_disk: Option<PathBuf>,
    pub wipe: Option<PathBuf>,
    pub deny: Option<PathBuf>,
}

impl Templates {
    /// The built-in set with the section's files in place of theirs, each read and
    /// compiled now (paths resolved by `resolve`), so a broken one stops the start.
    pub fn from_section(
        t: &TemplatesSection,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<Templates, TemplateError> {
        let mut templates = Templates::builtin();
        for (kind, path) in [
            (ScriptKind::Discover, &t.discover),
            (ScriptKind::Environment, &t.environment),
            (ScriptKind::LocalDisk, &t.local_disk),
            (ScriptKind::Wipe, &t.wipe),
            (ScriptKind::Deny, &t.deny),
        ] {
            if let Some(p) = path {
                templates.load(kind, &resolve(p))?;
            }
        }
        Ok(templates)
    }
}
