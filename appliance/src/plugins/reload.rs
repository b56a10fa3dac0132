//! Hot reload: the plugins folder is scanned on start, on every change inotify reports
//! (debounced), and every 30 s as a safety net. A changed file is loaded beside the old
//! version; only if it loads does it replace it, so a broken replacement keeps the last
//! good version serving and the log says why. A removed file is unloaded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use super::loader::{FileStamp, Plugin, plugin_name};
use super::{PluginError, PluginHost};

/// Events arriving within this window are handled by one scan.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A scan also runs this often, in case an event was lost.
const SAFETY_SCAN: Duration = Duration::from_secs(30);

/// What a scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub active: Vec<String>,
}

impl PluginHost {
    /// Scans the plugins folder and publishes the new chain (blocking: may compile).
    pub fn rescan(&self) -> ScanReport {
        let mut report = ScanReport::default();
        let current: HashMap<String, Arc<Plugin>> = self
            .plugins()
            .iter()
            .map(|p| (p.name.to_string(), Arc::clone(p)))
            .collect();
        let mut files: Vec<std::path::PathBuf> = match std::fs::read_dir(&self.settings.dir) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
                .collect(),
            Err(e) => {
                tracing::warn!(dir = %self.settings.dir.display(), error = %e, "cannot read the plugins folder");
                Vec::new()
            }
        };
        files.sort();
        let mut next: Vec<Arc<Plugin>> = Vec::new();
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        for path in files {
            let name = match plugin_name(&path) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "plugin file ignored");
                    report
                        .failed
                        .push((path.display().to_string(), e.to_string()));
                    continue;
                }
            };
            let Ok(stamp) = FileStamp::of(&path) else {
                continue;
            };
            if let Some(p) = current.get(&name).filter(|p| p.stamp == stamp) {
                next.push(Arc::clone(p));
                continue;
            }
            if failed.get(&name) == Some(&stamp) {
                // Unchanged since it last failed: keep whatever was serving.
                if let Some(p) = current.get(&name) {
                    next.push(Arc::clone(p));
                }
                continue;
            }
            match super::loader::load(&self.engine, &self.linker, &self.settings, &path) {
                Ok(p) => {
                    failed.remove(&name);
                    tracing::info!(plugin = %name, sha256 = %p.sha256, from_cache = p.from_cache, took = ?p.load_time, "plugin loaded");
                    self.metrics
                        .plugin_load(&name, if p.from_cache { "cached" } else { "compiled" });
                    report.loaded.push(name);
                    next.push(Arc::new(p));
                }
                Err(e) => {
                    failed.insert(name.clone(), stamp);
                    self.metrics.plugin_load(&name, e.kind());
                    match current.get(&name) {
                        Some(old) => {
                            tracing::error!(plugin = %name, error = %e, "plugin replacement does not load; keeping the last good version (sha256 {})", old.sha256);
                            next.push(Arc::clone(old));
                        }
                        None => tracing::error!(plugin = %name, error = %e, "plugin does not load"),
                    }
                    report.failed.push((name, e.to_string()));
                }
            }
        }
        drop(failed);
        for name in current.keys() {
            if !next.iter().any(|p| *p.name == **name) {
                tracing::info!(plugin = %name, "plugin removed");
                report.unloaded.push(name.clone());
            }
        }
        // The configured order first, then the rest by name.
        let order = &self.settings.order;
        next.sort_by_key(|p| {
            (
                order
                    .iter()
                    .position(|o| **o == *p.name)
                    .unwrap_or(usize::MAX),
                p.name.to_string(),
            )
        });
        report.active = next.iter().map(|p| p.name.to_string()).collect();
        self.metrics.plugins_active.set(next.len() as i64);
        *self.plugins.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        report
    }

    /// Scans now, then keeps watching the folder until `cancel` fires.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) -> Result<(), PluginError> {
        let host = Arc::clone(&self);
        let report = tokio::task::spawn_blocking(move || host.rescan())
            .await
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        tracing::info!(active = ?report.active, failed = report.failed.len(), "plugins scanned");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.send(());
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot watch the plugins folder: {e}")))?;
        if let Err(e) = watcher.watch(&self.settings.dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %self.settings.dir.display(), error = %e, "cannot watch the plugins folder; rescanning every {SAFETY_SCAN:?} only");
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                got = rx.recv() => {
                    if got.is_none() {
                        return Ok(());
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(SAFETY_SCAN) => {}
            }
            let host = Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || host.rescan()).await {
                tracing::error!(error = %e, "plugin scan failed");
            }
        }
    }
}
