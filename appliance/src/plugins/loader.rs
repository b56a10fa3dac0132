//! Turns a `.wasm` file into a plugin ready to instantiate: name check, sha256 pin, compile
//! once (cached on disk, keyed by the file's sha256 and the engine's compatibility hash, so
//! a restart or an upgrade of wasmtime never reuses a stale artifact), and which world of
//! our contract the component is: a boot policy or a BMC driver (pre-instantiated for
//! that world), or neither, which is refused with what it imports or lacks.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::PluginError;
use super::bindings::BootPolicyPre;
use super::bindings::driver::BmcDriverPre;
use super::host::PluginState;
use crate::config::PluginsConfig;

/// What identifies one version of a plugin file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub modified: SystemTime,
    pub inode: u64,
}

impl FileStamp {
    /// The stamp of `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            len: m.len(),
            modified: m.modified()?,
            inode: m.ino(),
        })
    }
}

/// An instance that finished a call cleanly, kept for the next one.
pub(crate) struct WarmSlot {
    pub(crate) store: wasmtime::Store<PluginState>,
    pub(crate) instance: super::bindings::BootPolicy,
    pub(crate) uses: u32,
}

/// What a plugin is, by the world it targets, ready to instantiate.
pub(crate) enum Entry {
    Policy(BootPolicyPre<PluginState>),
    Driver(BmcDriverPre<PluginState>),
}

/// A loaded plugin.
pub struct Plugin {
    pub name: Arc<str>,
    pub path: PathBuf,
    pub sha256: String,
    pub stamp: FileStamp,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// How long loading took.
    pub load_time: std::time::Duration,
    /// The contract version the component was built against (from its `arges:plugin`
    /// imports), when it imports any.
    pub contract: Option<String>,
    pub(crate) entry: Entry,
    pub(crate) config: Arc<Vec<(String, String)>>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) idle: std::sync::Mutex<Vec<WarmSlot>>,
}

