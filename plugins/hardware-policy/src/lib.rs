//! `hardware-policy`: picks the environment of an accepted machine from what it *is*, so a
//! rack of mixed hardware provisions itself without per-machine settings.
//!
//! Config (`[plugins.config.hardware-policy]`): `rules`, an array of tables tried in order;
//! the first whose every given condition holds wins:
//!
//! ```toml
//! [[plugins.config.hardware-policy.rules]]
//! environment = "storage"
//! vendor = "Supermicro"          # exact SMBIOS vendor
//! product_contains = "SSG"       # substring of the product name
//! min_memory_gb = 128
//! min_cpus = 16
//! min_disks = 8
//! labels = { rack = "r7" }       # every label must match
//! ```
//!
//! Machines that are not registered, not accepted, cordoned, or already given an
//! environment by the operator are left to the next policy (`pass`), as are machines no
//! rule matches.

wit_bindgen::generate!({ path: "../../wit", world: "boot-policy" });

use std::collections::BTreeMap;

use arges::plugin::config;
use arges::plugin::log::{Level, log};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    environment: String,
    vendor: Option<String>,
    product_contains: Option<String>,
    min_memory_gb: Option<u64>,
    min_cpus: Option<u32>,
    min_disks: Option<u32>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Rule {
    fn matches(&self, f: &MachineFacts) -> bool {
        let hw = &f.hardware;
        self.vendor.as_ref().is_none_or(|v| *v == hw.vendor)
            && self
                .product_contains
                .as_ref()
                .is_none_or(|p| hw.product.contains(p.as_str()))
            && self
                .min_memory_gb
                .is_none_or(|g| hw.memory_bytes >= g << 30)
            && self.min_cpus.is_none_or(|c| hw.cpus >= c)
            && self.min_disks.is_none_or(|d| hw.disks >= d)
            && self
                .labels
                .iter()
                .all(|(k, v)| f.inventory.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

struct HardwarePolicy;

impl Guest for HardwarePolicy {
    fn decide(facts: MachineFacts) -> Result<BootAction, String> {
        let inv = &facts.inventory;
        if !inv.registered || !inv.accepted || inv.cordoned || inv.environment.is_some() {
            return Ok(BootAction::Pass);
        }
        let rules: Vec<Rule> = match config::get("rules") {
            Some(json) => {
                serde_json::from_str(&json).map_err(|e| format!("config key rules: {e}"))?
            }
            None => return Ok(BootAction::Pass),
        };
        match rules.iter().find(|r| r.matches(&facts)) {
            Some(rule) => {
                log(
                    Level::Info,
                    &format!(
                        "{} matches the rule for {}",
                        inv.server_id.as_deref().unwrap_or("?"),
                        rule.environment
                    ),
                );
                Ok(BootAction::Environment(rule.environment.clone()))
            }
            None => Ok(BootAction::Pass),
        }
    }
}

export!(HardwarePolicy);
