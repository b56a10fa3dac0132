//! The power manager: every BMC operation goes through here, one BMC at a time.
//!
//! An operation waits in its BMC's queue (first come, first served, bounded), takes a
//! [`BmcLink`] (one login for the whole operation), picks the driver (pinned, cached, or
//! the best probe score), and runs its steps. Steps that fail for a reason that may pass
//! (a silent BMC, "not now" during POST, a driver deadline) are retried with doubling
//! pauses; wrong credentials or a driver's plain failure are not. Before every power-on
//! the next boot device is sent again and read back, and every power change is confirmed
//! by polling until the BMC reports the final state. Operations on different BMCs never
//! wait for each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::driver::{BmcInfo, DriverAnswer, DriverFault, DriverOp, Drivers};
use super::ipmi::IpmiClient;
use super::link::{BmcLink, Target};
use super::{BootSetting, PowerAction, PowerFailure, PowerState};
use crate::metrics::Metrics;

/// The manager's settings (`[bmc]` in appliance.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerSettings {
    /// One exchange with a BMC (an IPMI resend timer is capped at 2 s within it).
    pub exchange_timeout: Duration,
    /// Tries of one step when it fails for a reason that may pass.
    pub attempts: u32,
    /// Pause before the first retry; doubled for each next one.
    pub backoff: Duration,
    /// How long a power change may take to show.
    pub settle: Duration,
    /// Pause between power-state polls.
    pub poll: Duration,
    /// Operations waiting for one BMC before more are refused.
    pub queue_limit: usize,
    /// How long a probe's choice of driver is kept.
    pub probe_cache: Duration,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            exchange_timeout: Duration::from_secs(5),
            attempts: 3,
            backoff: Duration::from_secs(1),
            settle: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            queue_limit: 16,
            probe_cache: Duration::from_secs(600),
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read the power state (and the next boot device).
    Status,
    Power(PowerAction),
    BootDevice(BootSetting),
}

impl Operation {
    /// As recorded on the Server and labelled in metrics.
    pub fn describe(&self) -> String {
        match self {
            Operation::Status => "status".into(),
            Operation::Power(a) => format!("power {}", a.as_str()),
            Operation::BootDevice(b) => format!(
                "bootdev {}{}{}",
                b.device.as_str(),
                if b.persistent { " persistent" } else { "" },
                if b.efi { " efi" } else { " legacy" }
            ),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Operation::Status => "status",
            Operation::Power(_) => "power",
            Operation::BootDevice(_) => "bootdev",
        }
    }
}

/// One operation asked of one server's BMC.
#[derive(Debug, Clone)]
pub struct Job {
    /// The server, for logs.
    pub server: String,
    pub target: Target,
    pub vendor: String,
    pub product: String,
    /// A driver the operator pinned.
    pub driver: Option<String>,
    pub operation: Operation,
    /// The next boot to send before a power-on.
    pub next_boot: Option<BootSetting>,
}

/// How an operation ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub result: Result<(), DriverFault>,
    pub driver: Option<String>,
    /// Power state as last read.
    pub state: Option<PowerState>,
    /// Next boot as last read back.
    pub boot: Option<BootSetting>,
    /// Driver steps tried, retries included.
    pub attempts: u32,
    pub took: Duration,
}

/// One queue per BMC.
#[derive(Default)]
struct Queue {
    turn: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

/// The power manager.
pub struct PowerManager {
    drivers: Arc<dyn Drivers>,
    ipmi: Arc<IpmiClient>,
    settings: ManagerSettings,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// Driver chosen by probe, per BMC, and when.
    chosen: Mutex<HashMap<String, (String, Instant)>>,
}

impl std::fmt::Debug for PowerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerManager")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Where a running operation stands.
struct Run<'a> {
    manager: &'a PowerManager,
    job: &'a Job,
    link: Option<BmcLink>,
    driver: String,
    attempts: u32,
    state: Option<PowerState>,
    boot: Option<BootSetting>,
}

