//! What a plugin's store holds, and the host side of each imported WIT interface (one file
//! per interface). The store's state is also its resource limiter: the memory cap is
//! enforced here and remembered, so a denied allocation is reported as `memory`, not as
//! the generic trap the guest turns it into.

mod config;
mod http;
mod ipmi;
mod log;

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Lines one call may log before the rest are dropped.
pub const LOG_LINES_PER_CALL: u32 = 100;

/// A plugin store's data.
pub struct PluginState {
    pub(crate) plugin: Arc<str>,
    pub(crate) config: Arc<Vec<(String, String)>>,
    wasi: WasiCtx,
    table: ResourceTable,
    memory_cap: usize,
    pub(crate) memory_denied: bool,
    pub(crate) log_lines: u32,
    /// The BMC a bmc-driver call talks to (none for boot policies).
    pub(crate) link: Option<crate::bmc::link::BmcLink>,
    /// Time spent waiting on the BMC in host calls, in epoch ticks, not yet added back to
    /// the deadline: a driver's deadline bounds its own work, the transports bound theirs.
    pub(crate) host_ticks: u64,
}

impl PluginState {
    /// A fresh state: WASI with nothing granted (no files, no sockets, no environment).
    pub fn new(plugin: Arc<str>, config: Arc<Vec<(String, String)>>, memory_cap: usize) -> Self {
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            plugin,
            config,
            wasi,
            table: ResourceTable::new(),
            memory_cap,
            memory_denied: false,
            log_lines: 0,
            link: None,
            host_ticks: 0,
        }
    }
}

impl PluginState {
    /// Counts time a host call spent on the BMC (see `host_ticks`).
    pub(crate) fn waited(&mut self, since: std::time::Instant) {
        self.host_ticks += super::ticks(since.elapsed());
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for PluginState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_cap;
        self.memory_denied |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        8
    }
}

// The `types` and `bmc` interfaces only carry types; their (empty) host traits still
// need an impl.
impl crate::plugins::bindings::arges::plugin::types::Host for PluginState {}
impl crate::plugins::bindings::driver::arges::plugin::bmc::Host for PluginState {}
