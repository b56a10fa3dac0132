//! `{{name}}`: an Arges boot policy. The appliance asks it how each booting machine
//! boots; the contract, with what the host provides and its limits, is wit/plugin.wit.
//!
//! Config (`[plugins.config.{{name}}]` in appliance.toml): `environment`, the
//! environment accepted machines boot.

wit_bindgen::generate!({ path: "wit", world: "boot-policy" });

use arges::plugin::config;
use arges::plugin::log::{Level, log};

struct Policy;

impl Guest for Policy {
    fn decide(facts: MachineFacts) -> Result<BootAction, String> {
        let label = |key: &str| {
            facts
                .inventory
                .labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if label("quarantine") == Some("true") {
            log(
                Level::Warn,
                &format!("refusing {:?}: quarantined", facts.mac),
            );
            // Shown on the machine's console as written.
            return Ok(BootAction::Deny(
                "quarantined (label quarantine=true): ask the operator".into(),
            ));
        }
        // A machine that has not registered has no hardware facts yet (all zero): a rule
        // on its disks or memory would refuse every new machine. Let it discover.
        if !facts.inventory.registered {
            return Ok(BootAction::Pass);
        }
        let inv = &facts.inventory;
        match config::get("environment") {
            Some(env) if !env.is_empty() && inv.accepted && !inv.cordoned => {
                Ok(BootAction::Environment(env))
            }
            // No opinion: the next plugin in the chain decides, or the built-in policy.
            _ => Ok(BootAction::Pass),
        }
    }
}

export!(Policy);
