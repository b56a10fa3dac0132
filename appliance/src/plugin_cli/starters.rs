//! `arges plugin new`: writes a starter project from the templates under
//! `plugins/starters/` (embedded in the binary, with the contract it speaks), so a new
//! plugin always builds against the WIT of the appliance that made it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::StarterLang;

/// The contract, as this appliance speaks it.
const CONTRACT: &str = include_str!("../../../wit/plugin.wit");
const CASES: &str = include_str!("../../../plugins/starters/common/cases.yaml");
const GITIGNORE: &str = include_str!("../../../plugins/starters/common/gitignore");

/// A starter's files: (path in the project, template, executable).
fn templates(lang: StarterLang) -> Vec<(&'static str, &'static str, bool)> {
    macro_rules! t {
        ($lang:literal, $file:literal, $exec:expr) => {
            (
                $file,
                include_str!(concat!("../../../plugins/starters/", $lang, "/", $file)),
                $exec,
            )
        };
    }
    let mut files = match lang {
        StarterLang::Rust => vec![
            t!("rust", "Cargo.toml", false),
            t!("rust", "src/lib.rs", false),
            t!("rust", "build.sh", true),
            t!("rust", "README.md", false),
        ],
        StarterLang::Python => vec![
            t!("python", "app.py", false),
            t!("python", "build.sh", true),
            t!("python", "README.md", false),
        ],
        StarterLang::Js => vec![
            t!("js", "policy.js", false),
            t!("js", "package.json", false),
            t!("js", "build.sh", true),
            t!("js", "README.md", false),
        ],
    };
    files.extend([
        ("wit/plugin.wit", CONTRACT, false),
        ("cases.yaml", CASES, false),
        (".gitignore", GITIGNORE, false),
    ]);
    files
}

/// Checks a plugin's name as the appliance will (its file's stem, a config key and a
/// metric label), and that a Rust crate may carry it.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    anyhow::ensure!(
        ok,
        "{name:?} cannot name a plugin: use lower-case letters, digits, - and _, starting with a letter (it becomes NAME.wasm and [plugins.config.NAME])"
    );
    Ok(())
}

/// Writes the starter for `lang` named `name` into `dir`; the files written.
pub fn write(name: &str, lang: StarterLang, dir: &Path) -> Result<Vec<PathBuf>> {
    check_name(name)?;
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        anyhow::ensure!(
            entries.next().is_none(),
            "{} is not empty: choose another --dir",
            dir.display()
        );
    }
    let crate_name = name.replace('-', "_");
    let mut written = Vec::new();
    for (file, template, executable) in templates(lang) {
        let text = template
            .replace("{{name}}", name)
            .replace("{{crate}}", &crate_name)
            .replace("{{version}}", arges::plugins::CONTRACT_VERSION);
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_starter_is_written_with_its_name_and_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("gate");
        let files = write("rack-gate", StarterLang::Rust, &at).unwrap();
        assert!(files.iter().any(|f| f.ends_with("wit/plugin.wit")));
        let cargo = std::fs::read_to_string(at.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("name = \"rack-gate\""), "{cargo}");
        let build = std::fs::read_to_string(at.join("build.sh")).unwrap();
        assert!(
            build.contains("release/rack_gate.wasm\" rack-gate.wasm"),
            "{build}"
        );
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(!text.contains("{{"), "{} keeps a placeholder", f.display());
        }
        let e = write("other", StarterLang::Js, &at)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not empty"), "{e}");
        let e = write("Rack Gate", StarterLang::Js, &dir.path().join("x")).unwrap_err();
        assert!(e.to_string().contains("cannot name a plugin"), "{e}");
    }
}
