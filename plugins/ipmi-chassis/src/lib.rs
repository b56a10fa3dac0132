//! IPMI 2.0 chassis commands (§28) over a raw-command transport: what the `ipmi` driver
//! does, and what vendor drivers such as `supermicro` change a byte of. Plain Rust, no
//! bindings: each driver passes its host's `ipmi.raw` in as a closure.

/// Network functions.
pub const NETFN_CHASSIS: u8 = 0x00;
pub const NETFN_APP: u8 = 0x06;

/// Completion codes that mean "not now" rather than "never".
const BUSY: [u8; 3] = [0xC0, 0xC3, 0xD5];
/// Completion codes that mean the command is not there.
const ABSENT: [u8; 2] = [0xC1, 0xC2];

/// Why a command did not do its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    RetryLater(String),
    Unsupported(String),
    Failed(String),
}

/// Sends one raw command: `(netfn, cmd, data)` to `(completion code, data)`, or a transport
/// failure the host already recorded.
pub trait Raw {
    fn raw(&self, netfn: u8, cmd: u8, data: &[u8]) -> Result<(u8, Vec<u8>), String>;
}

impl<F: Fn(u8, u8, &[u8]) -> Result<(u8, Vec<u8>), String>> Raw for F {
    fn raw(&self, netfn: u8, cmd: u8, data: &[u8]) -> Result<(u8, Vec<u8>), String> {
        self(netfn, cmd, data)
    }
}

/// One command whose completion code must be 0.
pub fn command(t: &dyn Raw, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, Fault> {
    let (code, out) = t.raw(netfn, cmd, data).map_err(Fault::Failed)?;
    let what = format!("command {netfn:#04x}/{cmd:#04x}");
    match code {
        0 => Ok(out),
        c if BUSY.contains(&c) => Err(Fault::RetryLater(format!(
            "{what}: the BMC is busy (completion code {c:#04x})"
        ))),
        c if ABSENT.contains(&c) => Err(Fault::Unsupported(format!(
            "{what}: not supported (completion code {c:#04x})"
        ))),
        c => Err(Fault::Failed(format!("{what}: completion code {c:#04x}"))),
    }
}

/// What Get Device ID says about the BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceId {
    /// IANA enterprise number of the BMC's maker.
    pub manufacturer: u32,
    pub product: u16,
}

/// Get Device ID, or `None` when the BMC does not answer it sensibly.
pub fn device_id(t: &dyn Raw) -> Option<DeviceId> {
    let d = command(t, NETFN_APP, 0x01, &[]).ok()?;
    if d.len() < 11 {
        return None;
    }
    Some(DeviceId {
        manufacturer: u32::from(d[6]) | u32::from(d[7]) << 8 | u32::from(d[8] & 0x0F) << 16,
        product: u16::from(d[9]) | u16::from(d[10]) << 8,
    })
}

/// Whether the chassis is powered on (Get Chassis Status).
pub fn power_is_on(t: &dyn Raw) -> Result<bool, Fault> {
    let d = command(t, NETFN_CHASSIS, 0x01, &[])?;
    d.first()
        .map(|b| b & 0x01 != 0)
        .ok_or_else(|| Fault::Failed("empty Get Chassis Status answer".into()))
}

/// Chassis Control: 0 off, 1 on, 2 cycle, 3 hard reset, 5 soft off (ACPI).
pub fn chassis_control(t: &dyn Raw, control: u8) -> Result<(), Fault> {
    command(t, NETFN_CHASSIS, 0x02, &[control]).map(|_| ())
}

/// Boot device selectors (bits 5:2 of the boot flags' second byte), per the spec.
pub const SELECT_PXE: u8 = 0x04;
pub const SELECT_DISK: u8 = 0x08;
pub const SELECT_CDROM: u8 = 0x14;
pub const SELECT_BIOS: u8 = 0x18;

/// The boot-flags parameter (5): valid, persistent and EFI bits, and the selector.
pub fn boot_flags(selector: u8, persistent: bool, efi: bool) -> [u8; 6] {
    let mut first = 0x80;
    if persistent {
        first |= 0x40;
    }
    if efi {
        first |= 0x20;
    }
    [0x05, first, selector, 0, 0, 0]
}

/// Sets the next boot. The valid bit is first told not to clear on its own (parameter
/// 3), or many BMCs forget a one-time override 60 s after it was set.
pub fn set_boot_flags(t: &dyn Raw, selector: u8, persistent: bool, efi: bool) -> Result<(), Fault> {
    command(t, NETFN_CHASSIS, 0x08, &[0x03, 0x1F])?;
    command(
        t,
        NETFN_CHASSIS,
        0x08,
        &boot_flags(selector, persistent, efi),
    )
    .map(|_| ())
}

