//! Sending a machine into an environment Arges serves, for its install and for its
//! wipe: next boot PXE, then a power cycle, or a power-on when it is off. Both open
//! the Server's provisioning window (the core does that on the power operation).

use crate::bmc::{BootDevice, BootSetting, PowerAction, PowerState};
use crate::controller::Context;
use crate::core::CoreError;
use crate::inventory::PowerEvent;

/// Next boot PXE (once), then cycle or on. `Ok(Err(event))`: the BMC failed a step, as
/// recorded; `Err`: the core could not run it at all.
pub(super) async fn network_boot(
    ctx: &Context,
    id: &str,
) -> Result<Result<PowerAction, PowerEvent>, CoreError> {
    let pxe = BootSetting {
        device: BootDevice::Pxe,
        persistent: false,
        efi: false,
    };
    let r = ctx.core.bmc_boot_device(id, pxe).await?;
    if !r.event.ok {
        return Ok(Err(r.event));
    }
    let on = ctx.core.bmc_status(id).await?.power.state == Some(PowerState::On);
    let action = if on {
        PowerAction::Cycle
    } else {
        PowerAction::On
    };
    let r = ctx.core.bmc_power(id, action).await?;
    Ok(if r.event.ok { Ok(action) } else { Err(r.event) })
}