impl Plugin {
    /// The world the plugin targets, as `arges plugin check` prints it.
    pub fn world(&self) -> &'static str {
        match self.entry {
            Entry::Policy(_) => "boot-policy",
            Entry::Driver(_) => "bmc-driver",
        }
    }

    /// One of the plugin's instance slots, waiting at most `wait`; `None` when all stay busy.
    pub(crate) async fn permit(
        &self,
        wait: std::time::Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match tokio::time::timeout(wait, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether it is a boot policy (in the chain) rather than a BMC driver.
    pub fn is_policy(&self) -> bool {
        matches!(self.entry, Entry::Policy(_))
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A plugin's name: its file name without `.wasm`, in a small charset (it is a metric
/// label and a config key).
pub fn plugin_name(path: &Path) -> Result<String, PluginError> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let ok = !stem.is_empty()
        && stem.len() <= 64
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(stem.to_string())
    } else {
        Err(PluginError::Name(path.display().to_string()))
    }
}

fn engine_key(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// What starts a signed cached compile.
const CACHE_MAGIC: &[u8; 8] = b"ARGESC01";

/// The key that signs cached compiles: 32 random bytes (0600), made on first use. Two
/// processes making it at once agree: the first link wins and the other reads it.
fn cache_key(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(k) if k.len() == 32 => Ok(k),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a 32-byte key", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = vec![0u8; 32];
            getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
            let tmp =
                path.with_extension(format!("{}.{}", std::process::id(), hex::encode(&k[..4])));
            crate::sealing::write_private(&tmp, &k)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(k),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => cache_key(path),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The keyed hash of a compiled artefact, bound to the source's sha256 and the engine, so
/// neither another plugin's artefact nor one built elsewhere passes for this one.
fn cache_mac(key: &[u8], sha: &str, engine: &str, artefact: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for part in [sha.as_bytes(), b"\0", engine.as_bytes(), b"\0", artefact] {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

/// The artefact inside a signed cache file, if its keyed hash holds.
fn verified<'a>(key: &[u8], sha: &str, engine: &str, file: &'a [u8]) -> Option<&'a [u8]> {
    let rest = file.strip_prefix(CACHE_MAGIC.as_slice())?;
    if rest.len() < 32 {
        return None;
    }
    let (mac, artefact) = rest.split_at(32);
    crate::core::secret_eq_bytes(mac, &cache_mac(key, sha, engine, artefact)).then_some(artefact)
}

/// Compiles `bytes`, or loads the artefact a previous compile left in the cache, once
/// its keyed hash shows this appliance wrote it for exactly these bytes.
fn compile_cached(
    engine: &Engine,
    settings: &PluginsConfig,
    sha: &str,
    bytes: &[u8],
    name: &str,
) -> Result<(Component, bool), PluginError> {
    let ekey = engine_key(engine);
    let cached = settings.cache_dir.join(format!("{sha}-{ekey}.cwasm"));
    let key = match cache_key(&settings.cache_key_file) {
        Ok(k) => k,
        Err(e) => {
            // No key, no cache: compile every time rather than trust an unsigned file.
            tracing::warn!(plugin = name, key = %settings.cache_key_file.display(), error = %e, "no key for the compile cache; compiling without it");
            let component = Component::new(engine, bytes).map_err(|e| PluginError::Invalid {
                plugin: name.into(),
                message: format!("{e:#}"),
            })?;
            return Ok((component, false));
        }
    };
    if let Ok(file) = std::fs::read(&cached) {
        match verified(&key, sha, &ekey, &file) {
            // SAFETY: the artefact was written by this appliance (its keyed hash, under a
            // key in the data folder, holds) from a compile of exactly these bytes by a
            // compatible engine; wasmtime additionally checks the header.
            Some(art) => match unsafe { Component::deserialize(engine, art) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(plugin = name, error = %e, "cached compile unusable; compiling again")
                }
            },
            None => tracing::warn!(
                plugin = name,
                file = %cached.display(),
                "cached compile does not carry this appliance's signature (tampered, or written elsewhere); not running it, compiling again"
            ),
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| PluginError::Invalid {
        plugin: name.into(),
        message: format!("{e:#}"),
    })?;
    match component.serialize() {
        Ok(art) => {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(&settings.cache_dir)?;
                // A name of its own: appliances sharing a cache may compile at once.
                let tmp = cached.with_extension(format!("tmp.{}", std::process::id()));
                let mac = cache_mac(&key, sha, &ekey, &art);
                std::fs::write(&tmp, [CACHE_MAGIC.as_slice(), &mac, &art].concat())?;
                std::fs::rename(&tmp, &cached)
            };
            if let Err(e) = write() {
                tracing::warn!(plugin = name, error = %e, "cannot cache the compiled plugin");
            }
        }
        Err(e) => tracing::warn!(plugin = name, error = %e, "cannot serialise the compiled plugin"),
    }
    Ok((component, false))
}

/// The interfaces a plugin may import, by package (any version the linker accepts):
/// the contract's own, and the WASI interfaces every component toolchain's runtime
/// imports, granted nothing (no directories, no sockets, no environment).
const PROVIDED_PACKAGES: [&str; 7] = [
    "arges:plugin/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:io/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// What [`PluginError::UnprovidedImports`] tells the author to do.
pub const PROVIDED_IMPORTS_HELP: &str = "This appliance speaks arges:plugin 0.1.x. \
A plugin may import arges:plugin/log and \
arges:plugin/config (a bmc-driver also arges:plugin/ipmi and arges:plugin/http, to its own \
BMC), and wasi:cli, wasi:clocks, wasi:random, wasi:io, \
wasi:filesystem (no directories) and wasi:sockets (every connection refused); anything \
else (wasi:http, …) is refused. Build without it: for JavaScript, \
`componentize-js --disable http fetch-event` (the starter of `arges plugin new --lang js` \
does); for Rust, drop the crate that pulls it in (a wasi-http client); \
`wasm-tools component wit FILE` lists what a component imports.";

/// The component's imports the host does not provide at all: another package's, or
/// this contract's at a minor version it does not speak.
fn unprovided_imports(engine: &Engine, component: &Component) -> Vec<String> {
    let speaks = super::CONTRACT_VERSION
        .rsplit_once('.')
        .map_or(super::CONTRACT_VERSION, |(minor, _)| minor);
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| {
            let provided = PROVIDED_PACKAGES.iter().any(|p| name.starts_with(p));
            let other_version = name.starts_with("arges:plugin/")
                && name
                    .split_once('@')
                    .is_some_and(|(_, v)| !v.starts_with(&format!("{speaks}.")));
            !provided || other_version
        })
        .map(String::from)
        .collect()
}

/// The version of the first `arges:plugin` interface the component imports.
fn contract_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .find_map(|(name, _)| name.strip_prefix("arges:plugin/")?.split_once('@'))
        .map(|(_, version)| version.to_string())
}

/// Names what a component exports, for "wrong world" errors.
fn describe(engine: &Engine, component: &Component) -> String {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    let imports: Vec<&str> = ty.imports(engine).map(|(n, _)| n).collect();
    format!(
        "it exports [{}] and imports [{}]",
        exports.join(", "),
        imports.join(", ")
    )
}

/// Loads the plugin at `path` (blocking: reads and may compile).
pub fn load(
    engine: &Engine,
    linker: &Linker<PluginState>,
    settings: &PluginsConfig,
    path: &Path,
) -> Result<Plugin, PluginError> {
    let started = Instant::now();
    let name = plugin_name(path)?;
    let io = |source| PluginError::Io {
        path: path.display().to_string(),
        source,
    };
    let stamp = FileStamp::of(path).map_err(io)?;
    let bytes = std::fs::read(path).map_err(io)?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if let Some(pin) = settings.pins.get(&name)
        && *pin != sha
    {
        return Err(PluginError::PinMismatch {
            plugin: name,
            expected: pin.clone(),
            actual: sha,
        });
    }
    let (component, from_cache) = compile_cached(engine, settings, &sha, &bytes, &name)?;
    let wrong = |e: wasmtime::Error| PluginError::WrongWorld {
        plugin: name.clone(),
        message: format!("{e:#}; {}", describe(engine, &component)),
    };
    let pre = linker.instantiate_pre(&component).map_err(|e| {
        let imports = unprovided_imports(engine, &component);
        if imports.is_empty() {
            wrong(e)
        } else {
            PluginError::UnprovidedImports {
                plugin: name.clone(),
                imports,
            }
        }
    })?;
    // A boot policy exports `decide`; a driver exports `probe`.
    let entry = match BootPolicyPre::new(pre.clone()) {
        Ok(p) => Entry::Policy(p),
        Err(policy) => match BmcDriverPre::new(pre) {
            Ok(d) => Entry::Driver(d),
            Err(driver) => {
                return Err(PluginError::WrongWorld {
                    plugin: name.clone(),
                    message: format!(
                        "as a boot-policy: {policy:#}; as a bmc-driver: {driver:#}; {}",
                        describe(engine, &component)
                    ),
                });
            }
        },
    };
    Ok(Plugin {
        config: Arc::new(settings.config.get(&name).cloned().unwrap_or_default()),
        name: name.into(),
        path: path.to_path_buf(),
        sha256: sha,
        stamp,
        from_cache,
        load_time: started.elapsed(),
        contract: contract_version(engine, &component),
        entry,
        permits: Arc::new(Semaphore::new(settings.max_instances as usize)),
        idle: std::sync::Mutex::new(Vec::new()),
    })
}
