//! bmc-driver plugins behind the [`Drivers`] seam: each step instantiates the driver in a
//! fresh store that holds the operation's [`BmcLink`], runs one export under the driver
//! deadline (epoch and a tokio timeout, like a decision), and hands the link back. A
//! failure of the BMC seen through the `ipmi` or `http` import is reported as that
//! failure, whatever the driver answered.

use std::time::{Duration, Instant};

use wasmtime::{Store, UpdateDeadline};

use super::bindings::driver::arges::plugin::bmc as wit;
use super::loader::Entry;
use super::{PluginError, PluginHost, PluginState, ticks, truncate};
use crate::bmc::driver::{DriverAnswer, DriverFault, DriverFuture, DriverOp, Drivers};
use crate::bmc::link::BmcLink;
use crate::bmc::{BootDevice, BootSetting, PowerAction, PowerFailure, PowerState, Protocol};

/// Beyond the deadline, how long one driver step may spend waiting on its BMC in all.
const HOST_WAIT_CAP: Duration = Duration::from_secs(300);
/// Longest message a driver's error may carry.
const MAX_MESSAGE: usize = 1024;

impl Drivers for PluginHost {
    fn names(&self) -> Vec<String> {
        self.plugins()
            .iter()
            .filter(|p| !p.is_policy())
            .map(|p| p.name.to_string())
            .collect()
    }

    fn call<'a>(&'a self, driver: &'a str, link: BmcLink, op: DriverOp) -> DriverFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let (link, result) = self.call_driver(driver, link, op).await;
            let label = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind().as_str(),
            };
            self.metrics.plugin_call(driver, label, started.elapsed());
            (link, result)
        })
    }
}

impl PluginHost {
    async fn call_driver(
        &self,
        driver: &str,
        link: BmcLink,
        op: DriverOp,
    ) -> (Option<BmcLink>, Result<DriverAnswer, DriverFault>) {
        let plugins = self.plugins();
        let Some(plugin) = plugins.iter().find(|p| *p.name == *driver) else {
            return (Some(link), Err(DriverFault::NotLoaded(driver.into())));
        };
        let Entry::Driver(pre) = &plugin.entry else {
            return (Some(link), Err(DriverFault::NotLoaded(driver.into())));
        };
        let deadline = self.settings.driver_timeout;
        let Some(_permit) = plugin.permit(deadline).await else {
            let e = DriverFault::Plugin {
                kind: PowerFailure::Busy,
                message: format!("driver {driver}: all instances busy"),
            };
            return (Some(link), Err(e));
        };
        let mut store: Store<PluginState> = self.new_store(plugin);
        store.data_mut().link = Some(link);
        store.set_epoch_deadline(ticks(deadline).max(1));
        // Time the host spent waiting on the BMC is given back: the deadline bounds the
        // driver's own work; the transports' timeouts bound the waiting.
        store.epoch_deadline_callback(|mut ctx| {
            let owed = std::mem::take(&mut ctx.data_mut().host_ticks);
            Ok(if owed > 0 {
                UpdateDeadline::Continue(owed)
            } else {
                UpdateDeadline::Interrupt
            })
        });
        let outcome = tokio::time::timeout(deadline + HOST_WAIT_CAP, async {
            let d = pre.instantiate_async(&mut store).await?;
            Ok::<_, wasmtime::Error>(match &op {
                DriverOp::Probe(info) => {
                    let info = wit::BmcInfo {
                        protocol: match info.protocol {
                            Protocol::Ipmi => wit::Protocol::Ipmi,
                            Protocol::Redfish => wit::Protocol::Redfish,
                        },
                        address: info.address.clone(),
                        vendor: info.vendor.clone(),
                        product: info.product.clone(),
                    };
                    Ok(DriverAnswer::Score(d.call_probe(&mut store, &info).await?))
                }
                DriverOp::PowerState => d
                    .call_power_state(&mut store)
                    .await?
                    .map(|p| DriverAnswer::Power(power_from_wit(p))),
                DriverOp::SetPower(a) => d
                    .call_set_power(&mut store, action_to_wit(*a))
                    .await?
                    .map(|()| DriverAnswer::Done),
                DriverOp::SetBootDevice(b) => d
                    .call_set_boot_device(&mut store, boot_to_wit(*b))
                    .await?
                    .map(|()| DriverAnswer::Done),
                DriverOp::BootDevice => d
                    .call_boot_device(&mut store)
                    .await?
                    .map(|b| DriverAnswer::Boot(b.map(boot_from_wit))),
            })
        })
        .await;
        let mut link = store.data_mut().link.take();
        let failure = link.as_mut().and_then(|l| l.take_failure());
        let result = match (outcome, failure) {
            (Err(_), _) => Err(DriverFault::Plugin {
                kind: PowerFailure::Timeout,
                message: format!("driver {driver}: ran past its deadline of {deadline:?}"),
            }),
            (Ok(Err(e)), _) => {
                let e = self.classify(plugin, &store, e, deadline);
                Err(DriverFault::Plugin {
                    kind: failure_of(&e),
                    message: e.to_string(),
                })
            }
            // The BMC failed under the driver: that is the reason, not the driver's words.
            (Ok(Ok(Err(_))), Some(f)) | (Ok(Ok(Ok(DriverAnswer::Score(0)))), Some(f)) => {
                Err(DriverFault::Transport(f))
            }
            (Ok(Ok(Err(e))), None) => Err(fault_from_wit(driver, e)),
            (Ok(Ok(Ok(answer))), _) => Ok(answer),
        };
        (link, result)
    }
}

