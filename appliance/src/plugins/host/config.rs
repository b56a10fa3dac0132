//! `arges:plugin/config`: the plugin's own table from appliance.toml, read-only.

use super::PluginState;
use crate::plugins::bindings::arges::plugin::config::Host;

impl Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        self.config.as_ref().clone()
    }
}
