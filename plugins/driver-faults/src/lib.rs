//! `driver-faults`: a misbehaving BMC driver for the host's tests. Its probe always traps
//! (so it is only ever used when pinned, and a trapping probe must not stop the others
//! from being chosen). Config key `mode` picks what the other calls do: `loop` (never
//! returns), `trap` (panics), `not-ready` (always "retry later"), anything else: reports
//! the machine off and refuses the rest.

wit_bindgen::generate!({ path: "../../wit", world: "bmc-driver" });

use std::hint::black_box;

use arges::plugin::config;

struct DriverFaults;

fn misbehave() -> Result<(), DriverError> {
    match config::get("mode").as_deref() {
        Some("loop") => {
            let mut n = 0u64;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        Some("trap") => panic!("injected trap"),
        Some("not-ready") => Err(DriverError::RetryLater("injected: in POST".into())),
        _ => Ok(()),
    }
}

impl Guest for DriverFaults {
    fn probe(_bmc: BmcInfo) -> u32 {
        panic!("injected probe trap")
    }

    fn power_state() -> Result<PowerState, DriverError> {
        misbehave()?;
        Ok(PowerState::Off)
    }

    fn set_power(_action: PowerAction) -> Result<(), DriverError> {
        misbehave()?;
        Err(DriverError::Failed("injected: refused".into()))
    }

    fn set_boot_device(_setting: BootSetting) -> Result<(), DriverError> {
        misbehave()?;
        Err(DriverError::Failed("injected: refused".into()))
    }

    fn boot_device() -> Result<Option<BootSetting>, DriverError> {
        misbehave()?;
        Ok(None)
    }
}

export!(DriverFaults);
