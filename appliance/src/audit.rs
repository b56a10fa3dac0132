//! The audit log: every admin action, every change Kubernetes drives into the inventory,
//! every secret handed out (a configuration served, a BMC's credentials used) and every
//! refusal that matters (a configuration or registration refused, a window tripped),
//! each with who, from where, when, what and how it ended.
//!
//! Recording never waits for the disk: an entry goes into a bounded buffer, and a writer
//! task appends what gathered in one inventory commit (fsynced, append-only, numbered)
//! a few times a second, pruning entries past the retention; a stop writes what is left.
//! With `[audit] file` set, each entry is also appended to that file as a JSON line, for
//! shipping elsewhere. A buffer overrun (a disk that stopped answering) drops the oldest
//! entries, counted in `arges_audit_dropped_total` and said in the log.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Invalid;
use crate::inventory::{AuditEntry, Inventory, now_ms};
use crate::metrics::Metrics;

/// Entries held for the writer at most; past it the oldest go.
const BUFFER: usize = 100_000;
/// How often the writer commits what gathered.
const EVERY: Duration = Duration::from_millis(200);

/// `[audit]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Entries older than this many days are pruned.
    pub retention_days: u64,
    /// At most this many entries are kept; the oldest go first.
    pub max_entries: u64,
    /// Also append every entry to this file as a JSON line.
    pub file: Option<PathBuf>,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            retention_days: 90,
            max_entries: 1_000_000,
            file: None,
        }
    }
}

/// `[audit]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub retention: Duration,
    pub max_entries: u64,
    pub file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        // The section's defaults are valid by construction.
        AuditConfig {
            retention: Duration::from_secs(90 * 86_400),
            max_entries: 1_000_000,
            file: None,
        }
    }
}

impl TryFrom<&AuditSection> for AuditConfig {
    type Error = Invalid;

    fn try_from(a: &AuditSection) -> Result<Self, Invalid> {
        if !(1..=3650).contains(&a.retention_days) {
            return Err(Invalid::new(
                "audit.retention_days",
                format!("{} is outside 1 to 3650 days", a.retention_days),
            ));
        }
        if !(1_000..=100_000_000).contains(&a.max_entries) {
            return Err(Invalid::new(
                "audit.max_entries",
                format!("{} is outside 1000 to 100000000", a.max_entries),
            ));
        }
        Ok(AuditConfig {
            retention: Duration::from_secs(a.retention_days * 86_400),
            max_entries: a.max_entries,
            file: a.file.clone(),
        })
    }
}

/// How a recorded action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Refused,
    Failed,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// The audit log; cheap to share (`Arc`).
pub struct AuditLog {
    buffer: Mutex<Vec<AuditEntry>>,
    wake: tokio::sync::Notify,
    inventory: Arc<Inventory>,
    config: AuditConfig,
    metrics: Arc<Metrics>,
    /// Serialises commits (the writer task and a final flush).
    writing: Mutex<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    pub fn new(inventory: Arc<Inventory>, config: AuditConfig, metrics: Arc<Metrics>) -> Self {
        AuditLog {
            buffer: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            inventory,
            config,
            metrics,
            writing: Mutex::new(()),
        }
    }

    /// Records one action, now; returns at once (the writer stores it).
    pub fn record(
        &self,
        who: impl Into<String>,
        from: Option<std::net::IpAddr>,
        action: impl Into<String>,
        server: Option<&str>,
        outcome: Outcome,
        detail: Option<String>,
    ) {
        let entry = AuditEntry {
            seq: 0,
            at_ms: now_ms(),
            who: who.into(),
            from: from.map(|a| a.to_string()),
            action: action.into(),
            server: server.map(String::from),
            outcome: outcome.name().into(),
            detail,
        };
        let mut b = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= BUFFER {
            let cut = b.len() + 1 - BUFFER;
            b.drain(..cut);
            self.metrics.audit_dropped.inc_by(cut as u64);
            static GATE: crate::limits::LogGate =
                crate::limits::LogGate::new(1, Duration::from_secs(60));
            if let Some(held_back) = GATE.check() {
                tracing::error!(
                    held_back,
                    "audit entries dropped: the inventory is not taking them"
                );
            }
        }
        b.push(entry);
        drop(b);
        self.wake.notify_one();
    }