impl PowerManager {
    pub fn new(
        drivers: Arc<dyn Drivers>,
        settings: ManagerSettings,
        metrics: Arc<Metrics>,
    ) -> PowerManager {
        PowerManager {
            drivers,
            ipmi: Arc::new(IpmiClient::default()),
            settings,
            metrics,
            queues: Mutex::new(HashMap::new()),
            chosen: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &ManagerSettings {
        &self.settings
    }

    /// The loaded drivers.
    pub fn drivers(&self) -> Vec<String> {
        self.drivers.names()
    }

    /// Runs `job` to its end and says how it went. Never panics, never blocks other BMCs.
    pub async fn run(&self, job: Job) -> Outcome {
        let started = Instant::now();
        let bmc = job.target.authority();
        let queue = Arc::clone(
            self.queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(bmc.clone())
                .or_default(),
        );
        let mut outcome =
            if queue.waiting.fetch_add(1, Ordering::SeqCst) >= self.settings.queue_limit {
                Outcome {
                    result: Err(DriverFault::QueueFull(
                        bmc.clone(),
                        self.settings.queue_limit,
                    )),
                    driver: None,
                    state: None,
                    boot: None,
                    attempts: 0,
                    took: Duration::ZERO,
                }
            } else {
                let _turn = queue.turn.lock().await;
                self.run_now(&job).await
            };
        queue.waiting.fetch_sub(1, Ordering::SeqCst);
        outcome.took = started.elapsed();
        let result = match &outcome.result {
            Ok(()) => "ok",
            Err(e) => e.kind().as_str(),
        };
        self.metrics
            .bmc_operations
            .get_or_create(&[("operation", job.operation.label()), ("result", result)])
            .inc();
        self.metrics
            .bmc_operation_seconds
            .observe(outcome.took.as_secs_f64());
        match &outcome.result {
            Ok(()) => {
                tracing::info!(server = %job.server, bmc = %bmc, operation = %job.operation.describe(), driver = outcome.driver.as_deref(), attempts = outcome.attempts, took = ?outcome.took, "BMC operation done")
            }
            Err(e) => {
                tracing::warn!(server = %job.server, bmc = %bmc, operation = %job.operation.describe(), driver = outcome.driver.as_deref(), attempts = outcome.attempts, reason = %e.kind(), error = %e, "BMC operation failed")
            }
        }
        outcome
    }

    async fn run_now(&self, job: &Job) -> Outcome {
        let mut run = Run {
            manager: self,
            job,
            link: Some(BmcLink::new(job.target.clone(), Arc::clone(&self.ipmi))),
            driver: String::new(),
            attempts: 0,
            state: None,
            boot: None,
        };
        let result = match run.choose_driver().await {
            Ok(d) => {
                run.driver = d;
                run.operate().await
            }
            Err(e) => Err(e),
        };
        if let Some(link) = run.link.take() {
            link.close().await;
        }
        let failed_choice = result.is_err() && run.driver.is_empty();
        Outcome {
            result,
            driver: (!failed_choice).then(|| run.driver.clone()),
            state: run.state,
            boot: run.boot,
            attempts: run.attempts,
            took: Duration::ZERO,
        }
    }

    fn forget_choice(&self, bmc: &str) {
        self.chosen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(bmc);
    }
}

/// Evaluates `$try` until it succeeds, fails for good, or has been tried `attempts`
/// times, pausing `backoff`, then twice that, and so on, in between. (A macro: an async
/// closure borrowing the run mutably is not `Send` enough for the HTTP edge's tasks.)
macro_rules! retrying {
    ($run:ident, $try:expr) => {{
        let s = &$run.manager.settings;
        let (attempts, mut pause) = (s.attempts.max(1), s.backoff);
        let mut tries = 0;
        loop {
            tries += 1;
            match $try {
                Err(e) if e.retryable() && tries < attempts => {
                    $run.manager
                        .metrics
                        .bmc_retries
                        .get_or_create(&[("reason", e.kind().as_str())])
                        .inc();
                    tracing::info!(server = %$run.job.server, driver = %$run.driver, error = %e, pause = ?pause, "BMC step failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
                other => break other,
            }
        }
    }};
}

impl Run<'_> {
    /// One driver step, once: the link goes in and comes back.
    async fn step_once(&mut self, driver: &str, op: DriverOp) -> Result<DriverAnswer, DriverFault> {
        let Some(link) = self.link.take() else {
            return Err(DriverFault::Failed {
                driver: driver.into(),
                message: "the BMC link was lost".into(),
            });
        };
        // A probe round counts once, in `choose_driver`.
        if !matches!(op, DriverOp::Probe(_)) {
            self.attempts += 1;
        }
        let (link, answer) = self.manager.drivers.call(driver, link, op).await;
        self.link = link;
        answer
    }

    /// One step, retried with doubling pauses while its failure may pass.
    async fn step(&mut self, op: DriverOp) -> Result<DriverAnswer, DriverFault> {
        let driver = self.driver.clone();
        retrying!(self, self.step_once(&driver, op.clone()).await)
    }

    /// The driver, with probe rounds retried like steps while the BMC's failure may pass.
    async fn choose_driver(&mut self) -> Result<String, DriverFault> {
        retrying!(self, self.choose_driver_once().await)
    }

    /// The pinned driver, the one a recent probe chose, or the best probe now.
    async fn choose_driver_once(&mut self) -> Result<String, DriverFault> {
        let m = self.manager;
        let names = m.drivers.names();
        if let Some(pinned) = &self.job.driver {
            return if names.contains(pinned) {
                Ok(pinned.clone())
            } else {
                Err(DriverFault::NotLoaded(pinned.clone()))
            };
        }
        let bmc = self.job.target.authority();
        if let Some((d, at)) = m.chosen.lock().unwrap_or_else(|p| p.into_inner()).get(&bmc)
            && at.elapsed() < m.settings.probe_cache
            && names.contains(d)
        {
            return Ok(d.clone());
        }
        let info = BmcInfo {
            protocol: self.job.target.protocol(),
            address: bmc.clone(),
            vendor: self.job.vendor.clone(),
            product: self.job.product.clone(),
        };
        let mut best: Option<(u32, String)> = None;
        self.attempts += 1;
        for name in &names {
            self.driver = String::new();
            match self.step_once(name, DriverOp::Probe(info.clone())).await {
                Ok(DriverAnswer::Score(score)) if score > 0 => {
                    tracing::debug!(bmc = %bmc, driver = %name, score, "driver probed");
                    if best.as_ref().is_none_or(|(b, _)| score > *b) {
                        best = Some((score, name.clone()));
                    }
                }
                Ok(_) => {}
                // The BMC itself failed: every driver would; say why.
                Err(DriverFault::Transport(e))
                    if !matches!(e, super::link::TransportError::Refused(_)) =>
                {
                    return Err(DriverFault::Transport(e));
                }
                Err(e) => {
                    tracing::warn!(bmc = %bmc, driver = %name, error = %e, "driver probe failed; trying the others");
                }
            }
        }
        match best {
            Some((_, d)) => {
                m.chosen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(bmc, (d.clone(), Instant::now()));
                Ok(d)
            }
            None => Err(DriverFault::NoneFits(
                bmc,
                if names.is_empty() {
                    "none: put bmc-driver plugins in the plugins folder".into()
                } else {
                    names.join(", ")
                },
            )),
        }
    }

    async fn operate(&mut self) -> Result<(), DriverFault> {
        let r = match self.job.operation {
            Operation::Status => self.status().await,
            Operation::BootDevice(b) => self.set_boot(b).await,
            Operation::Power(a) => self.power(a).await,
        };
        if r.is_err() {
            // The next operation probes again: the BMC may have changed (firmware update).
            self.manager.forget_choice(&self.job.target.authority());
        }
        r
    }

    async fn read_power(&mut self) -> Result<PowerState, DriverFault> {
        match self.step(DriverOp::PowerState).await? {
            DriverAnswer::Power(p) => {
                self.state = Some(p);
                Ok(p)
            }
            other => Err(self.odd(other)),
        }
    }

    fn odd(&self, answer: DriverAnswer) -> DriverFault {
        DriverFault::Plugin {
            kind: PowerFailure::Malformed,
            message: format!("driver {} answered {answer:?} out of turn", self.driver),
        }
    }

    async fn status(&mut self) -> Result<(), DriverFault> {
        self.read_power().await?;
        // The next boot is informative: a BMC that cannot report it still has a status.
        match self.step(DriverOp::BootDevice).await {
            Ok(DriverAnswer::Boot(b)) => self.boot = b,
            Ok(other) => return Err(self.odd(other)),
            Err(DriverFault::Unsupported { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Sets the next boot and reads it back: the device must match; flags a BMC drops
    /// (ipmi_sim keeps neither persistence nor EFI) are logged, not failed.
    async fn set_boot(&mut self, want: BootSetting) -> Result<(), DriverFault> {
        match self.step(DriverOp::SetBootDevice(want)).await? {
            DriverAnswer::Done => {}
            other => return Err(self.odd(other)),
        }
        let got = match self.step(DriverOp::BootDevice).await {
            Ok(DriverAnswer::Boot(b)) => b,
            Ok(other) => return Err(self.odd(other)),
            // A driver that cannot read it back: trust the set.
            Err(DriverFault::Unsupported { .. }) => {
                self.boot = Some(want);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.boot = got;
        match got {
            Some(g) if g.device == want.device => {
                if g != want {
                    tracing::info!(server = %self.job.server, asked = ?want, reported = ?g, "the BMC reports the boot device without some of the flags sent");
                }
                Ok(())
            }
            _ => Err(DriverFault::BootMismatch { want, got }),
        }
    }

    async fn power(&mut self, action: PowerAction) -> Result<(), DriverFault> {
        let want = action.final_state();
        if want == PowerState::On
            && let Some(b) = self.job.next_boot
        {
            self.set_boot(b).await?;
        }
        match self.step(DriverOp::SetPower(action)).await {
            Ok(DriverAnswer::Done) => {}
            Ok(other) => return Err(self.odd(other)),
            // A BMC without a cycle command: off, confirmed, then on.
            Err(DriverFault::Unsupported { .. }) if action == PowerAction::Cycle => {
                self.step(DriverOp::SetPower(PowerAction::Off)).await?;
                self.settle(PowerState::Off).await?;
                self.step(DriverOp::SetPower(PowerAction::On)).await?;
            }
            Err(e) => return Err(e),
        }
        self.settle(want).await
    }

    /// Polls until the BMC reports `want`, or the settle time is over.
    async fn settle(&mut self, want: PowerState) -> Result<(), DriverFault> {
        let s = &self.manager.settings;
        let (settle, poll) = (s.settle, s.poll);
        let started = Instant::now();
        loop {
            let now = self.read_power().await?;
            if now == want {
                return Ok(());
            }
            if started.elapsed() >= settle {
                return Err(DriverFault::NotSettled {
                    want,
                    got: now,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bmc::driver::DriverFuture;
    use crate::bmc::ipmi::IpmiTarget;

    /// A driver that takes its time and records nothing: the queue is what is tested.
    struct Slow;

    impl Drivers for Slow {
        fn names(&self) -> Vec<String> {
            vec!["slow".into()]
        }

        fn call<'a>(&'a self, _: &'a str, link: BmcLink, op: DriverOp) -> DriverFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let answer = match op {
                    DriverOp::Probe(_) => DriverAnswer::Score(1),
                    DriverOp::PowerState => DriverAnswer::Power(PowerState::On),
                    DriverOp::BootDevice => DriverAnswer::Boot(None),
                    _ => DriverAnswer::Done,
                };
                (Some(link), Ok(answer))
            })
        }
    }

    fn job(port: u16) -> Job {
        Job {
            server: format!("s{port}"),
            target: Target::Ipmi(IpmiTarget::new(([127, 0, 0, 1], port).into(), "admin", "x")),
            vendor: String::new(),
            product: String::new(),
            driver: None,
            operation: Operation::Power(PowerAction::On),
            next_boot: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_other_bmcs_do_not_wait() {
        let settings = ManagerSettings {
            queue_limit: 2,
            ..Default::default()
        };
        let m = Arc::new(PowerManager::new(
            Arc::new(Slow),
            settings,
            Arc::new(Metrics::new()),
        ));
        let same: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                tokio::spawn(async move { m.run(job(1)).await })
            })
            .collect();
        let other = {
            let m = Arc::clone(&m);
            tokio::spawn(async move { m.run(job(2)).await })
        };
        let mut full = 0;
        for h in same {
            match h.await.unwrap().result {
                Ok(()) => {}
                Err(DriverFault::QueueFull(..)) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(full, 2, "two waited their turn, two were refused");
        let o = other.await.unwrap();
        assert!(o.result.is_ok());
        // Probe, power on, one poll: the other BMC's job ran beside, not after.
        assert_eq!(o.attempts, 3);
        assert!(o.took < Duration::from_millis(1000), "{:?}", o.took);
    }
}
