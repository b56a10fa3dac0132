//! Graceful shutdown. On SIGTERM (or Ctrl-C) the appliance stops taking new work at
//! once: listeners close, new TFTP requests go unanswered. What is in flight (HTTP
//! connections, TFTP transfers, each registered with the [`Shutdown`] it was started
//! under) is given until the drain deadline to finish; whatever still runs then is cut.
//! A machine mid-download of its kernel finishes it, and a stop never waits for ever.
//!
//! Built on tokio-util's `TaskTracker`: HTTP connections are tracked tasks, and each TFTP
//! transfer (a thread of its own) holds a tracker token until it ends.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// The signals and the register of work in flight, shared by every server.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Work in flight when the stop began.
    pub in_flight: usize,
    /// Of it, what was cut at the deadline.
    pub cut: usize,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown whose stop is `stop` (fired by the signal handler).
    pub fn with_stop(stop: CancellationToken) -> Self {
        Shutdown {
            stop,
            ..Self::default()
        }
    }

    /// Fires when the appliance stops taking new work.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Fires when the drain's time is up: work still in flight ends now.
    pub fn abort(&self) -> &CancellationToken {
        &self.abort
    }

    /// Whether the appliance is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Runs `work` (an HTTP connection, say) as work in flight.
    pub fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
    }

    /// A token that counts as work in flight until dropped (a TFTP transfer's thread
    /// holds one).
    pub fn token(&self) -> TaskTrackerToken {
        self.tracker.token()
    }

    /// Stops taking new work, waits up to `grace` for what is in flight, then cuts the
    /// rest (and waits a moment more for it to notice).
    pub async fn drain(&self, grace: Duration) -> Drained {
        self.stop.cancel();
        self.tracker.close();
        let in_flight = self.tracker.len();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return Drained { in_flight, cut: 0 };
        }
        let cut = self.tracker.len();
        self.abort.cancel();
        // Cut work ends within a receive timeout or a write; never wait on it for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        Drained { in_flight, cut }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_in_flight_finishes_and_slow_work_is_cut_at_the_deadline() {
        let s = Shutdown::new();
        let quick = s.clone();
        s.spawn(async move {
            quick.stop().cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let thread_token = s.token();
        let slow = s.clone();
        s.spawn(async move {
            slow.abort().cancelled().await;
        });
        drop(thread_token);
        let d = s.drain(Duration::from_secs(10)).await;
        assert_eq!(
            d,
            Drained {
                in_flight: 2,
                cut: 1
            }
        );
        assert!(s.stopping() && s.abort().is_cancelled());

        let idle = Shutdown::new();
        let d = idle.drain(Duration::from_secs(10)).await;
        assert_eq!(
            d,
            Drained {
                in_flight: 0,
                cut: 0
            }
        );
        assert!(!idle.abort().is_cancelled(), "nothing to cut");
    }
}
