//! `arges:plugin/http`: a driver's HTTPS requests, to this call's BMC only, authenticated
//! and certificate-checked by the host's [`BmcLink`](crate::bmc::link::BmcLink).

use super::PluginState;
use crate::plugins::bindings::driver::arges::plugin::http::{Host, Request, Response};

impl Host for PluginState {
    async fn send(&mut self, request: Request) -> Result<Response, String> {
        let Some(link) = self.link.as_mut() else {
            return Err("no BMC in this call".into());
        };
        let answer = link
            .http(
                &request.method,
                &request.path,
                &request.headers,
                request.body,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Response {
            status: answer.status,
            headers: answer
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            body: answer.body.to_vec(),
        })
    }
}