/// The boot flags as the BMC holds them: `(selector, persistent, efi)`, or `None` when no
/// override is set. Some BMCs (and OpenIPMI's simulator) keep the selector but not the
/// valid, persistent and EFI bits: a selector without the valid bit is still reported,
/// with both flags off.
pub fn boot_flags_now(t: &dyn Raw) -> Result<Option<(u8, bool, bool)>, Fault> {
    let d = command(t, NETFN_CHASSIS, 0x09, &[0x05, 0x00, 0x00])?;
    // Version, parameter, then the five data bytes.
    if d.len() < 4 {
        return Err(Fault::Failed("short Get System Boot Options answer".into()));
    }
    let (flags, selector) = (d[2], d[3] & 0x3C);
    if flags & 0x80 == 0 && selector == 0 {
        return Ok(None);
    }
    Ok(Some((selector, flags & 0x40 != 0, flags & 0x20 != 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_flags_carry_the_bits_asked() {
        assert_eq!(
            boot_flags(SELECT_PXE, false, false),
            [5, 0x80, 0x04, 0, 0, 0]
        );
        assert_eq!(
            boot_flags(SELECT_PXE, false, true),
            [5, 0xA0, 0x04, 0, 0, 0]
        );
        assert_eq!(
            boot_flags(SELECT_DISK, true, true),
            [5, 0xE0, 0x08, 0, 0, 0]
        );
    }

    #[test]
    fn completion_codes_say_retry_unsupported_or_failed() {
        let busy = |_: u8, _: u8, _: &[u8]| Ok((0xC0, vec![]));
        assert!(matches!(
            command(&busy, 0, 1, &[]),
            Err(Fault::RetryLater(_))
        ));
        let absent = |_: u8, _: u8, _: &[u8]| Ok((0xC1, vec![]));
        assert!(matches!(
            command(&absent, 0, 1, &[]),
            Err(Fault::Unsupported(_))
        ));
        let bad = |_: u8, _: u8, _: &[u8]| Ok((0xCC, vec![]));
        assert!(matches!(command(&bad, 0, 1, &[]), Err(Fault::Failed(_))));
    }

    #[test]
    fn device_id_reads_the_manufacturer() {
        // Supermicro's IANA number is 10876 (0x2A7C).
        let smc = |_: u8, _: u8, _: &[u8]| {
            Ok((
                0,
                vec![
                    0x20, 0x01, 0x03, 0x10, 0x02, 0xBF, 0x7C, 0x2A, 0x00, 0x37, 0x09,
                ],
            ))
        };
        assert_eq!(device_id(&smc).map(|d| d.manufacturer), Some(10876));
    }
}

/// The bmc-driver exports of a chassis driver, for a crate that ran
/// `wit_bindgen::generate!` for the `bmc-driver` world: `$probe` scores a `BmcInfo`,
/// `$selector` maps a `BootSetting` to its boot device selector and `$device` maps a
/// selector back to a `BootDevice`. Everything else is the standard chassis behaviour.
#[macro_export]
macro_rules! chassis_driver {
    ($driver:ident, probe: $probe:expr, selector: $selector:expr, device: $device:expr) => {
        /// The host's session, as the shared chassis code wants it.
        fn host(netfn: u8, cmd: u8, data: &[u8]) -> Result<(u8, Vec<u8>), String> {
            arges::plugin::ipmi::raw(netfn, cmd, data).map(|r| (r.completion_code, r.data))
        }

        fn fault(f: $crate::Fault) -> DriverError {
            match f {
                $crate::Fault::RetryLater(m) => DriverError::RetryLater(m),
                $crate::Fault::Unsupported(m) => DriverError::Unsupported(m),
                $crate::Fault::Failed(m) => DriverError::Failed(m),
            }
        }

        impl Guest for $driver {
            fn probe(bmc: BmcInfo) -> u32 {
                if bmc.protocol != arges::plugin::bmc::Protocol::Ipmi {
                    return 0;
                }
                ($probe)(&bmc, $crate::device_id(&host))
            }

            fn power_state() -> Result<PowerState, DriverError> {
                match $crate::power_is_on(&host).map_err(fault)? {
                    true => Ok(PowerState::On),
                    false => Ok(PowerState::Off),
                }
            }

            fn set_power(action: PowerAction) -> Result<(), DriverError> {
                let control = match action {
                    PowerAction::Off => 0x00,
                    PowerAction::On => 0x01,
                    PowerAction::Cycle => 0x02,
                    PowerAction::Reset => 0x03,
                    PowerAction::SoftOff => 0x05,
                };
                $crate::chassis_control(&host, control).map_err(fault)
            }

            fn set_boot_device(setting: BootSetting) -> Result<(), DriverError> {
                let selector: u8 = ($selector)(&setting);
                $crate::set_boot_flags(&host, selector, setting.persistent, setting.efi)
                    .map_err(fault)
            }

            fn boot_device() -> Result<Option<BootSetting>, DriverError> {
                let now = $crate::boot_flags_now(&host).map_err(fault)?;
                Ok(now.and_then(|(sel, persistent, efi)| {
                    ($device)(sel).map(|device| BootSetting {
                        device,
                        persistent,
                        efi,
                    })
                }))
            }
        }

        export!($driver);
    };
}
