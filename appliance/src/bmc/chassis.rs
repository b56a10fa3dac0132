//! Generic IPMI chassis commands (IPMI 2.0 §28): power state, power control and the
//! boot device for the next boot. The built-in behaviour of the `ipmi` driver.

use super::ipmi::{IpmiError, Session, netfn};
use super::{BootDevice, PowerAction};

/// Whether the chassis is powered on (Get Chassis Status).
pub async fn power_is_on(s: &mut Session) -> Result<bool, IpmiError> {
    let data = s.raw(netfn::CHASSIS, 0x01, &[]).await?;
    Ok(data.first().is_some_and(|b| b & 0x01 != 0))
}

/// Chassis Control.
pub async fn set_power(s: &mut Session, action: PowerAction) -> Result<(), IpmiError> {
    s.raw(netfn::CHASSIS, 0x02, &[action.control_byte()])
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
    [0x05, first, device.selector(), 0, 0, 0]
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
