//! `arges:plugin/ipmi`: a driver's raw IPMI commands, sent over the session the host's
//! [`BmcLink`](crate::bmc::link::BmcLink) holds to this call's BMC.

use super::PluginState;
use crate::plugins::bindings::driver::arges::plugin::ipmi::{Host, Response};

impl Host for PluginState {
    async fn raw(&mut self, netfn: u8, cmd: u8, data: Vec<u8>) -> Result<Response, String> {
        let Some(link) = self.link.as_mut() else {
            return Err("no BMC in this call".into());
        };
        let started = std::time::Instant::now();
        let r = link.ipmi_raw(netfn, cmd, &data).await;
        self.waited(started);
        r.map(|(completion_code, data)| Response {
            completion_code,
            data,
        })
        .map_err(|e| e.to_string())
    }
}