/// The power failure a plugin's own failure is.
fn failure_of(e: &PluginError) -> PowerFailure {
    match e {
        PluginError::Timeout { .. } => PowerFailure::Timeout,
        PluginError::Memory { .. } => PowerFailure::Memory,
        PluginError::Trap { .. } => PowerFailure::Trap,
        PluginError::Refused { .. } => PowerFailure::Refused,
        PluginError::Malformed { .. } => PowerFailure::Malformed,
        PluginError::Busy { .. } => PowerFailure::Busy,
        PluginError::Io { .. }
        | PluginError::Name(_)
        | PluginError::PinMismatch { .. }
        | PluginError::Invalid { .. }
        | PluginError::WrongWorld { .. }
        | PluginError::UnprovidedImports { .. }
        | PluginError::Engine(_) => PowerFailure::Plugin,
    }
}

fn fault_from_wit(driver: &str, e: wit::DriverError) -> DriverFault {
    let driver = driver.to_string();
    match e {
        wit::DriverError::RetryLater(m) => DriverFault::RetryLater {
            driver,
            message: truncate(m, MAX_MESSAGE),
        },
        wit::DriverError::Unsupported(m) => DriverFault::Unsupported {
            driver,
            message: truncate(m, MAX_MESSAGE),
        },
        wit::DriverError::Failed(m) => DriverFault::Failed {
            driver,
            message: truncate(m, MAX_MESSAGE),
        },
    }
}

fn power_from_wit(p: wit::PowerState) -> PowerState {
    match p {
        wit::PowerState::On => PowerState::On,
        wit::PowerState::Off => PowerState::Off,
    }
}

fn action_to_wit(a: PowerAction) -> wit::PowerAction {
    match a {
        PowerAction::On => wit::PowerAction::On,
        PowerAction::Off => wit::PowerAction::Off,
        PowerAction::SoftOff => wit::PowerAction::SoftOff,
        PowerAction::Cycle => wit::PowerAction::Cycle,
        PowerAction::Reset => wit::PowerAction::Reset,
    }
}

fn boot_to_wit(b: BootSetting) -> wit::BootSetting {
    wit::BootSetting {
        device: match b.device {
            BootDevice::Pxe => wit::BootDevice::Pxe,
            BootDevice::Disk => wit::BootDevice::Disk,
            BootDevice::Bios => wit::BootDevice::Bios,
            BootDevice::Cdrom => wit::BootDevice::Cdrom,
        },
        persistent: b.persistent,
        efi: b.efi,
    }
}

fn boot_from_wit(b: wit::BootSetting) -> BootSetting {
    BootSetting {
        device: match b.device {
            wit::BootDevice::Pxe => BootDevice::Pxe,
            wit::BootDevice::Disk => BootDevice::Disk,
            wit::BootDevice::Bios => BootDevice::Bios,
            wit::BootDevice::Cdrom => BootDevice::Cdrom,
        },
        persistent: b.persistent,
        efi: b.efi,
    }
}
