//! The connection one power operation holds to one BMC, lent to a driver for each step.
//!
//! A link opens its session on first use (an RMCP+ session for IPMI, a Redfish session
//! or basic auth for Redfish) and closes it in [`BmcLink::close`], so a whole operation
//! (probe, boot device, power, polling) costs one login. For IPMI it also holds the BMC's
//! turn, so the BMC never sees two sessions from us. A transport failure is remembered:
//! the manager reports it, with its own kind, whatever the driver made of it.

use std::sync::Arc;

use bytes::Bytes;

use super::ipmi::{IpmiClient, IpmiError, IpmiTarget, IpmiTurn, Session};
use super::redfish::{RawAnswer, RedfishClient, RedfishError, RedfishTarget};
use super::{BmcSettings, PowerFailure, Protocol};

/// Why talking to a BMC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Ipmi(#[from] IpmiError),
    #[error(transparent)]
    Redfish(#[from] RedfishError),
    /// The driver asked for something the host does not allow.
    #[error("{0}")]
    Refused(String),
}

impl TransportError {
    /// What kind of failure this is.
    pub fn kind(&self) -> PowerFailure {
        match self {
            TransportError::Ipmi(e) => e.kind(),
            TransportError::Redfish(e) => e.kind(),
            TransportError::Refused(_) => PowerFailure::Refused,
        }
    }

    /// Whether trying again later may help (the BMC was silent, not wrong).
    pub fn transient(&self) -> bool {
        self.kind().transient()
    }
}

/// How to reach one BMC, credentials included (never logged: see the targets' `Debug`).
#[derive(Debug, Clone)]
pub enum Target {
    Ipmi(IpmiTarget),
    Redfish(RedfishTarget),
}

impl Target {
    /// The target for `settings` with `password`.
    pub fn new(
        settings: &BmcSettings,
        password: &str,
        exchange_timeout: std::time::Duration,
    ) -> Result<Target, String> {
        let authority = settings.authority();
        Ok(match settings.protocol {
            Protocol::Ipmi => {
                let addr = resolve(&authority)?;
                let mut t = IpmiTarget::new(addr, &settings.username, password);
                t.timeout = exchange_timeout.min(std::time::Duration::from_secs(2));
                Target::Ipmi(t)
            }
            Protocol::Redfish => Target::Redfish(RedfishTarget {
                authority,
                user: settings.username.clone(),
                password: password.to_string(),
                tls: settings.tls.policy()?,
                timeout: exchange_timeout,
            }),
        })
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Target::Ipmi(_) => Protocol::Ipmi,
            Target::Redfish(_) => Protocol::Redfish,
        }
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        match self {
            Target::Ipmi(t) => t.addr.to_string(),
            Target::Redfish(t) => t.authority.clone(),
        }
    }
}

fn resolve(authority: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve BMC {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("BMC {authority} resolves to no address"))
}

/// The session state of one operation.
pub struct BmcLink {
    target: Target,
    ipmi: Arc<IpmiClient>,
    turn: Option<IpmiTurn>,
    session: Option<Session>,
    redfish: Option<RedfishClient>,
    /// The first transport failure of the current driver call.
    failure: Option<TransportError>,
}

impl std::fmt::Debug for BmcLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BmcLink")
            .field("bmc", &self.target.authority())
            .finish_non_exhaustive()
    }
}

/// Headers a driver may add to a request; authentication is the host's.
const DRIVER_HEADERS: [&str; 2] = ["if-match", "if-none-match"];
/// Largest body a driver may send.
const MAX_REQUEST_BODY: usize = 64 << 10;

