//! `/api/v1/`: registration for the discovery agent (registration token) and the admin
//! API for operators (admin token).
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/api/v1/register` | the agent registers a machine (bearer: a boot's registration secret, or the shared token) |
//! | GET | `/api/v1/servers` | list servers |
//! | GET, DELETE | `/api/v1/servers/{id}` | get or delete a server |
//! | GET | `/api/v1/servers/{id}/boots` | the server's boots as witnessed, step by step (DHCP, TFTP, script, fetches, registration, config, done, power) with times and gaps |
//! | GET | `/api/v1/boots` | every machine witnessed booting, registered or not, latest first (`?limit=`, default 100) |
//! | GET | `/api/v1/audit` | the audit log, oldest first: `?after=SEQ` (entries after it) or the newest; `?limit=` (default 200) |
//! | GET | `/api/v1/boots/{mac}` | one witnessed machine, by MAC (or `ip:<address>` before its MAC is known) |
//! | POST | `/api/v1/servers/{id}/{accept,unaccept,cordon,uncordon}` | flags |
//! | POST | `/api/v1/servers/{id}/arm` | open a provisioning window (and clear an alarm): the machine's next boot gets its secrets |
//! | POST | `/api/v1/servers/{id}/disarm` | close the window and revoke its secret |
//! | PUT | `/api/v1/servers/{id}/environment` | `{"environment": "name"}` or `null` |
//! | PUT | `/api/v1/servers/{id}/labels` | `{"key": "value", …}` |
//! | PUT | `/api/v1/servers/{id}/bmc` | `{"address", "protocol", "username", "password", "driver", "tls"}`: power control (the password is sealed and never returned); `{"address"}` alone only records the address |
//! | GET, DELETE | `/api/v1/servers/{id}/bmc` | the BMC settings, power record and loaded drivers; or forget the BMC |
//! | GET | `/api/v1/servers/{id}/bmc/status` | read power state and next boot from the BMC |
//! | POST | `/api/v1/servers/{id}/bmc/power` | `{"action": "on|off|soft-off|cycle|reset"}` |
//! | POST | `/api/v1/servers/{id}/bmc/bootdev` | `{"device": "pxe|disk|bios|cdrom", "persistent": false, "efi": true}` |
//!
//! A BMC operation answers 200 when it worked and 502 when the BMC (or its driver) did
//! not do it; both carry the recorded event with its reason.
//! | PUT, DELETE | `/api/v1/servers/{id}/config` | the `/configdata` blob (raw body) |

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use super::{Body, HttpContext, bearer, json, json_error, query_param, read_body, status_of};
use crate::audit::Outcome;
use crate::bmc::{BmcSettings, BootSetting, Protocol, TlsSettings};
use crate::core::{Core, CoreError, PowerReport, RegistrationProof, ServerEdit};
use crate::inventory::CloseReason;
use crate::limits::LogGate;
use crate::metrics::Metrics;
use crate::registration::RegistrationRequest;

fn unauthorized() -> Response<Body> {
    let mut r = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn core_error(e: CoreError) -> Response<Body> {
    json_error(status_of(&e), e)
}

/// `POST /api/v1/register`
pub async fn register(
    ctx: &HttpContext,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    // The shared token (agents run by hand), or the per-boot secret of a discover or
    // wipe script, which the core checks against the boot it was handed to.
    let secret = match bearer(&req) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => {
            Metrics::inc(&ctx.core.metrics().registrations, "result", "unauthorized");
            tracing::warn!(%peer, "registration without a token refused");
            return unauthorized();
        }
    };
    let limits = ctx.guard.limits();
    let body = match read_body(req, limits.max_registration_bytes, limits.body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let reg: RegistrationRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            Metrics::inc(&ctx.core.metrics().registrations, "result", "malformed");
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("malformed registration: {e}"),
            );
        }
    };
    let proof = if ctx.core.is_registration(&secret) {
        RegistrationProof::Shared
    } else {
        RegistrationProof::Secret(&secret)
    };
    match ctx.core.register(reg, proof, peer.ip()).await {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(e) => core_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvironmentBody {
    environment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BmcBody {
    address: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    username: Option<String>,
    password: Option<String>,
    driver: Option<String>,
    #[serde(default)]
    tls: TlsSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerBody {
    action: String,
}

/// A BMC operation's answer: 200 when it worked, 502 when the BMC did not do it.
fn power_report(r: PowerReport) -> Response<Body> {
    let status = if r.event.ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    json(status, &r)
}

/// `PUT …/bmc`: full settings configure power control; an address alone is recorded.
async fn put_bmc(core: &Core, id: &str, b: BmcBody) -> Result<Response<Body>, CoreError> {
    let s = match (b.username, b.password) {
        (Some(username), Some(password)) => {
            let address = b
                .address
                .ok_or_else(|| CoreError::Invalid("bmc.address is required".into()))?;
            let settings = BmcSettings {
                address,
                protocol: b.protocol,
                driver: b.driver,
                tls: b.tls,
                username,
            };
            core.set_bmc(id, Some((settings, password))).await?
        }
        (None, None) => {
            core.edit_server(id, ServerEdit::BmcAddress(b.address))
                .await?
        }
        _ => {
            return Err(CoreError::Invalid(
                "give both username and password (or neither, to record only the address)".into(),
            ));
        }
    };
    Ok(json(StatusCode::OK, &s))
}

async fn json_body<T: for<'de> Deserialize<'de>>(
    ctx: &HttpContext,
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let limits = ctx.guard.limits();
    let body = read_body(req, limits.max_registration_bytes, limits.body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| json_error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")))
}

/// Everything else under `/api/v1/`.
pub async fn admin(ctx: &HttpContext, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = admin_routes(ctx, req).await;
    let status = resp.status();
    let server = path
        .strip_prefix("/api/v1/servers/")
        .and_then(|rest| rest.split('/').next())
        .map(|id| {
            percent_encoding::percent_decode_str(id)
                .decode_utf8_lossy()
                .into_owned()
        });
    // Every change, and every request a credential did not back; reads are not actions.
    let (who, outcome) = match status {
        StatusCode::UNAUTHORIZED => ("unknown", Outcome::Refused),
        _ if method == Method::GET => return resp,
        s if s.is_success() => ("admin", Outcome::Ok),
        s if s.is_client_error() => ("admin", Outcome::Refused),
        _ => ("admin", Outcome::Failed),
    };
    ctx.core.audit().record(
        who,
        Some(peer.ip()),
        format!("admin {method} {path}"),
        server.as_deref(),
        outcome,
        (!status.is_success()).then(|| format!("answered {}", status.as_u16())),
    );
    resp
}

async fn admin_routes(ctx: &HttpContext, req: Request<Incoming>) -> Response<Body> {
    // A browser sends the token only to the name it was given; a page rebinding its own
    // name to our address would get here with its name in Host.
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if !ctx.core.config().http.admin_host_allowed(host) {
        static GATE: LogGate = LogGate::new(10, std::time::Duration::from_secs(60));
        if let Some(held_back) = GATE.check() {
            tracing::warn!(
                host,
                held_back,
                "admin request for a host name that is not ours refused (http.names)"
            );
        }
        return json_error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "{host:?} is not a name of this appliance: use its address, localhost, or a name in http.names"
            ),
        );
    }
    if !bearer(&req).is_some_and(|t| ctx.core.is_admin(t)) {
        tracing::warn!(
            path = req.uri().path(),
            "admin request with a missing or wrong token refused"
        );
        return unauthorized();
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    // Segments are percent-decoded: a client may encode the `:` of a `<uuid>-<mac>` id.
    let decoded: Vec<String> = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let core = &ctx.core;
    let result = match (method, parts.as_slice()) {
        (Method::GET, ["servers"]) => core.servers().await.map(|s| json(StatusCode::OK, &s)),
        (Method::GET, ["servers", id]) => core.server(id).await.map(|s| json(StatusCode::OK, &s)),
        (Method::GET, ["servers", id, "boots"]) => core.server_boots(id).await.map(|b| {
            json(
                StatusCode::OK,
                &serde_json::json!({"server": id, "boots": b}),
            )
        }),
        (Method::GET, ["boots"]) => {
            let limit = query_param(&req, "limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(100)
                .min(crate::timeline::MAX_MACHINES);
            Ok(json(StatusCode::OK, &core.witnessed(limit)))
        }
        (Method::GET, ["boots", key]) => core.witnessed_one(key).map(|m| json(StatusCode::OK, &m)),
        (Method::GET, ["audit"]) => {
            let after = query_param(&req, "after").and_then(|a| a.parse::<u64>().ok());
            let limit = query_param(&req, "limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(200)
                .min(10_000);
            core.audit()
                .entries(after, limit)
                .map(|e| json(StatusCode::OK, &e))
                .map_err(CoreError::from)
        }
        (Method::DELETE, ["servers", id]) => core
            .delete_server(id)
            .await
            .map(|s| json(StatusCode::OK, &s)),
        (
            Method::POST,
            [
                "servers",
                id,
                flag @ ("accept" | "unaccept" | "cordon" | "uncordon"),
            ],
        ) => {
            let edit = match *flag {
                "accept" => ServerEdit::Accepted(true),
                "unaccept" => ServerEdit::Accepted(false),
                "cordon" => ServerEdit::Cordoned(true),
                _ => ServerEdit::Cordoned(false),
            };
            core.edit_server(id, edit)
                .await
                .map(|s| json(StatusCode::OK, &s))
        }
        (
            Method::PUT,
            [
                "servers",
                id,
                what @ ("environment" | "labels" | "bmc" | "config"),
            ],
        ) => {
            let (id, what) = (id.to_string(), what.to_string());
            let edit = match what.as_str() {
                "environment" => json_body::<EnvironmentBody>(ctx, req)
                    .await
                    .map(|b| ServerEdit::Environment(b.environment)),
                "labels" => json_body::<BTreeMap<String, String>>(ctx, req)
                    .await
                    .map(ServerEdit::Labels),
                "bmc" => {
                    return match json_body::<BmcBody>(ctx, req).await {
                        Ok(b) => put_bmc(core, &id, b).await.unwrap_or_else(core_error),
                        Err(r) => r,
                    };
                }
                _ => read_body(
                    req,
                    ctx.guard.limits().max_admin_body_bytes,
                    ctx.guard.limits().body,
                )
                .await
                .map(|b| ServerEdit::Config(Some(b.to_vec()))),
            };
            match edit {
                Ok(edit) => core
                    .edit_server(&id, edit)
                    .await
                    .map(|s| json(StatusCode::OK, &s)),
                Err(r) => return r,
            }
        }
        (Method::GET, ["servers", id, "bmc"]) => core.server(id).await.map(|s| {
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "server": s.id,
                    "bmc": s.bmc,
                    "address": s.bmc_address,
                    "power": s.power,
                    "drivers": core.bmc_drivers(),
                }),
            )
        }),
        (Method::DELETE, ["servers", id, "bmc"]) => core
            .set_bmc(id, None)
            .await
            .map(|s| json(StatusCode::OK, &s)),
        (Method::GET, ["servers", id, "bmc", "status"]) => {
            core.bmc_status(id).await.map(power_report)
        }
        (Method::POST, ["servers", id, "bmc", "power"]) => {
            let id = id.to_string();
            match json_body::<PowerBody>(ctx, req).await {
                Ok(b) => match b.action.parse() {
                    Ok(action) => core.bmc_power(&id, action).await.map(power_report),
                    Err(e) => Err(CoreError::Invalid(e)),
                },
                Err(r) => return r,
            }
        }
        (Method::POST, ["servers", id, "bmc", "bootdev"]) => {
            let id = id.to_string();
            match json_body::<BootSetting>(ctx, req).await {
                Ok(b) => core.bmc_boot_device(&id, b).await.map(power_report),
                Err(r) => return r,
            }
        }
        (Method::POST, ["servers", id, "arm"]) => core
            .arm(id, "the admin API")
            .await
            .map(|s| json(StatusCode::OK, &s)),
        (Method::POST, ["servers", id, "disarm"]) => core
            .close_window(id, None, CloseReason::Disarmed)
            .await
            .map(|s| json(StatusCode::OK, &s)),
        (Method::DELETE, ["servers", id, "config"]) => core
            .edit_server(id, ServerEdit::Config(None))
            .await
            .map(|s| json(StatusCode::OK, &s)),
        _ => return json_error(StatusCode::NOT_FOUND, format!("no such API: {path}")),
    };
    result.unwrap_or_else(core_error)
}
