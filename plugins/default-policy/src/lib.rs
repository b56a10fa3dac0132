//! `default-policy`: what the appliance does with no plugins, as a plugin. Start here when
//! writing your own: copy this crate, change `decide`, build with
//! `cargo build --release --target wasm32-wasip2`, and drop the `.wasm` into the plugins
//! folder.
//!
//! Config (`[plugins.config.default-policy]` in appliance.toml), the same keys as the
//! built-in `[policy]`: `unaccepted` (`local-disk` or `discover`) and `default_environment`.

wit_bindgen::generate!({ path: "../../wit", world: "boot-policy" });

use arges::plugin::config;

struct DefaultPolicy;

impl Guest for DefaultPolicy {
    fn decide(facts: MachineFacts) -> Result<BootAction, String> {
        let inv = &facts.inventory;
        if !inv.registered {
            return Ok(BootAction::Discover);
        }
        if inv.cordoned {
            return Ok(BootAction::LocalDisk);
        }
        if !inv.accepted {
            return Ok(match config::get("unaccepted").as_deref() {
                Some("discover") => BootAction::Discover,
                _ => BootAction::LocalDisk,
            });
        }
        match inv
            .environment
            .clone()
            .or_else(|| config::get("default_environment"))
        {
            Some(env) => Ok(BootAction::Environment(env)),
            None => Ok(BootAction::LocalDisk),
        }
    }
}

export!(DefaultPolicy);
