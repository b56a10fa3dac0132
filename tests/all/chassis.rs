//! Generic IPMI chassis commands (IPMI 2.0 §28) over the appliance's RMCP+ session: the
//! tests' own client, beside the `ipmi` driver plugin (which the appliance uses), to
//! drive ipmi_sim directly and count its sessions.

use arges::bmc::ipmi::{IpmiError, Session, netfn};
use arges::bmc::{BootDevice, PowerAction};

fn control_byte(action: PowerAction) -> u8 {
    match action {
        PowerAction::Off => 0x00,
        PowerAction::On => 0x01,
        PowerAction::Cycle => 0x02,
        PowerAction::Reset => 0x03,
        PowerAction::SoftOff => 0x05,
    }
}

/// Boot device selector, bits 5:2 of the boot flags' second byte.
fn selector(device: BootDevice) -> u8 {
    match device {
        BootDevice::Pxe => 0x04,
        BootDevice::Disk => 0x08,
        BootDevice::Cdrom => 0x14,
        BootDevice::Bios => 0x18,
    }
}

/// Whether the chassis is powered on (Get Chassis Status).
pub async fn power_is_on(s: &mut Session) -> Result<bool, IpmiError> {
    let data = s.raw(netfn::CHASSIS, 0x01, &[]).await?;
    Ok(data.first().is_some_and(|b| b & 0x01 != 0))
}

/// Chassis Control.
pub async fn set_power(s: &mut Session, action: PowerAction) -> Result<(), IpmiError> {
    s.raw(netfn::CHASSIS, 0x02, &[control_byte(action)])
        .await
        .map(|_| ())
}

/// The boot-flags parameter (5) for `device`: valid, persistent and EFI bits as asked.
pub fn boot_flags(device: BootDevice, persistent: bool, efi: bool) -> [u8; 6] {
    let mut first = 0x80;
    if persistent {
        first |= 0x40;
    }
    if efi {
        first |= 0x20;
    }
    [0x05, first, selector(device), 0, 0, 0]
}

/// Sets the next boot device. The boot-flag valid bit is first told not to expire
/// (parameter 3), or many BMCs forget a one-time override after 60 s.
pub async fn set_boot_device(
    s: &mut Session,
    device: BootDevice,
    persistent: bool,
    efi: bool,
) -> Result<(), IpmiError> {
    s.raw(netfn::CHASSIS, 0x08, &[0x03, 0x1F]).await?;
    s.raw(netfn::CHASSIS, 0x08, &boot_flags(device, persistent, efi))
        .await
        .map(|_| ())
}

/// Active sessions on the BMC, by its own count (Get Session Info).
pub async fn active_sessions(s: &mut Session) -> Result<u8, IpmiError> {
    let data = s.raw(netfn::APP, 0x3D, &[0x00]).await?;
    data.get(2)
        .map(|b| b & 0x3F)
        .ok_or_else(|| IpmiError::Protocol {
            addr: s.addr(),
            why: "short Get Session Info answer".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_flags_carry_the_bits_asked() {
        assert_eq!(
            boot_flags(BootDevice::Pxe, false, false),
            [5, 0x80, 0x04, 0, 0, 0]
        );
        assert_eq!(
            boot_flags(BootDevice::Pxe, false, true),
            [5, 0xA0, 0x04, 0, 0, 0]
        );
        assert_eq!(
            boot_flags(BootDevice::Disk, true, true),
            [5, 0xE0, 0x08, 0, 0, 0]
        );
        assert_eq!(boot_flags(BootDevice::Bios, false, false)[2], 0x18);
        assert_eq!(boot_flags(BootDevice::Cdrom, false, false)[2], 0x14);
    }
}
