//! The driver seam: what the power manager asks of a BMC driver, and the trait the
//! plugin host implements for its bmc-driver plugins (as `BootPolicy` is the seam for
//! boot-policy plugins). The manager never sees wasm; the plugin host never sees a queue.

use std::future::Future;
use std::pin::Pin;

use super::link::{BmcLink, TransportError};
use super::{BootSetting, PowerAction, PowerFailure, PowerState, Protocol};

/// What a driver's probe is told about the BMC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcInfo {
    pub protocol: Protocol,
    pub address: String,
    pub vendor: String,
    pub product: String,
}

/// One step asked of a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverOp {
    Probe(BmcInfo),
    PowerState,
    SetPower(PowerAction),
    SetBootDevice(BootSetting),
    BootDevice,
}

/// A driver's answer to a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverAnswer {
    Score(u32),
    Power(PowerState),
    Done,
    Boot(Option<BootSetting>),
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverFault {
    #[error("no bmc-driver plugin named {0:?} is loaded")]
    NotLoaded(String),
    #[error("no loaded bmc-driver plugin fits BMC {0} (loaded: {1})")]
    NoneFits(String, String),
    /// The plugin trapped, timed out, ran out of memory or answered something malformed.
    #[error("{message}")]
    Plugin { kind: PowerFailure, message: String },
    /// The driver says: not now.
    #[error("driver {driver}: the BMC is not ready: {message}")]
    RetryLater { driver: String, message: String },
    #[error("driver {driver}: not supported: {message}")]
    Unsupported { driver: String, message: String },
    #[error("driver {driver}: {message}")]
    Failed { driver: String, message: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the BMC still reports {got:?} after {waited:?} (wanted {want:?})")]
    NotSettled {
        want: PowerState,
        got: PowerState,
        waited: std::time::Duration,
    },
    #[error("the boot device reads back as {got:?}, not the {want:?} we set")]
    BootMismatch {
        want: BootSetting,
        got: Option<BootSetting>,
    },
    #[error("{1} operations are already queued for BMC {0}")]
    QueueFull(String, usize),
}

impl DriverFault {
    /// What kind of failure this is (metrics, the Server's record, conditions).
    pub fn kind(&self) -> PowerFailure {
        match self {
            DriverFault::NotLoaded(_) | DriverFault::NoneFits(..) => PowerFailure::NoDriver,
            DriverFault::Plugin { kind, .. } => *kind,
            DriverFault::RetryLater { .. } => PowerFailure::NotReady,
            DriverFault::Unsupported { .. } => PowerFailure::Unsupported,
            DriverFault::Failed { .. } => PowerFailure::DriverFailed,
            DriverFault::Transport(e) => e.kind(),
            DriverFault::NotSettled { .. } => PowerFailure::NotSettled,
            DriverFault::BootMismatch { .. } => PowerFailure::BootMismatch,
            DriverFault::QueueFull(..) => PowerFailure::QueueFull,
        }
    }

    /// Whether the manager should try the step again after a pause.
    pub fn retryable(&self) -> bool {
        match self {
            DriverFault::RetryLater { .. } => true,
            DriverFault::Transport(e) => e.transient(),
            // A trap or a timeout may be a one-off (a slow BMC behind a host call).
            DriverFault::Plugin { kind, .. } => *kind == PowerFailure::Timeout,
            _ => false,
        }
    }
}

/// A boxed future, for an object-safe trait. The link comes back with the answer (it is
/// `None` only if the driver host lost it, which the manager reports).
pub type DriverFuture<'a> =
    Pin<Box<dyn Future<Output = (Option<BmcLink>, Result<DriverAnswer, DriverFault>)> + Send + 'a>>;

/// Where drivers come from: the plugin host.
pub trait Drivers: Send + Sync {
    /// The loaded drivers' names.
    fn names(&self) -> Vec<String>;
    /// Runs one step of `driver` over `link`, handing the link back.
    fn call<'a>(&'a self, driver: &'a str, link: BmcLink, op: DriverOp) -> DriverFuture<'a>;
}

/// No drivers at all (a build without plugins): every operation says so.
#[derive(Debug, Default)]
pub struct NoDrivers;

impl Drivers for NoDrivers {
    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    fn call<'a>(&'a self, driver: &'a str, link: BmcLink, _op: DriverOp) -> DriverFuture<'a> {
        Box::pin(async move { (Some(link), Err(DriverFault::NotLoaded(driver.into()))) })
    }
}
