//! `arges plugin check|decide|test|new`: a plugin author's tools. Load a plugin outside
//! the appliance and say what it is (or exactly why it cannot be used), try one decision,
//! run a table of cases, or start a new plugin project from a starter.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arges::config::PluginsConfig;
use arges::core::MachineFacts;
use arges::metrics::Metrics;
use arges::plugins::{Plugin, PluginHost};

use crate::cli::PluginCommand;

mod cases;
mod facts;
mod starters;

/// A host for one plugin file, with `config` as its table.
fn host(
    file: &Path,
    config: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(Arc<PluginHost>, Plugin)> {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut settings = PluginsConfig::with_defaults(dir, own_cache()?);
    settings.timeout = timeout;
    if let Ok(name) = arges::plugins::loader::plugin_name(file) {
        settings.config.insert(name, config);
    }
    let host = PluginHost::new(settings, Arc::new(Metrics::new()))?;
    let plugin = host.load_file(file)?;
    Ok((host, plugin))
}

/// The user's own compile cache (`$XDG_CACHE_HOME/arges/plugin-cache`, else under
/// `~/.cache`), in a folder only they may write: the key that signs compiled plugins
/// lives beside it, and a shared temporary folder would let another user plant both.
fn own_cache() -> Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .context(
            "neither XDG_CACHE_HOME nor HOME is set: no folder for the plugin compile cache",
        )?;
    let root = base.join("arges");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .with_context(|| format!("cannot create {}", root.display()))?;
    let meta =
        std::fs::metadata(&root).with_context(|| format!("cannot read {}", root.display()))?;
    // SAFETY: geteuid(2) reads this process's effective user id; it cannot fail.
    let me = unsafe { libc::geteuid() };
    anyhow::ensure!(
        meta.uid() == me && meta.permissions().mode() & 0o022 == 0,
        "{} is not this user's own folder (owner {}, mode {:o}): not keeping compiled plugins there",
        root.display(),
        meta.uid(),
        meta.permissions().mode() & 0o777
    );
    Ok(root.join("plugin-cache"))
}

/// `--config KEY=VALUE` flags as the plugin's table entries.
fn config_flags(flags: &[String]) -> Result<Vec<(String, String)>> {
    flags
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--config {kv:?} is not KEY=VALUE"))
        })
        .collect()
}

async fn load(
    file: std::path::PathBuf,
    config: Vec<(String, String)>,
    timeout: Duration,
) -> Result<(Arc<PluginHost>, Plugin)> {
    tokio::task::spawn_blocking(move || host(&file, config, timeout)).await?
}

/// Runs a `plugin` subcommand.
pub async fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::Check { file } => check(file).await,
        PluginCommand::Decide {
            file,
            facts,
            config,
            timeout_ms,
        } => {
            let facts = facts::read_document::<facts::FactsFile>(&facts)?.into_facts();
            let (host, plugin) = load(
                file,
                config_flags(&config)?,
                Duration::from_millis(timeout_ms),
            )
            .await?;
            decide(&host, &plugin, &facts).await
        }
        PluginCommand::Test {
            file,
            cases,
            config,
            timeout_ms,
        } => test(&file, &cases, &config, timeout_ms).await,
        PluginCommand::New { name, lang, dir } => {
            let dir = dir.unwrap_or_else(|| name.clone().into());
            let written = starters::write(&name, lang, &dir)?;
            println!("{}: a {lang} boot policy named {name}", dir.display());
            for f in &written {
                println!("  {}", f.display());
            }
            println!(
                "Build it with `cd {} && ./build.sh` (see its README.md), then try it with\n  arges plugin test {name}.wasm --cases cases.yaml",
                dir.display()
            );
            Ok(())
        }
    }
}

async fn check(file: std::path::PathBuf) -> Result<()> {
    let (_host, p) = load(file, Vec::new(), Duration::from_secs(1)).await?;
    println!("{}: ok", p.path.display());
    println!(
        "  name:    {} (its config table: [plugins.config.{}])",
        p.name, p.name
    );
    println!(
        "  world:   arges:plugin/{}@{} ({}; this appliance speaks {})",
        p.world(),
        p.contract
            .as_deref()
            .unwrap_or(arges::plugins::CONTRACT_VERSION),
        if p.is_policy() {
            "exports decide"
        } else {
            "exports probe, power-state, set-power, set-boot-device, boot-device"
        },
        arges::plugins::CONTRACT_VERSION,
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

async fn decide(host: &PluginHost, plugin: &Plugin, facts: &MachineFacts) -> Result<()> {
    // The first call pays for instantiating; time a second one as well.
    let started = Instant::now();
    let first = host.decide(plugin, facts).await;
    let cold = started.elapsed();
    eprintln!("(a second call times a warm instance: the plugin's log lines show once per call)");
    let started = Instant::now();
    let _ = host.decide(plugin, facts).await;
    let warm = started.elapsed();
    let decision = first?;
    let out = serde_json::json!({
        "plugin": &*plugin.name,
        "decision": decision
            .map(|a| serde_json::to_value(a).unwrap_or_default())
            .unwrap_or(serde_json::json!({"action": "pass"})),
        "first_call_us": cold.as_micros(),
        "second_call_us": warm.as_micros(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn test(file: &Path, cases_file: &Path, config: &[String], timeout_ms: u64) -> Result<()> {
    let cases: cases::CasesFile = facts::read_document(cases_file)?;
    // The file's table, then the flags over it.
    let mut table = arges::config::plugin_table(&cases.config);
    for (k, v) in config_flags(config)? {
        table.retain(|(key, _)| *key != k);
        table.push((k, v));
    }
    table.sort();
    let checked = cases
        .cases
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c.name.unwrap_or_else(|| format!("case {}", i + 1));
            c.expect
                .check()
                .map(|e| (name.clone(), c.facts.into_facts(), e))
                .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", cases_file.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    if checked.is_empty() {
        anyhow::bail!("{}: no cases", cases_file.display());
    }
    let (host, plugin) = load(file.to_path_buf(), table, Duration::from_millis(timeout_ms)).await?;
    let (mut passed, mut failed) = (0, 0);
    for (i, (name, facts, expect)) in checked.iter().enumerate() {
        let started = Instant::now();
        let outcome = host.decide(&plugin, facts).await.map_err(|e| e.to_string());
        let took = started.elapsed();
        let first = if i == 0 { ", instantiating" } else { "" };
        let got = cases::describe(&outcome);
        if expect.holds(&outcome) {
            passed += 1;
            println!(
                "ok    {name}: {got} ({:.3} ms{first})",
                took.as_secs_f64() * 1e3
            );
        } else {
            failed += 1;
            println!(
                "FAIL  {name}: {got}, expected {} ({:.3} ms{first})",
                expect.words(),
                took.as_secs_f64() * 1e3
            );
        }
    }
    println!(
        "{} cases: {passed} passed, {failed} failed",
        passed + failed
    );
    if failed > 0 {
        anyhow::bail!("{failed} of {} cases failed", passed + failed);
    }
    Ok(())
}
