//! The plugin host's engine: the wasmtime `Engine` and linker, per-call sandboxes
//! (deadline, memory cap, instance cap), failure classification, warm instances, and
//! [`PolicyChain`], the boot policy the core asks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::bindings::arges::plugin::types as wit;
use super::config::PluginsConfig;
use super::host::PluginState;
use super::{FileStamp, Plugin, bindings, loader};
use crate::core::{
    BootAction, BootPolicy, Decision, DecisionBy, DefaultPolicy, MachineFacts, PolicyError,
};
use crate::metrics::Metrics;

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(1);
/// `d` in epoch ticks.
pub(super) fn ticks(d: Duration) -> u64 {
    (d.as_micros() / TICK.as_micros()) as u64
}

/// Largest script a plugin may return.
const MAX_SCRIPT: usize = 64 << 10;
/// Longest deny reason a plugin may return.
const MAX_REASON: usize = 1024;
/// Idle instances kept per plugin for reuse.
const MAX_IDLE: usize = 4;
/// Calls one instance serves before it is replaced by a fresh one, so whatever a plugin
/// accumulates in its memory is bounded.
const MAX_USES: u32 = 10_000;

/// Plugin failures; each variant is a metric label.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: a plugin file name may only hold letters, digits, - and _ before .wasm")]
    Name(String),
    #[error("plugin {plugin}: sha256 is {actual}, but the config pins {expected}")]
    PinMismatch {
        plugin: String,
        expected: String,
        actual: String,
    },
    #[error("plugin {plugin}: not a WebAssembly component: {message}")]
    Invalid { plugin: String, message: String },
    #[error(
        "plugin {plugin}: not an arges:plugin@{} boot-policy or bmc-driver: {message}",
        super::CONTRACT_VERSION
    )]
    WrongWorld { plugin: String, message: String },
    #[error(
        "plugin {plugin}: imports {}, which the host does not provide. {}",
        imports.join(", "),
        super::loader::PROVIDED_IMPORTS_HELP
    )]
    UnprovidedImports {
        plugin: String,
        imports: Vec<String>,
    },
    #[error("plugin {plugin}: ran past its deadline of {deadline:?}")]
    Timeout { plugin: String, deadline: Duration },
    #[error("plugin {plugin}: exceeded its memory cap of {cap} bytes")]
    Memory { plugin: String, cap: u64 },
    #[error("plugin {plugin}: trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin {plugin}: returned an error: {message}")]
    Refused { plugin: String, message: String },
    #[error("plugin {plugin}: returned a malformed answer: {message}")]
    Malformed { plugin: String, message: String },
    #[error("plugin {plugin}: all {max} instances busy")]
    Busy { plugin: String, max: u32 },
    #[error("plugin engine: {0}")]
    Engine(String),
}

impl PluginError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Io { .. } => "io",
            PluginError::Name(_) => "name",
            PluginError::PinMismatch { .. } => "pin_mismatch",
            PluginError::Invalid { .. } => "invalid",
            PluginError::WrongWorld { .. } => "wrong_world",
            PluginError::UnprovidedImports { .. } => "unprovided_imports",
            PluginError::Timeout { .. } => "timeout",
            PluginError::Memory { .. } => "memory",
            PluginError::Trap { .. } => "trap",
            PluginError::Refused { .. } => "refused",
            PluginError::Malformed { .. } => "malformed",
            PluginError::Busy { .. } => "busy",
            PluginError::Engine(_) => "engine",
        }
    }
}

/// Advances the engine's epoch from an OS thread until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("arges-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the plugin epoch thread: plugin deadlines rely on the tokio timeout alone");
        }
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The plugin host: one engine, one linker, the loaded plugins.
pub struct PluginHost {
    pub(super) engine: Engine,
    pub(super) linker: Linker<PluginState>,
    pub(super) settings: PluginsConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) plugins: RwLock<Arc<Vec<Arc<Plugin>>>>,
    /// Files that failed to load, so an unchanged broken file is not recompiled each scan.
    pub(super) failed: Mutex<HashMap<String, FileStamp>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.settings.dir)
            .finish_non_exhaustive()
    }
}

