//! The WebAssembly plugin host: boot-policy and bmc-driver components run sandboxed
//! through wasmtime. Its `[plugins]` section ([`config`]) is built with or without the
//! host (the `plugins` feature); everything else needs it.
//!
//! Shaped like wasmtime's own embedder crates: bindings in [`bindings`], one host file per
//! WIT interface under `host/`, components pre-instantiated once ([`loader`]), the engine,
//! call sandbox and [`PolicyChain`] in `engine`, driver calls in `driver`. A call runs in
//! a store of its own, or in a warm instance's store reused after a clean call (below);
//! a driver call's store also holds the BMC link the host lends it. Every call runs under
//! a deadline (epoch interruption, ticked by a plain
//! OS thread so a spinning guest cannot starve it, plus a tokio timeout around the whole
//! call), a memory cap and an instance cap. Plugins get no filesystem, no sockets, no
//! environment. Any failure is classified ([`PluginError::kind`]), logged with the plugin's
//! name, counted in `/metrics`, and answered by the built-in policy: a plugin can never take
//! the appliance down or leave a machine unanswered.
//!
//! Instances are reused: a fresh one costs ~20 µs (instantiation, WASI context), a warm
//! call ~1 µs. An instance that completed a call goes back to a small idle pool (with a
//! fresh deadline and counters on its next call); one that trapped, timed out or hit its
//! memory cap is dropped, and each is replaced after a bounded number of calls.
//!
//! [`reload`] watches the plugins folder: an added, replaced or removed file takes effect
//! for the next request; a broken replacement keeps the last good version serving.

pub mod config;

/// The version of the contract (`wit/plugin.wit`) this host speaks. Components built
/// against any `0.1.x` load (wasmtime's linker matches semver-compatible versions).
pub const CONTRACT_VERSION: &str = "0.1.1";

#[cfg(feature = "plugins")]
pub mod bindings;
#[cfg(feature = "plugins")]
mod driver;
#[cfg(feature = "plugins")]
mod engine;
#[cfg(feature = "plugins")]
mod host;
#[cfg(feature = "plugins")]
pub mod loader;
#[cfg(feature = "plugins")]
pub mod reload;

#[cfg(feature = "plugins")]
pub use engine::{PluginError, PluginHost, PolicyChain, WarmInstance};
#[cfg(feature = "plugins")]
use engine::{ticks, truncate};
#[cfg(feature = "plugins")]
pub use host::PluginState;
#[cfg(feature = "plugins")]
pub use loader::{FileStamp, Plugin};

#[cfg(test)]
mod tests {
    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../../../wit/plugin.wit");
        let package = format!("\npackage arges:plugin@{};", super::CONTRACT_VERSION);
        assert!(
            wit.contains(&package),
            "wit/plugin.wit must declare{package}"
        );
        let (minor, _) = super::CONTRACT_VERSION.rsplit_once('.').unwrap();
        assert!(
            super::loader::PROVIDED_IMPORTS_HELP.contains(&format!("arges:plugin {minor}.x")),
            "the refusal names the version spoken"
        );
    }
}
