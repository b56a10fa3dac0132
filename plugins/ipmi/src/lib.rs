//! `ipmi`: the generic IPMI 2.0 driver. Power through Chassis Control, state through Get
//! Chassis Status, the next boot through the boot-options parameter 5 (valid, persistent
//! and EFI bits) after parameter 3 is told to keep the valid bit. It fits any BMC that
//! answers Get Device ID over the host's RMCP+ session, with a generic score of 10.

wit_bindgen::generate!({ path: "../../wit", world: "bmc-driver" });

use arges::plugin::bmc::BootDevice;
use ipmi_chassis::{DeviceId, SELECT_BIOS, SELECT_CDROM, SELECT_DISK, SELECT_PXE};

struct Ipmi;

fn score(_bmc: &BmcInfo, id: Option<DeviceId>) -> u32 {
    if id.is_some() { 10 } else { 0 }
}

fn selector(setting: &BootSetting) -> u8 {
    match setting.device {
        BootDevice::Pxe => SELECT_PXE,
        BootDevice::Disk => SELECT_DISK,
        BootDevice::Cdrom => SELECT_CDROM,
        BootDevice::Bios => SELECT_BIOS,
    }
}

fn device(selector: u8) -> Option<BootDevice> {
    match selector {
        SELECT_PXE => Some(BootDevice::Pxe),
        SELECT_DISK => Some(BootDevice::Disk),
        SELECT_CDROM => Some(BootDevice::Cdrom),
        SELECT_BIOS => Some(BootDevice::Bios),
        _ => None,
    }
}

ipmi_chassis::chassis_driver!(Ipmi, probe: score, selector: selector, device: device);
