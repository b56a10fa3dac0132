//! The discovery agent (`arges agent`): runs in the discovery initramfs, reads the
//! machine's hardware, registers it with the appliance and says what to do next.
//!
//! In `wipe` mode it first zeroes the ends of every disk ([`wipe`]); the registration that
//! follows is the wipe's report. It prints the appliance's answer (`power-off`, `reboot` or `wait`) on stdout for the
//! initramfs's init to act on, so the agent itself never needs to be PID 1. Registration is
//! retried with backoff while the network comes up. It carries no cluster credentials: only
//! the registration secret of its boot, from its kernel command line.

pub mod bmc;
pub mod facts;
pub mod wipe;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;

use crate::registration::{RegistrationMode, RegistrationRequest, RegistrationResponse};

/// The exit status of `arges agent` when the appliance refused the registration (it
/// still prints `power-off`): the initramfs powers off rather than retrying.
pub const REFUSED_EXIT: i32 = 3;

/// Agent failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error("the appliance refused the registration ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("could not reach the appliance at {url} within {waited:?}: {last}")]
    Unreachable {
        url: String,
        waited: Duration,
        last: String,
    },
}

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Base URL of the appliance (`http://host:port`).
    pub appliance: String,
    pub token: String,
    pub mode: RegistrationMode,
    /// Where sysfs and procfs are found (`/`).
    pub root: PathBuf,
    /// Overrides the SMBIOS UUID (machines whose firmware reports none).
    pub uuid: Option<String>,
    /// The IPMI device to read the BMC address from.
    pub ipmi_device: String,
    /// How long to keep trying.
    pub timeout: Duration,
    /// The sha256 of the appliance's HTTPS certificate (an `https://` appliance URL).
    pub pin: Option<String>,
}

/// Reads the facts of this machine into a registration.
pub fn collect(opts: &AgentOptions) -> Result<RegistrationRequest, AgentError> {
    let reader = facts::FactReader::new(&opts.root);
    let uuid = opts.uuid.clone().unwrap_or_else(|| reader.uuid());
    if uuid.is_empty() {
        return Err(AgentError::Usage(format!(
            "no SMBIOS UUID under {}; pass --uuid",
            opts.root.join("sys/class/dmi/id/product_uuid").display()
        )));
    }
    let mut hardware = reader.hardware();
    if opts.root == std::path::Path::new("/") {
        facts::add_live_addresses(&mut hardware);
        hardware.bmc = bmc::read_bmc(&opts.ipmi_device);
    }
    Ok(RegistrationRequest {
        uuid,
        hardware,
        mode: opts.mode,
    })
}

struct Endpoint {
    authority: String,
    host_port: String,
    path_prefix: String,
    /// HTTPS: the certificate must be the pinned one.
    tls: bool,
}

fn parse_url(url: &str) -> Result<Endpoint, AgentError> {
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (r, false),
        (_, Some(r)) => (r, true),
        _ => {
            return Err(AgentError::Usage(format!(
                "appliance URL {url:?} must start with http:// or https://"
            )));
        }
    };
    let default_port = if tls { 443 } else { 80 };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    if authority.is_empty() {
        return Err(AgentError::Usage(format!(
            "appliance URL {url:?} has no host"
        )));
    }
    let host_port = if authority.starts_with('[') {
        if authority.contains("]:") {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        }
    } else if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    Ok(Endpoint {
        authority: authority.to_string(),
        host_port,
        path_prefix: format!("/{}", path.trim_end_matches('/'))
            .trim_end_matches('/')
            .to_string(),
        tls,
    })
}

async fn post_once(
    ep: &Endpoint,
    pin: Option<&str>,
    token: &str,
    body: Bytes,
) -> Result<(u16, Bytes), String> {
    // HTTPS trusts the appliance's certificate by the pin from the kernel command line.
    let host = ep
        .authority
        .rsplit_once(':')
        .map_or(ep.authority.as_str(), |(h, _)| h);
    let pin = if ep.tls { pin } else { None };
    let mut sender = crate::tls::http1_connect(&ep.host_port, host, pin).await?;
    let req = Request::post(format!("{}/api/v1/register", ep.path_prefix))
        .header(hyper::header::HOST, &ep.authority)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Registers, retrying connection failures and server errors until `opts.timeout`.
pub async fn register(
    opts: &AgentOptions,
    reg: &RegistrationRequest,
) -> Result<RegistrationResponse, AgentError> {
    let ep = parse_url(&opts.appliance)?;
    if ep.tls && opts.pin.is_none() {
        return Err(AgentError::Usage(format!(
            "{} is HTTPS: the appliance's certificate sha256 is needed to trust it (--pin, or arges.pin= on the kernel command line)",
            opts.appliance
        )));
    }
    let body = Bytes::from(serde_json::to_vec(reg).map_err(|e| AgentError::Usage(e.to_string()))?);
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        let last = match post_once(&ep, opts.pin.as_deref(), &opts.token, body.clone()).await {
            Ok((200, b)) => {
                return serde_json::from_slice(&b).map_err(|e| AgentError::Refused {
                    status: 200,
                    body: format!("unreadable answer: {e}"),
                });
            }
            // The appliance understood and said no: retrying would not change its mind.
            Ok((status @ 400..=499, b)) => {
                return Err(AgentError::Refused {
                    status,
                    body: String::from_utf8_lossy(&b).trim().to_string(),
                });
            }
            Ok((status, b)) => format!("HTTP {status}: {}", String::from_utf8_lossy(&b).trim()),
            Err(e) => e,
        };
        if started.elapsed() + delay > opts.timeout {
            return Err(AgentError::Unreachable {
                url: opts.appliance.clone(),
                waited: started.elapsed(),
                last,
            });
        }
        tracing::warn!(error = %last, retry_in = ?delay, "registration failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("http://10.0.0.1:8080").unwrap();
        assert_eq!(
            (e.host_port.as_str(), e.path_prefix.as_str()),
            ("10.0.0.1:8080", "")
        );
        let e = parse_url("http://boot.example/arges/").unwrap();
        assert_eq!(
            (e.host_port.as_str(), e.path_prefix.as_str()),
            ("boot.example:80", "/arges")
        );
        let e = parse_url("http://[::1]:8080").unwrap();
        assert_eq!(e.host_port, "[::1]:8080");
        let e = parse_url("https://10.0.0.1").unwrap();
        assert!(e.tls && e.host_port == "10.0.0.1:443");
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://").is_err());
    }
}
