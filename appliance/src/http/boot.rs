//! `/boot.ipxe` and `/configdata`: what a booting machine asks for, and
//! `POST /configdata/done`, its install environment's report.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{Body, HttpContext, full, query_param, status_of, text};
use crate::core::{BootRequest, BootScript};

/// The base URL the machine used to reach us.
fn base_url(req: &Request<Incoming>) -> String {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// `GET /boot.ipxe?uuid=&mac=&arch=`
pub async fn boot_script(
    ctx: &HttpContext,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Body> {
    let boot = BootRequest {
        uuid: query_param(req, "uuid"),
        mac: query_param(req, "mac"),
        arch: query_param(req, "arch"),
        source: peer.ip(),
        base_url: base_url(req),
    };
    match ctx.core.decide_boot(boot).await {
        Ok(BootScript::Script { body, .. }) => {
            full(StatusCode::OK, "text/plain; charset=utf-8", body)
        }
        Ok(BootScript::FallThrough) => text(StatusCode::NOT_FOUND, "boot from local disk"),
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot answer a boot request");
            text(
                status_of(&e),
                format!(
                    "#!ipxe\necho Arges cannot answer this boot: {}\nsleep 10\nexit 1",
                    e.kind()
                ),
            )
        }
    }
}

/// The machine a `/configdata` request speaks for (`uuid`) and its proof (`token`);
/// `None` without a uuid.
fn machine_proof(req: &Request<Incoming>) -> Option<(String, Option<String>)> {
    Some((query_param(req, "uuid")?, query_param(req, "token")))
}

/// `GET /configdata?uuid=&token=`
pub async fn configdata(
    ctx: &HttpContext,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Body> {
    let Some((uuid, token)) = machine_proof(req) else {
        return text(StatusCode::BAD_REQUEST, "uuid is required");
    };
    match ctx
        .core
        .config_for(&uuid, token.as_deref(), peer.ip())
        .await
    {
        Ok(blob) => full(StatusCode::OK, "application/octet-stream", blob),
        Err(e) => {
            tracing::warn!(%peer, uuid, error = %e, "configuration refused");
            text(status_of(&e), e.to_string())
        }
    }
}

/// `POST /configdata/done?uuid=&token=`: the install environment's report that the
/// machine is installed. Proven like `/configdata`; the next boots go to the disk.
pub async fn configdata_done(
    ctx: &HttpContext,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Body> {
    let Some((uuid, token)) = machine_proof(req) else {
        return text(StatusCode::BAD_REQUEST, "uuid is required");
    };
    match ctx
        .core
        .report_installed(&uuid, token.as_deref(), peer.ip())
        .await
    {
        Ok(s) => text(StatusCode::OK, format!("server {} installed\n", s.id)),
        Err(e) => {
            tracing::warn!(%peer, uuid, error = %e, "installation report refused");
            text(status_of(&e), e.to_string())
        }
    }
}