    /// Stores what gathered (blocking: one fsynced commit); how many entries.
    pub fn flush(&self) -> Result<usize, crate::inventory::InventoryError> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return Ok(0);
        }
        let min_at = now_ms().saturating_sub(self.config.retention.as_millis() as u64);
        if let Err(e) = self
            .inventory
            .append_audit(&mut batch, min_at, self.config.max_entries)
        {
            // Kept for the next try, ahead of what came since.
            let mut b = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            batch.append(&mut b);
            *b = batch;
            return Err(e);
        }
        for e in &batch {
            let outcome = match e.outcome.as_str() {
                "ok" => "ok",
                "refused" => "refused",
                _ => "failed",
            };
            Metrics::inc(&self.metrics.audit_entries, "outcome", outcome);
        }
        if let Some(path) = &self.config.file
            && let Err(e) = append_lines(path, &batch)
        {
            static GATE: crate::limits::LogGate =
                crate::limits::LogGate::new(1, Duration::from_secs(60));
            if let Some(held_back) = GATE.check() {
                tracing::error!(file = %path.display(), error = %e, held_back, "cannot append to the audit file (the inventory keeps every entry)");
            }
        }
        Ok(batch.len())
    }

    /// Stores entries as they come until `cancel`, then what is left.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let stop = tokio::select! {
                _ = cancel.cancelled() => true,
                _ = self.wake.notified() => false,
            };
            if !stop {
                // Gather a little more: one commit for a burst.
                tokio::time::sleep(EVERY).await;
            }
            let me = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || me.flush()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot store audit entries; trying again");
                    tokio::time::sleep(EVERY * 5).await;
                }
                Err(e) => tracing::error!(error = %e, "the audit writer failed"),
            }
            if stop {
                return;
            }
        }
    }

    /// Entries after `after`, oldest first (at most `limit`); with no `after`, the newest
    /// `limit`.
    pub fn entries(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, crate::inventory::InventoryError> {
        match after {
            Some(a) => self.inventory.audit(a, limit),
            None => self.inventory.audit_tail(limit),
        }
    }
}

fn append_lines(path: &std::path::Path, batch: &[AuditEntry]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut text = Vec::new();
    for e in batch {
        serde_json::to_writer(&mut text, e).map_err(std::io::Error::other)?;
        text.push(b'\n');
    }
    f.write_all(&text)?;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(config: AuditConfig) -> AuditLog {
        AuditLog::new(
            Arc::new(Inventory::in_memory().unwrap()),
            config,
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn entries_are_numbered_kept_in_order_and_written_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.jsonl");
        let a = log(AuditConfig {
            file: Some(file.clone()),
            ..AuditConfig::default()
        });
        a.record(
            "admin",
            Some("10.0.0.9".parse().unwrap()),
            "admin POST /api/v1/servers/x/accept",
            Some("x"),
            Outcome::Ok,
            None,
        );
        a.record(
            "machine y",
            None,
            "config_served",
            Some("y"),
            Outcome::Ok,
            None,
        );
        assert_eq!(a.flush().unwrap(), 2);
        a.record(
            "unknown",
            None,
            "admin GET /api/v1/servers",
            None,
            Outcome::Refused,
            None,
        );
        assert_eq!(a.flush().unwrap(), 1);
        let all = a.entries(Some(0), 10).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(all[0].from.as_deref(), Some("10.0.0.9"));
        assert_eq!(all[2].outcome, "refused");
        assert_eq!(a.entries(Some(2), 10).unwrap().len(), 1);
        assert_eq!(a.entries(None, 2).unwrap()[0].seq, 2, "the newest two");
        let lines = std::fs::read_to_string(&file).unwrap();
        let parsed: Vec<AuditEntry> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(parsed, all);
    }

    #[test]
    fn retention_prunes_the_oldest_by_count_and_by_age() {
        let a = log(AuditConfig {
            max_entries: 5,
            ..AuditConfig::default()
        });
        for i in 0..8 {
            a.record("admin", None, format!("a{i}"), None, Outcome::Ok, None);
        }
        a.flush().unwrap();
        let kept: Vec<String> = a
            .entries(Some(0), 100)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(kept, ["a3", "a4", "a5", "a6", "a7"]);
        // An entry past the retention goes at the next commit.
        let b = log(AuditConfig::default());
        b.buffer.lock().unwrap().push(AuditEntry {
            at_ms: 1,
            action: "ancient".into(),
            ..AuditEntry::default()
        });
        b.record("admin", None, "recent", None, Outcome::Ok, None);
        b.flush().unwrap();
        let kept: Vec<String> = b
            .entries(Some(0), 100)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(kept, ["recent"]);
    }

    #[test]
    fn the_retention_is_checked() {
        let bad = AuditSection {
            retention_days: 0,
            ..AuditSection::default()
        };
        let e = AuditConfig::try_from(&bad).unwrap_err();
        assert!(e.to_string().contains("audit.retention_days"), "{e}");
        assert_eq!(
            AuditConfig::try_from(&AuditSection::default()).unwrap(),
            AuditConfig::default()
        );
    }
}
