//! `arges:plugin/log`: plugin lines go to the appliance's log, tagged with the plugin's
//! name, cut at 4 KiB and limited per call so a chatty plugin cannot flood the log.

use super::{LOG_LINES_PER_CALL, PluginState};
use crate::plugins::bindings::arges::plugin::log::{Host, Level};

const MAX_LINE: usize = 4096;

impl Host for PluginState {
    fn log(&mut self, level: Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > LOG_LINES_PER_CALL {
            if self.log_lines == LOG_LINES_PER_CALL + 1 {
                tracing::warn!(plugin = %self.plugin, "plugin logs too much; dropping its further lines for this call");
            }
            return;
        }
        let mut end = message.len().min(MAX_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let line = &message[..end];
        match level {
            Level::Debug => tracing::debug!(plugin = %self.plugin, "{line}"),
            Level::Info => tracing::info!(plugin = %self.plugin, "{line}"),
            Level::Warn => tracing::warn!(plugin = %self.plugin, "{line}"),
            Level::Error => tracing::error!(plugin = %self.plugin, "{line}"),
        }
    }
}
