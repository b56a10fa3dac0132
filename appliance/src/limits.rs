//! Abuse limits shared by the edges: per-source token buckets (a machine's network can
//! send anything, as often as it likes) and log gates (a flood must not become a log
//! flood). Written here rather than taken from a rate-limiting crate: what is needed is
//! two small structures with a hard bound on memory whatever the sources, which the
//! general-purpose crates (governor, keyed by a map that grows with its keys) do not give.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets per key (a source address): `burst` at once, refilled at `per_sec`.
/// At most `max_keys` are tracked; past that, full (idle) buckets are forgotten, and if
/// every tracked source is busy the newcomers share one bucket, so a flood of forged
/// sources costs bounded memory and still cannot take more than its share.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    max_keys: usize,
    state: Mutex<BucketState<K>>,
}

#[derive(Debug)]
struct BucketState<K> {
    by_key: HashMap<K, (f64, Instant)>,
    overflow: (f64, Instant),
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `per_sec` of 0 turns the limit off (every call is allowed).
    pub fn new(burst: u32, per_sec: f64, max_keys: usize) -> Self {
        let now = Instant::now();
        Buckets {
            burst: f64::from(burst.max(1)),
            per_sec,
            max_keys: max_keys.max(1),
            state: Mutex::new(BucketState {
                by_key: HashMap::new(),
                overflow: (f64::from(burst.max(1)), now),
            }),
        }
    }

    /// Whether `key` may go on now (and a token is taken if so).
    pub fn allow(&self, key: &K) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.by_key.contains_key(key) && s.by_key.len() >= self.max_keys {
            // Forget the sources whose buckets have refilled: they are idle.
            let (burst, rate) = (self.burst, self.per_sec);
            s.by_key
                .retain(|_, (tokens, at)| refill(*tokens, *at, now, burst, rate) < burst);
        }
        let (burst, rate) = (self.burst, self.per_sec);
        let bucket = if s.by_key.contains_key(key) || s.by_key.len() < self.max_keys {
            s.by_key.entry(key.clone()).or_insert((burst, now))
        } else {
            &mut s.overflow
        };
        let tokens = refill(bucket.0, bucket.1, now, burst, rate);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            true
        } else {
            *bucket = (tokens, now);
            false
        }
    }

    /// Sources tracked now (for tests and the bound's metric).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .len()
    }
}

fn refill(tokens: f64, at: Instant, now: Instant, burst: f64, per_sec: f64) -> f64 {
    (tokens + now.duration_since(at).as_secs_f64() * per_sec).min(burst)
}

/// A log line's gate: at most `per_window` lines per `window`; the rest are counted and
/// said in the next line let through. Const-constructible, so each call site can keep
/// its own in a `static`.
#[derive(Debug)]
pub struct LogGate {
    per_window: u32,
    window: Duration,
    /// (window start, lines let through in it, lines held back since the last one).
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl LogGate {
    pub const fn new(per_window: u32, window: Duration) -> Self {
        LogGate {
            per_window,
            window,
            state: Mutex::new(None),
        }
    }

    /// `Some(held_back)` when a line may be logged now (with how many were held back
    /// since the last one), `None` when it must be held back.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count, held) = s.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= self.window {
            *start = now;
            *count = 0;
        }
        if *count < self.per_window {
            *count += 1;
            Some(std::mem::take(held))
        } else {
            *held += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let b = Buckets::new(3, 0.0001, 16);
        let ip = [10, 0, 0, 1];
        assert!((0..3).all(|_| b.allow(&ip)));
        assert!(!b.allow(&ip), "burst spent");
        assert!(b.allow(&[10, 0, 0, 2]), "another source has its own");
        let off = Buckets::new(1, 0.0, 16);
        assert!((0..100).all(|_| off.allow(&ip)), "a rate of 0 is no limit");
    }

    #[test]
    fn a_log_gate_lets_some_through_and_counts_the_rest() {
        static GATE: LogGate = LogGate::new(2, Duration::from_secs(3600));
        assert_eq!(GATE.check(), Some(0));
        assert_eq!(GATE.check(), Some(0));
        assert_eq!(GATE.check(), None);
        assert_eq!(GATE.check(), None);
        let quick = LogGate::new(1, Duration::ZERO);
        assert_eq!(quick.check(), Some(0));
        assert_eq!(quick.check(), Some(0), "a new window");
    }

    #[test]
    fn forged_sources_cost_bounded_memory() {
        let b = Buckets::new(2, 0.0001, 64);
        let mut allowed = 0;
        for i in 0..10_000u32 {
            if b.allow(&i) {
                allowed += 1;
            }
        }
        assert!(b.tracked() <= 64);
        // The tracked ones each had their burst; the rest shared one bucket.
        assert!(allowed <= 64 * 2 + 2, "{allowed}");
    }
}