impl BmcLink {
    /// A link to `target`; nothing is sent until a driver asks.
    pub fn new(target: Target, ipmi: Arc<IpmiClient>) -> BmcLink {
        BmcLink {
            target,
            ipmi,
            turn: None,
            session: None,
            redfish: None,
            failure: None,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Takes the transport failure of the last driver call, if any.
    pub fn take_failure(&mut self) -> Option<TransportError> {
        self.failure.take()
    }

    fn fail<T>(&mut self, e: TransportError) -> Result<T, TransportError> {
        if self.failure.is_none() {
            self.failure = Some(e.clone());
        }
        Err(e)
    }

    /// One raw IPMI command: completion code and data.
    pub async fn ipmi_raw(
        &mut self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
    ) -> Result<(u8, Vec<u8>), TransportError> {
        let Target::Ipmi(t) = &self.target else {
            return self.fail(TransportError::Refused(format!(
                "BMC {} is reached by Redfish, not IPMI",
                self.target.authority()
            )));
        };
        if data.len() > 255 {
            return self.fail(TransportError::Refused(
                "an IPMI request carries at most 255 bytes".into(),
            ));
        }
        // Session lifecycle commands are the host's.
        if netfn == super::ipmi::netfn::APP && matches!(cmd, 0x3B | 0x3C) {
            return self.fail(TransportError::Refused(
                "the host owns the session (Set Session Privilege, Close Session)".into(),
            ));
        }
        if self.session.is_none() {
            if self.turn.is_none() {
                self.turn = Some(self.ipmi.turn(t.addr).await);
            }
            match Session::open(t).await {
                Ok(s) => self.session = Some(s),
                Err(e) => return self.fail(e.into()),
            }
        }
        let Some(session) = self.session.as_mut() else {
            return self.fail(TransportError::Refused("no session".into()));
        };
        match session.raw_with_code(netfn, cmd, data).await {
            Ok(r) => {
                // What the driver sent, for tracing a vendor quirk (no credentials here).
                tracing::debug!(bmc = %session.addr(), netfn, cmd, data = ?data, completion = r.0, "driver IPMI command");
                Ok(r)
            }
            Err(e) => self.fail(e.into()),
        }
    }

    /// One HTTPS request to the BMC, authenticated by the host.
    pub async fn http(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<Vec<u8>>,
    ) -> Result<RawAnswer, TransportError> {
        let Target::Redfish(t) = &self.target else {
            return self.fail(TransportError::Refused(format!(
                "BMC {} is reached by IPMI, not HTTP",
                self.target.authority()
            )));
        };
        if let Err(why) = check_request(method, path, headers, body.as_deref()) {
            return self.fail(TransportError::Refused(why));
        }
        if self.redfish.is_none() {
            if matches!(t.tls, super::redfish::TlsPolicy::InsecureAcceptAny) {
                tracing::warn!(bmc = %t.authority, "BMC certificate not checked (tls.insecure is set)");
            }
            match RedfishClient::login(t).await {
                Ok(c) => self.redfish = Some(c),
                Err(e) => return self.fail(e.into()),
            }
        }
        let Some(client) = self.redfish.as_ref() else {
            return self.fail(TransportError::Refused("no Redfish client".into()));
        };
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let sent_body = Bytes::from(body.unwrap_or_default());
        let sent = client
            .send_raw(method, path, sent_body.clone(), &headers)
            .await;
        if let Ok(a) = &sent {
            // What the driver asked, for tracing a quirk (credentials never pass here:
            // the login is the client's own).
            tracing::debug!(bmc = %t.authority, method, path, status = a.status, body = %String::from_utf8_lossy(&sent_body[..sent_body.len().min(512)]), "driver HTTP request");
        }
        match sent {
            Ok(a) if a.status == 401 => self.fail(TransportError::Redfish(
                RedfishError::Credentials(t.authority.clone(), t.user.clone()),
            )),
            Ok(a) => Ok(a),
            Err(e) => self.fail(e.into()),
        }
    }

    /// Closes the session, if one was opened. Failures are logged, not returned: the
    /// operation's outcome is already known.
    pub async fn close(mut self) {
        if let Some(s) = self.session.take() {
            let addr = s.addr();
            if let Err(e) = s.close().await {
                tracing::warn!(bmc = %addr, error = %e, "could not close the IPMI session");
            }
        }
        if let Some(c) = self.redfish.take()
            && let Err(e) = c.logout().await
        {
            tracing::warn!(bmc = %self.target.authority(), error = %e, "could not delete the Redfish session");
        }
        drop(self.turn.take());
    }
}

/// What a driver's HTTP request may be: a known method, an absolute path on this BMC,
/// only the conditional headers, a bounded body.
fn check_request(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<(), String> {
    if !matches!(method, "GET" | "POST" | "PATCH" | "PUT" | "DELETE") {
        return Err(format!("method {method:?} is not allowed"));
    }
    let ok_path = path.starts_with('/')
        && !path.starts_with("//")
        && path.len() <= 2048
        && path.bytes().all(|b| b.is_ascii_graphic());
    if !ok_path {
        return Err("the path must be an absolute path on the BMC".into());
    }
    if let Some((name, _)) = headers
        .iter()
        .find(|(k, _)| !DRIVER_HEADERS.contains(&k.to_ascii_lowercase().as_str()))
    {
        return Err(format!("header {name:?} is the host's to set"));
    }
    if body.is_some_and(|b| b.len() > MAX_REQUEST_BODY) {
        return Err(format!(
            "a request body is at most {MAX_REQUEST_BODY} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_request;

    #[test]
    fn a_driver_reaches_only_its_bmc_and_never_sets_auth() {
        let none: &[(String, String)] = &[];
        assert!(check_request("GET", "/redfish/v1/Systems", none, None).is_ok());
        assert!(check_request("GET", "https://elsewhere/x", none, None).is_err());
        assert!(check_request("GET", "//elsewhere/x", none, None).is_err());
        assert!(check_request("GET", "/a b", none, None).is_err());
        assert!(check_request("CONNECT", "/", none, None).is_err());
        let auth = [("Authorization".to_string(), "Basic x".to_string())];
        assert!(check_request("GET", "/", &auth, None).is_err());
        let host = [("host".to_string(), "evil".to_string())];
        assert!(check_request("GET", "/", &host, None).is_err());
        let etag = [("If-Match".to_string(), "\"1\"".to_string())];
        assert!(check_request("PATCH", "/", &etag, Some(b"{}")).is_ok());
        assert!(check_request("POST", "/", none, Some(&vec![0u8; 70_000])).is_err());
    }
}
