//! `[plugins]`: the plugin host's section of `appliance.toml`, and its check. Built with
//! or without the host itself (a build without plugins still reads the section).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Invalid;

/// `[plugins]` as written: WebAssembly plugins (boot policies and BMC drivers).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Folder of `.wasm` components; each file's name (without `.wasm`) is the plugin's name.
    pub dir: Option<PathBuf>,
    /// Where compiled plugins are cached (default: `plugin-cache` in the data folder).
    pub cache_dir: Option<PathBuf>,
    /// The key that signs the cache's compiled plugins, so a tampered one is never run
    /// (default: `plugin-cache.key` in the data folder, made on first use).
    pub cache_key_file: Option<PathBuf>,
    /// Boot-policy plugins whose failure (trap, timeout, memory, a malformed answer)
    /// denies the boot instead of falling back to the built-in decision: a deny list
    /// that fails must not let a quarantined machine boot. Default: the shipped deny list.
    pub fail_closed: Vec<String>,
    /// Plugins asked first, in this order; the others follow by name.
    pub order: Vec<String>,
    /// Deadline of one decision, milliseconds.
    pub timeout_ms: u64,
    /// Deadline of one BMC driver step (it waits on the BMC), milliseconds.
    pub driver_timeout_ms: u64,
    /// Memory one plugin instance may use, bytes.
    pub memory_bytes: u64,
    /// Instances of one plugin running at once.
    pub max_instances: u32,
    /// Use wasmtime's pooling allocator (faster instantiation; reserves address space).
    pub pooling: bool,
    /// Reuse an instance for later calls after a clean one (off: a fresh instance per call).
    pub reuse_instances: bool,
    /// Plugin name to the hex sha256 its file must have.
    pub pins: BTreeMap<String, String>,
    /// Each plugin's own table, readable through the `config` import.
    pub config: BTreeMap<String, toml::Table>,
}

impl Default for PluginsSection {
    fn default() -> Self {
        PluginsSection {
            dir: None,
            cache_dir: None,
            cache_key_file: None,
            fail_closed: vec!["deny-list-py".into()],
            order: Vec::new(),
            timeout_ms: 50,
            driver_timeout_ms: 30_000,
            memory_bytes: 64 << 20,
            max_instances: 32,
            pooling: true,
            reuse_instances: true,
            pins: BTreeMap::new(),
            config: BTreeMap::new(),
        }
    }
}

/// `[plugins]`, checked.
#[derive(Debug, Clone)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub order: Vec<String>,
    pub timeout: Duration,
    /// Deadline of one BMC driver step.
    pub driver_timeout: Duration,
    pub memory_bytes: u64,
    pub max_instances: u32,
    pub pooling: bool,
    pub reuse_instances: bool,
    /// Plugin name to lower-case hex sha256.
    pub pins: BTreeMap<String, String>,
    /// Plugin name to its table as sorted key/value strings (strings as they are, other
    /// scalars as TOML text, arrays and tables as JSON).
    pub config: BTreeMap<String, Vec<(String, String)>>,
    /// Where compiled plugins are cached.
    pub cache_dir: PathBuf,
    /// The key that signs the cache's compiled plugins.
    pub cache_key_file: PathBuf,
    pub fail_closed: Vec<String>,
}

impl PluginsConfig {
    /// `p`, checked, with its folders and key file where the assembly put them (the
    /// section's own, resolved, or the data folder's defaults).
    pub fn from_section(
        p: &PluginsSection,
        dir: PathBuf,
        cache_dir: PathBuf,
        cache_key_file: PathBuf,
    ) -> Result<Self, Invalid> {
        if p.timeout_ms == 0 || p.timeout_ms > 10_000 {
            return Err(Invalid::new(
                "plugins.timeout_ms",
                format!("{} is out of range: expected 1 to 10000", p.timeout_ms),
            ));
        }
        if p.memory_bytes < 1 << 20 {
            return Err(Invalid::new(
                "plugins.memory_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if p.max_instances == 0 {
            return Err(Invalid::new("plugins.max_instances", "must be at least 1"));
        }
        let mut pins = BTreeMap::new();
        for (name, sha) in &p.pins {
            let sha = sha.trim().to_ascii_lowercase();
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(Invalid::new(
                    format!("plugins.pins.{name}"),
                    format!("{sha:?} is not 64 hex digits"),
                ));
            }
            pins.insert(name.clone(), sha);
        }
        Ok(PluginsConfig {
            dir,
            order: p.order.clone(),
            timeout: Duration::from_millis(p.timeout_ms),
            driver_timeout: Duration::from_millis(p.driver_timeout_ms),
            memory_bytes: p.memory_bytes,
            max_instances: p.max_instances,
            pooling: p.pooling,
            reuse_instances: p.reuse_instances,
            pins,
            config: p
                .config
                .iter()
                .map(|(k, t)| (k.clone(), plugin_table(t)))
                .collect(),
            cache_dir,
            cache_key_file,
            fail_closed: p.fail_closed.clone(),
        })
    }

    /// Settings for `dir` with every default (used by `arges plugin` commands); the
    /// cache's key beside the cache.
    pub fn with_defaults(dir: PathBuf, cache_dir: PathBuf) -> Self {
        let key = cache_dir.with_file_name("plugin-cache.key");
        Self::from_section(&PluginsSection::default(), dir, cache_dir, key)
            .expect("the default plugin settings are valid")
    }
}

/// Flattens a plugin's TOML table into the strings the `config` import hands out.
pub fn plugin_table(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    serde_json::to_string(v).unwrap_or_default()
                }
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_pins_are_checked() {
        let check = |edit: fn(&mut PluginsSection)| {
            let mut p = PluginsSection::default();
            edit(&mut p);
            PluginsConfig::from_section(&p, "p".into(), "c".into(), "k".into()).map_err(|e| e.key)
        };
        assert!(check(|_| {}).is_ok());
        assert_eq!(
            check(|p| p.timeout_ms = 0).unwrap_err(),
            "plugins.timeout_ms"
        );
        assert_eq!(
            check(|p| p.memory_bytes = 1024).unwrap_err(),
            "plugins.memory_bytes"
        );
        assert_eq!(
            check(|p| p.max_instances = 0).unwrap_err(),
            "plugins.max_instances"
        );
        assert_eq!(
            check(|p| {
                p.pins.insert("deny".into(), "abc".into());
            })
            .unwrap_err(),
            "plugins.pins.deny"
        );
        let ok = check(|p| {
            p.pins.insert("deny".into(), "AB".repeat(32));
        })
        .unwrap();
        assert_eq!(ok.pins["deny"], "ab".repeat(32), "lower-cased");
    }
}
