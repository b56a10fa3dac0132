//! The HTTP edge's abuse limits: connections (in all, and per source address), idle
//! connections, and per-source rates of `/boot.ipxe` and registration. Any machine on
//! the provisioning network can open connections and send requests; none of these lets
//! one source starve the others, and every refusal is counted (`arges_limited_total`) and
//! logged at a bounded rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::config::HttpLimits;
use crate::limits::{Buckets, LogGate};
use crate::metrics::Metrics;

/// Sources tracked by the rate limits at most (see [`Buckets`]).
const MAX_SOURCES: usize = 65_536;

/// The limits and what they track.
#[derive(Debug)]
pub struct Guard {
    limits: HttpLimits,
    open: Mutex<Open>,
    boot: Buckets<IpAddr>,
    registration: Buckets<IpAddr>,
}

#[derive(Debug, Default)]
struct Open {
    all: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    guard: Arc<Guard>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.guard.open.lock().unwrap_or_else(|p| p.into_inner());
        open.all -= 1;
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

impl Guard {
    pub fn new(limits: HttpLimits) -> Arc<Guard> {
        Arc::new(Guard {
            boot: Buckets::new(limits.boot_burst, limits.boot_per_sec, MAX_SOURCES),
            registration: Buckets::new(
                limits.registrations_burst,
                limits.registrations_per_sec,
                MAX_SOURCES,
            ),
            open: Mutex::new(Open::default()),
            limits,
        })
    }

    pub fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    /// A connection from `source`, if the connection limits let it in; else the limit.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.all >= self.limits.max_connections {
            return Err("connections");
        }
        let mine = open.by_source.entry(source).or_default();
        if *mine >= self.limits.max_connections_per_source {
            return Err("per_source_connections");
        }
        *mine += 1;
        open.all += 1;
        Ok(Permit {
            guard: Arc::clone(self),
            source,
        })
    }

    /// Whether `source` may ask `/boot.ipxe` now.
    pub fn boot_allowed(&self, source: IpAddr) -> bool {
        self.boot.allow(&source)
    }

    /// Whether `source` may register now.
    pub fn registration_allowed(&self, source: IpAddr) -> bool {
        self.registration.allow(&source)
    }
}

/// Counts a refusal by `limit` and logs it, at a bounded rate.
pub fn refused(metrics: &Metrics, limit: &'static str, source: IpAddr) {
    metrics.limit("http", limit);
    static GATE: LogGate = LogGate::new(20, Duration::from_secs(60));
    if let Some(held_back) = GATE.check() {
        tracing::warn!(%source, limit, held_back, "HTTP refused by an abuse limit");
    }
}

/// Milliseconds since the first call: a clock an atomic can hold (tokio's, so tests
/// with paused time see it move).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A connection's stream that notes when a byte last moved either way.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    last: Arc<AtomicU64>,
}

impl<S> Watched<S> {
    /// `inner`, and the handle [`idle_for`] watches.
    pub fn new(inner: S) -> (Watched<S>, Arc<AtomicU64>) {
        let last = Arc::new(AtomicU64::new(now_ms()));
        (
            Watched {
                inner,
                last: Arc::clone(&last),
            },
            last,
        )
    }

    fn moved(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once no byte has moved on the watched stream for `idle`.
pub async fn idle_for(last: Arc<AtomicU64>, idle: Duration) {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet).max(Duration::from_millis(50)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        crate::http::config::HttpConfig::try_from(&crate::http::config::HttpSection {
            max_connections: 3,
            max_connections_per_source: 2,
            ..Default::default()
        })
        .unwrap()
        .limits
    }

    #[test]
    fn connections_are_capped_in_all_and_per_source() {
        let g = Guard::new(limits());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let p1 = g.admit(a).unwrap();
        let _p2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).unwrap_err(), "per_source_connections");
        let _p3 = g.admit(b).unwrap();
        assert_eq!(g.admit(b).unwrap_err(), "connections");
        drop(p1);
        assert!(
            g.admit(b).is_ok(),
            "a closed connection gives its place back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_is_no_byte_either_way() {
        let (client, server) = tokio::io::duplex(64);
        let (mut watched, last) = Watched::new(server);
        let idle = tokio::spawn(idle_for(Arc::clone(&last), Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        use tokio::io::AsyncWriteExt;
        watched.write_all(b"x").await.unwrap();
        assert!(!idle.is_finished());
        drop(client);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(idle.is_finished());
    }
}
