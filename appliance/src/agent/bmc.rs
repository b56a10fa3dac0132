//! The local BMC's LAN address, read through the kernel's IPMI device with ipmi-rs.
//!
//! Get LAN Configuration Parameters (NetFn Transport 0x0C, command 0x02) for parameter 3
//! (IP address) and 5 (MAC address), on the first LAN channel that answers.

use std::time::Duration;

use ipmi_rs::connection::{IpmiConnection, LogicalUnit, Message, Request, RequestTargetAddress};

use crate::registration::BmcAddress;

const NETFN_TRANSPORT: u8 = 0x0C;
const GET_LAN_CONFIG: u8 = 0x02;

fn lan_param(file: &mut ipmi_rs::File, channel: u8, param: u8) -> Option<Vec<u8>> {
    let msg = Message::new_raw(NETFN_TRANSPORT, GET_LAN_CONFIG, vec![channel, param, 0, 0]);
    let mut req = Request::new(msg, RequestTargetAddress::Bmc(LogicalUnit::Zero));
    let resp = file.send_recv(&mut req).ok()?;
    // Data: parameter revision, then the parameter's bytes.
    (resp.cc() == 0 && resp.data().len() > 1).then(|| resp.data()[1..].to_vec())
}

/// Reads the BMC address from `device` (normally `/dev/ipmi0`); `None` when there is no
/// device, no LAN channel, or no address configured.
pub fn read_bmc(device: &str) -> Option<BmcAddress> {
    if !std::path::Path::new(device).exists() {
        return None;
    }
    let mut file = match ipmi_rs::File::new(device, Duration::from_secs(2)) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(device, error = %e, "cannot open the IPMI device");
            return None;
        }
    };
    for channel in 1..=11u8 {
        let Some(ip) = lan_param(&mut file, channel, 3) else {
            continue;
        };
        if ip.len() < 4 || ip[..4] == [0, 0, 0, 0] {
            continue;
        }
        let mac = lan_param(&mut file, channel, 5)
            .filter(|m| m.len() >= 6)
            .map(|m| {
                m[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .unwrap_or_default();
        return Some(BmcAddress {
            ip: format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
            mac,
        });
    }
    None
}
