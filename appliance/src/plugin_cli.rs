//! `arges plugin check|decide`: load a plugin outside the appliance and try it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arges::config::PluginsConfig;
use arges::core::MachineFacts;
use arges::metrics::Metrics;
use arges::plugins::{Plugin, PluginHost};

use crate::cli::PluginCommand;

fn host(
    file: &Path,
    config: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(Arc<PluginHost>, Plugin)> {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let cache = std::env::temp_dir().join("arges-plugin-cache");
    let mut settings = PluginsConfig::with_defaults(dir, cache);
    settings.timeout = timeout;
    if let Ok(name) = arges::plugins::loader::plugin_name(file) {
        settings.config.insert(name, config);
    }
    let host = PluginHost::new(settings, Arc::new(Metrics::new()))?;
    let plugin = host.load_file(file)?;
    Ok((host, plugin))
}

/// Runs a `plugin` subcommand.
pub async fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::Check { file } => {
            let (_host, p) = tokio::task::spawn_blocking(move || {
                host(&file, Vec::new(), Duration::from_secs(1))
            })
            .await??;
            println!("{}: ok", p.path.display());
            println!("  name:    {}", p.name);
            println!(
                "  world:   arges:plugin/{}@0.1.0 ({})",
                p.world(),
                if p.is_policy() {
                    "exports decide"
                } else {
                    "exports probe, power-state, set-power, set-boot-device, boot-device"
                }
            );
            println!("  sha256:  {}", p.sha256);
            println!(
                "  loaded:  {:?}{}",
                p.load_time,
                if p.from_cache {
                    " (compiled earlier, from cache)"
                } else {
                    " (compiled)"
                }
            );
            Ok(())
        }
        PluginCommand::Decide {
            file,
            facts,
            config,
            timeout_ms,
        } => {
            let facts: MachineFacts = serde_json::from_slice(
                &std::fs::read(&facts)
                    .with_context(|| format!("cannot read {}", facts.display()))?,
            )
            .with_context(|| format!("{} is not machine facts", facts.display()))?;
            let config = config
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--config {kv:?} is not KEY=VALUE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let (host, plugin) = tokio::task::spawn_blocking(move || {
                host(&file, config, Duration::from_millis(timeout_ms))
            })
            .await??;
            // The first call pays for instantiating; time a second one as well.
            let started = Instant::now();
            let first = host.decide(&plugin, &facts).await;
            let cold = started.elapsed();
            let started = Instant::now();
            let _ = host.decide(&plugin, &facts).await;
            let warm = started.elapsed();
            let decision = first?;
            let out = serde_json::json!({
                "plugin": &*plugin.name,
                "decision": decision.map(|a| serde_json::to_value(a).unwrap_or_default()).unwrap_or(serde_json::json!({"action": "pass"})),
                "first_call_us": cold.as_micros(),
                "second_call_us": warm.as_micros(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}