fn engine_config(settings: &PluginsConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true).wasm_component_model(true);
    if pooling {
        let mut p = PoolingAllocationConfig::default();
        p.total_component_instances(512)
            .total_core_instances(2048)
            .total_memories(512)
            .total_tables(2048)
            .max_memory_size(settings.memory_bytes as usize)
            .table_elements(100_000)
            .max_core_instance_size(16 << 20)
            .max_component_instance_size(16 << 20)
            .max_memories_per_component(16)
            .max_tables_per_component(64)
            .max_core_instances_per_component(256);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

impl PluginHost {
    /// Creates the host (no plugins loaded yet: call [`PluginHost::rescan`]).
    pub fn new(settings: PluginsConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, PluginError> {
        let engine = match Engine::new(&engine_config(&settings, settings.pooling)) {
            Ok(e) => e,
            Err(e) if settings.pooling => {
                tracing::warn!(error = %e, "pooling allocator unavailable; instantiating on demand");
                Engine::new(&engine_config(&settings, false))
                    .map_err(|e| PluginError::Engine(format!("{e:#}")))?
            }
            Err(e) => return Err(PluginError::Engine(format!("{e:#}"))),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::BootPolicy::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        // The driver world shares `log` and `config`; add only what it has beside them.
        {
            use bindings::driver::arges::plugin as d;
            d::bmc::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
                .and_then(|()| {
                    d::ipmi::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
                })
                .and_then(|()| {
                    d::http::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)
                })
                .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        }
        let ticker = EpochTicker::start(engine.clone());
        Ok(Arc::new(PluginHost {
            engine,
            linker,
            settings,
            metrics,
            plugins: RwLock::new(Arc::new(Vec::new())),
            failed: Mutex::new(HashMap::new()),
            _ticker: ticker,
        }))
    }

    /// The plugin settings.
    pub fn settings(&self) -> &PluginsConfig {
        &self.settings
    }

    /// The plugins in chain order.
    pub fn plugins(&self) -> Arc<Vec<Arc<Plugin>>> {
        Arc::clone(&self.plugins.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Loads one file (blocking), outside the chain: for `arges plugin check|decide`.
    pub fn load_file(&self, path: &std::path::Path) -> Result<Plugin, PluginError> {
        loader::load(&self.engine, &self.linker, &self.settings, path)
    }

    /// Runs `plugin` for `facts`. `Ok(None)` is the plugin's "pass".
    pub async fn decide(
        &self,
        plugin: &Plugin,
        facts: &MachineFacts,
    ) -> Result<Option<BootAction>, PluginError> {
        let started = Instant::now();
        let result = self.decide_inner(plugin, facts).await;
        let label = match &result {
            Ok(Some(_)) => "decided",
            Ok(None) => "pass",
            Err(e) => e.kind(),
        };
        self.metrics
            .plugin_call(&plugin.name, label, started.elapsed());
        result
    }

    async fn decide_inner(
        &self,
        plugin: &Plugin,
        facts: &MachineFacts,
    ) -> Result<Option<BootAction>, PluginError> {
        let deadline = self.settings.timeout;
        let name = || plugin.name.to_string();
        let Some(_permit) = plugin.permit(deadline).await else {
            return Err(PluginError::Busy {
                plugin: name(),
                max: self.settings.max_instances,
            });
        };
        let loader::Entry::Policy(pre) = &plugin.entry else {
            return Err(PluginError::WrongWorld {
                plugin: name(),
                message: "it is a bmc-driver, not a boot-policy".into(),
            });
        };
        let idle = plugin.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut store, instance, uses) = match idle {
            Some(warm) => (warm.store, Some(warm.instance), warm.uses),
            None => (self.new_store(plugin), None, 0),
        };
        store.data_mut().log_lines = 0;
        store.set_epoch_deadline(ticks(deadline).max(1));
        let wit_facts = to_wit(facts);
        let outcome = {
            let call = async {
                let instance = match instance {
                    Some(i) => i,
                    None => pre.instantiate_async(&mut store).await?,
                };
                let answer = instance.call_decide(&mut store, &wit_facts).await?;
                Ok::<_, wasmtime::Error>((instance, answer))
            };
            // The epoch stops guest code; this also bounds time spent in host calls.
            tokio::time::timeout(deadline * 2 + Duration::from_millis(100), call).await
        };
        let answer = match outcome {
            Err(_) => {
                return Err(PluginError::Timeout {
                    plugin: name(),
                    deadline,
                });
            }
            Ok(Err(e)) => return Err(self.classify(plugin, &store, e, deadline)),
            Ok(Ok((instance, answer))) => {
                // The instance came through a whole call: keep it for the next one. One
                // that trapped or ran out of time is never entered again.
                if self.settings.reuse_instances && uses + 1 < MAX_USES {
                    let mut pool = plugin.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if pool.len() < MAX_IDLE {
                        pool.push(loader::WarmSlot {
                            store,
                            instance,
                            uses: uses + 1,
                        });
                    }
                }
                answer
            }
        };
        interpret(&plugin.name, answer)
    }

    /// A fresh store for `plugin`: its state, the memory limiter, traps at the deadline.
    pub(super) fn new_store(&self, plugin: &Plugin) -> Store<PluginState> {
        let state = PluginState::new(
            Arc::clone(&plugin.name),
            Arc::clone(&plugin.config),
            self.settings.memory_bytes as usize,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.epoch_deadline_trap();
        store
    }

    pub(super) fn classify(
        &self,
        plugin: &Plugin,
        store: &Store<PluginState>,
        e: wasmtime::Error,
        deadline: Duration,
    ) -> PluginError {
        let plugin_name = plugin.name.to_string();
        if store.data().memory_denied {
            PluginError::Memory {
                plugin: plugin_name,
                cap: self.settings.memory_bytes,
            }
        } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            PluginError::Timeout {
                plugin: plugin_name,
                deadline,
            }
        } else {
            tracing::debug!(plugin = %plugin.name, error = ?e, "plugin trap in full");
            // The trap's own description; the wasm backtrace stays in the debug log.
            let message = match e.downcast_ref::<Trap>() {
                Some(trap) => trap.to_string(),
                None => truncate(e.root_cause().to_string(), 2048),
            };
            PluginError::Trap {
                plugin: plugin_name,
                message,
            }
        }
    }

    /// An instance kept for repeated calls with no deadline, for benchmarks: the cost of
    /// a decision alone, without the host's per-call bookkeeping.
    pub async fn warm_instance(&self, plugin: &Plugin) -> Result<WarmInstance, PluginError> {
        let loader::Entry::Policy(pre) = &plugin.entry else {
            return Err(PluginError::WrongWorld {
                plugin: plugin.name.to_string(),
                message: "it is a bmc-driver, not a boot-policy".into(),
            });
        };
        let mut store = self.new_store(plugin);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| PluginError::Trap {
                plugin: plugin.name.to_string(),
                message: format!("{e:#}"),
            })?;
        Ok(WarmInstance {
            store,
            instance,
            name: plugin.name.to_string(),
        })
    }

    /// A boot policy that asks the loaded plugins in order, then the built-in policy.
    pub fn chain(self: &Arc<Self>, builtin: DefaultPolicy) -> PolicyChain {
        PolicyChain {
            host: Arc::clone(self),
            builtin,
        }
    }
}

pub(super) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn to_wit(f: &MachineFacts) -> wit::MachineFacts {
    wit::MachineFacts {
        uuid: f.uuid.clone(),
        mac: f.mac.clone(),
        arch: f.arch.clone(),
        client_address: f.client_address.to_string(),
        inventory: wit::InventoryFacts {
            registered: f.inventory.registered,
            server_id: f.inventory.server_id.clone(),
            accepted: f.inventory.accepted,
            cordoned: f.inventory.cordoned,
            environment: f.inventory.environment.clone(),
            labels: f
                .inventory
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        },
        hardware: wit::HardwareSummary {
            vendor: f.hardware.vendor.clone(),
            product: f.hardware.product.clone(),
            cpus: f.hardware.cpus,
            memory_bytes: f.hardware.memory_bytes,
            disks: f.hardware.disks,
            nics: f.hardware.nics,
        },
    }
}

/// Reads a plugin's answer: its own error, or an action that must pass [`from_wit`].
fn interpret(
    plugin: &str,
    answer: Result<wit::BootAction, String>,
) -> Result<Option<BootAction>, PluginError> {
    match answer {
        Err(message) => Err(PluginError::Refused {
            plugin: plugin.to_string(),
            message: truncate(message, MAX_REASON),
        }),
        Ok(action) => from_wit(action).map_err(|message| PluginError::Malformed {
            plugin: plugin.to_string(),
            message,
        }),
    }
}

/// Checks a plugin's answer; `None` is "pass".
fn from_wit(a: wit::BootAction) -> Result<Option<BootAction>, String> {
    Ok(Some(match a {
        wit::BootAction::Pass => return Ok(None),
        wit::BootAction::Discover => BootAction::Discover,
        wit::BootAction::LocalDisk => BootAction::LocalDisk,
        wit::BootAction::Wipe => BootAction::Wipe,
        wit::BootAction::Environment(name) => {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(format!(
                    "environment name {:?} is not a valid name",
                    truncate(name, 80)
                ));
            }
            BootAction::Environment(name)
        }
        wit::BootAction::Script(s) => {
            if s.len() > MAX_SCRIPT {
                return Err(format!(
                    "script of {} bytes is over the {MAX_SCRIPT}-byte limit",
                    s.len()
                ));
            }
            BootAction::Script(s)
        }
        wit::BootAction::Deny(r) => {
            if r.len() > MAX_REASON {
                return Err(format!(
                    "deny reason of {} bytes is over the {MAX_REASON}-byte limit",
                    r.len()
                ));
            }
            BootAction::Deny(r)
        }
    }))
}

/// A plugin instance kept across calls (see [`PluginHost::warm_instance`]).
pub struct WarmInstance {
    store: Store<PluginState>,
    instance: bindings::BootPolicy,
    name: String,
}

impl WarmInstance {
    /// One decision on the kept instance.
    pub async fn decide(
        &mut self,
        facts: &MachineFacts,
    ) -> Result<Option<BootAction>, PluginError> {
        self.store.data_mut().log_lines = 0;
        let plugin = self.name.clone();
        match self
            .instance
            .call_decide(&mut self.store, &to_wit(facts))
            .await
        {
            Ok(answer) => interpret(&plugin, answer),
            Err(e) => Err(PluginError::Trap {
                plugin,
                message: format!("{e:#}"),
            }),
        }
    }
}

/// Asks each plugin in turn; the first that decides wins. All passing, the built-in policy
/// decides. A failing plugin ends the chain with an error, on which the core uses the
/// built-in decision: a broken security plugin must not let later ones allow a boot. A
/// plugin the config names fail-closed (`[plugins] fail_closed`) denies the boot instead:
/// a deny list pushed past its deadline by a flood must not let a quarantined machine in.
pub struct PolicyChain {
    host: Arc<PluginHost>,
    builtin: DefaultPolicy,
}

impl BootPolicy for PolicyChain {
    fn name(&self) -> &str {
        "plugins"
    }

    fn decide<'a>(&'a self, facts: &'a MachineFacts) -> Decision<'a> {
        Box::pin(async move { self.decide_by(facts).await.map(|(action, _)| action) })
    }

    fn decide_by<'a>(&'a self, facts: &'a MachineFacts) -> DecisionBy<'a> {
        Box::pin(async move {
            for plugin in self.host.plugins().iter().filter(|p| p.is_policy()) {
                match self.host.decide(plugin, facts).await {
                    Ok(Some(action)) => return Ok((action, plugin.name.to_string())),
                    Ok(None) => continue,
                    Err(e)
                        if self
                            .host
                            .settings()
                            .fail_closed
                            .iter()
                            .any(|n| **n == *plugin.name) =>
                    {
                        static GATE: crate::limits::LogGate =
                            crate::limits::LogGate::new(20, Duration::from_secs(60));
                        if let Some(held_back) = GATE.check() {
                            tracing::warn!(plugin = %plugin.name, kind = e.kind(), error = %e, held_back, "fail-closed boot policy failed; the boot is denied");
                        }
                        return Ok((
                            BootAction::Deny(format!(
                                "boot policy {} failed ({}); it is fail-closed, so this boot is denied",
                                plugin.name,
                                e.kind()
                            )),
                            format!("{} (fail-closed)", plugin.name),
                        ));
                    }
                    Err(e) => {
                        return Err(PolicyError {
                            policy: plugin.name.to_string(),
                            kind: e.kind(),
                            message: e.to_string(),
                        });
                    }
                }
            }
            // Every plugin passed.
            Ok((
                self.builtin.decide_now(facts),
                self.builtin.name().to_string(),
            ))
        })
    }
}
