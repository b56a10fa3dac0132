//! `[environments.NAME]` and `[discovery]`: what machines boot, checked together (each
//! name another section gives must be defined). Files are placed under the assets folder
//! here; their pinned hashes are checked by [`super::Config::load`], which reads them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ConfigError, Invalid};
use crate::ipxe::Template;

/// A file of an environment: a path (relative to the assets folder), optionally pinned.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AssetEntry {
    Path(PathBuf),
    Pinned {
        path: PathBuf,
        /// Hex sha256 the file must have; checked at load.
        sha256: Option<String>,
    },
}

impl AssetEntry {
    pub fn path(&self) -> &PathBuf {
        match self {
            AssetEntry::Path(p) | AssetEntry::Pinned { path: p, .. } => p,
        }
    }
    pub fn sha256(&self) -> Option<&str> {
        match self {
            AssetEntry::Path(_) => None,
            AssetEntry::Pinned { sha256, .. } => sha256.as_deref(),
        }
    }
}

/// `[environments.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSection {
    pub kernel: AssetEntry,
    #[serde(default)]
    pub initrds: Vec<AssetEntry>,
    /// Kernel command line, a template (see the `ipxe` module for the variables).
    #[serde(default)]
    pub cmdline: String,
}

/// `[discovery]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySection {
    /// The environment unknown machines boot to register.
    pub environment: String,
    /// The environment a wipe boots (default: the discovery one, with `arges.mode=wipe`).
    pub wipe_environment: Option<String>,
}

impl Default for DiscoverySection {
    fn default() -> Self {
        DiscoverySection {
            environment: "discovery".into(),
            wipe_environment: None,
        }
    }
}

/// The discovery environment every default config has.
pub fn default_discovery_environment() -> EnvironmentSection {
    EnvironmentSection {
        kernel: AssetEntry::Path("discovery/vmlinuz".into()),
        initrds: vec![AssetEntry::Path("discovery/initramfs.img".into())],
        cmdline: DEFAULT_DISCOVERY_CMDLINE.into(),
    }
}

/// What completes an argument that ends in the appliance's `/configdata?uuid=`.
const CONFIGDATA_PROOF: &str = "{{ machine.uuid }}&token={{ boot_token }}";

/// An environment's kernel command line as a template. An argument that ends in
/// `/configdata?uuid=` (the getting-started guide's `talos.config=<endpoint>/configdata?uuid=`,
/// which Sidero's machines completed with their UUID alone) is completed with the
/// machine's UUID and this boot's token, the proof `/configdata` asks for: the guide's
/// line works as written, and the configuration still reaches only its machine.
pub fn cmdline_template(origin: &str, src: &str) -> Result<Template, crate::ipxe::TemplateError> {
    let completed: Vec<String> = src
        .split(' ')
        .map(|arg| {
            if arg.ends_with("/configdata?uuid=") {
                format!("{arg}{CONFIGDATA_PROOF}")
            } else {
                arg.to_string()
            }
        })
        .collect();
    Template::parse(origin, &completed.join(" "))
}

/// Kernel command line of the default discovery environment.
/// The agent registers at `appliance.agent_url` (HTTPS, pinning `appliance.pin`, when
/// the appliance serves HTTPS; its HTTP URL otherwise).
pub const DEFAULT_DISCOVERY_CMDLINE: &str = "console=tty0 console=ttyS0,115200 \
arges.appliance={{ appliance.agent_url }} arges.pin={{ appliance.pin }} \
arges.token={{ registration_token }} arges.mode={{ action }}";

/// A validated boot environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub kernel: PathBuf,
    pub initrds: Vec<PathBuf>,
    pub cmdline: Template,
}

impl Environment {
    /// Every file of the environment, kernel first.
    pub fn files(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.kernel).chain(self.initrds.iter())
    }

    /// The file served as `/env/<name>/<file_name>`.
    pub fn file_named(&self, file_name: &str) -> Option<&PathBuf> {
        self.files()
            .find(|p| p.file_name().is_some_and(|n| n == file_name))
    }
}

/// A file whose sha256 the config pins, checked when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetPin {
    /// The key that pins it (`environments.talos.kernel`), for the error.
    pub key: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// What the environment sections come to.
