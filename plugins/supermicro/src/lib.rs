//! `supermicro`: why drivers are plugins. Supermicro BMCs speak standard IPMI, except
//! that a *UEFI* boot from disk must be asked for with boot device selector 0x24 instead
//! of the spec's 0x08: with 0x08 and the EFI bit, these boards take the legacy disk path
//! or fall through to the network. Everything else is the generic chassis code. It fits
//! BMCs whose Get Device ID names Supermicro (IANA 10876), with a score of 50, so it wins
//! over the generic `ipmi` driver there and stays out of the way elsewhere.

wit_bindgen::generate!({ path: "../../wit", world: "bmc-driver" });

use arges::plugin::bmc::BootDevice;
use ipmi_chassis::{DeviceId, SELECT_BIOS, SELECT_CDROM, SELECT_DISK, SELECT_PXE};

/// Supermicro's IANA enterprise number.
const SUPERMICRO: u32 = 10876;
/// The selector Supermicro boards expect for a UEFI disk boot.
const SELECT_UEFI_DISK: u8 = 0x24;

struct Supermicro;

fn score(_bmc: &BmcInfo, id: Option<DeviceId>) -> u32 {
    match id {
        Some(id) if id.manufacturer == SUPERMICRO => 50,
        _ => 0,
    }
}

fn selector(setting: &BootSetting) -> u8 {
    match setting.device {
        BootDevice::Disk if setting.efi => SELECT_UEFI_DISK,
        BootDevice::Disk => SELECT_DISK,
        BootDevice::Pxe => SELECT_PXE,
        BootDevice::Cdrom => SELECT_CDROM,
        BootDevice::Bios => SELECT_BIOS,
    }
}

fn device(selector: u8) -> Option<BootDevice> {
    match selector {
        SELECT_PXE => Some(BootDevice::Pxe),
        SELECT_DISK | SELECT_UEFI_DISK => Some(BootDevice::Disk),
        SELECT_CDROM => Some(BootDevice::Cdrom),
        SELECT_BIOS => Some(BootDevice::Bios),
        _ => None,
    }
}

ipmi_chassis::chassis_driver!(Supermicro, probe: score, selector: selector, device: device);