#[derive(Debug)]
pub(super) struct Environments {
    pub by_name: BTreeMap<String, Environment>,
    pub discovery: String,
    pub wipe: String,
    pub pins: Vec<AssetPin>,
}

/// Checks the environments, the discovery and wipe environments' names and the
/// policy's default environment; places files under `assets_dir`.
pub(super) fn environments(
    sections: &BTreeMap<String, EnvironmentSection>,
    discovery: &DiscoverySection,
    default_environment: Option<&String>,
    assets_dir: &Path,
) -> Result<Environments, ConfigError> {
    let mut sections = sections.clone();
    let name = discovery.environment.clone();
    if sections.is_empty() || (name == "discovery" && !sections.contains_key("discovery")) {
        sections
            .entry("discovery".into())
            .or_insert_with(default_discovery_environment);
    }
    let mut by_name = BTreeMap::new();
    let mut pins = Vec::new();
    for (env, e) in &sections {
        let key = format!("environments.{env}");
        if env.is_empty()
            || !env
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Invalid::new(
                &key,
                format!("environment name {env:?} may only hold letters, digits, - and _"),
            )
            .into());
        }
        let cmdline = cmdline_template(&format!("{key}.cmdline"), &e.cmdline)?;
        let mut paths = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, asset) in std::iter::once(&e.kernel)
            .chain(e.initrds.iter())
            .enumerate()
        {
            let akey = if i == 0 {
                format!("{key}.kernel")
            } else {
                format!("{key}.initrds")
            };
            let path = if asset.path().is_absolute() {
                asset.path().clone()
            } else {
                assets_dir.join(asset.path())
            };
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                return Err(
                    Invalid::new(&akey, format!("{} has no file name", path.display())).into(),
                );
            };
            if !seen.insert(file_name.to_string()) {
                return Err(Invalid::new(
                    &akey,
                    format!("two files of the environment are named {file_name:?}"),
                )
                .into());
            }
            if let Some(want) = asset.sha256() {
                let want = want.trim().to_ascii_lowercase();
                if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(Invalid::new(
                        &akey,
                        format!("sha256 {want:?} is not 64 hex digits"),
                    )
                    .into());
                }
                pins.push(AssetPin {
                    key: akey.clone(),
                    path: path.clone(),
                    sha256: want,
                });
            }
            paths.push(path);
        }
        let kernel = paths.remove(0);
        by_name.insert(
            env.clone(),
            Environment {
                name: env.clone(),
                kernel,
                initrds: paths,
                cmdline,
            },
        );
    }
    let wipe = discovery
        .wipe_environment
        .clone()
        .unwrap_or_else(|| name.clone());
    for (key, env) in [
        ("discovery.environment", Some(&name)),
        ("discovery.wipe_environment", Some(&wipe)),
        ("policy.default_environment", default_environment),
    ] {
        if let Some(env) = env
            && !by_name.contains_key(env)
        {
            return Err(Invalid::new(
                key,
                format!("names environment {env:?}, which is not defined under [environments]"),
            )
            .into());
        }
    }
    Ok(Environments {
        by_name,
        discovery: name,
        wipe,
        pins,
    })
}

/// Checks a file against a pinned hex sha256, streaming it (assets can be hundreds of MB).
pub fn check_sha256(path: &Path, want: &str) -> Result<(), String> {
    let want = want.trim().to_ascii_lowercase();
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("sha256 {want:?} is not 64 hex digits"));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read;
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = hex::encode(h.finalize());
    if got != want {
        return Err(format!(
            "{} has sha256 {got}, expected {want}",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guide_s_configdata_argument_gets_the_machine_s_proof() {
        let t = cmdline_template(
            "t",
            "console=ttyS0 talos.config=http://10.0.0.2:8080/configdata?uuid= init_on_alloc=1",
        )
        .unwrap();
        let context = serde_json::json!({"machine": {"uuid": "u-1"}, "boot_token": "t0k"});
        assert_eq!(
            t.render(&context).unwrap(),
            "console=ttyS0 talos.config=http://10.0.0.2:8080/configdata?uuid=u-1&token=t0k init_on_alloc=1"
        );
        // A URL that already names its machine is left as written.
        let t = cmdline_template("t", "talos.config=http://a/configdata?uuid=x").unwrap();
        assert_eq!(
            t.render(&context).unwrap(),
            "talos.config=http://a/configdata?uuid=x"
        );
    }
}
