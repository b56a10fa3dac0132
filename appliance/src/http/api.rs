//! `/api/v1/`: registration for the discovery agent (registration token) and the admin
//! API for operators (admin token).
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/api/v1/register` | the agent registers a machine |
//! | GET | `/api/v1/servers` | list servers |
//! | GET, DELETE | `/api/v1/servers/{id}` | get or delete a server |
//! | POST | `/api/v1/servers/{id}/{accept,unaccept,cordon,uncordon}` | flags |
//! | PUT | `/api/v1/servers/{id}/environment` | `{"environment": "name"}` or `null` |
//! | PUT | `/api/v1/servers/{id}/labels` | `{"key": "value", …}` |
//! | PUT | `/api/v1/servers/{id}/bmc` | `{"address": "10.0.0.9"}` or `null` |
//! | PUT, DELETE | `/api/v1/servers/{id}/config` | the `/configdata` blob (raw body) |

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use super::{Body, HttpContext, bearer, json, json_error, read_body, status_of};
use crate::core::{CoreError, ServerEdit};
use crate::metrics::Metrics;
use crate::registration::RegistrationRequest;

const REGISTRATION_LIMIT: usize = 1 << 20;
const CONFIG_LIMIT: usize = 8 << 20;

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
    if !bearer(&req).is_some_and(|t| ctx.core.is_registration(t)) {
        Metrics::inc(&ctx.core.metrics().registrations, "result", "unauthorized");
        tracing::warn!(%peer, "registration with a missing or wrong token refused");
        return unauthorized();
    }
    let body = match read_body(req, REGISTRATION_LIMIT).await {
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
    match ctx.core.register(reg, peer.ip()).await {
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
}

async fn json_body<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let body = read_body(req, REGISTRATION_LIMIT).await?;
    serde_json::from_slice(&body)
        .map_err(|e| json_error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")))
}

/// Everything else under `/api/v1/`.
pub async fn admin(ctx: &HttpContext, req: Request<Incoming>) -> Response<Body> {
    if !bearer(&req).is_some_and(|t| ctx.core.is_admin(t)) {
        tracing::warn!(
            path = req.uri().path(),
            "admin request with a missing or wrong token refused"
        );
        return unauthorized();
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
    let method = req.method().clone();
    let core = &ctx.core;
    let result = match (method, parts.as_slice()) {
        (Method::GET, ["servers"]) => core.servers().await.map(|s| json(StatusCode::OK, &s)),
        (Method::GET, ["servers", id]) => core.server(id).await.map(|s| json(StatusCode::OK, &s)),
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
                "environment" => json_body::<EnvironmentBody>(req)
                    .await
                    .map(|b| ServerEdit::Environment(b.environment)),
                "labels" => json_body::<BTreeMap<String, String>>(req)
                    .await
                    .map(ServerEdit::Labels),
                "bmc" => json_body::<BmcBody>(req)
                    .await
                    .map(|b| ServerEdit::BmcAddress(b.address)),
                _ => read_body(req, CONFIG_LIMIT)
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
        (Method::DELETE, ["servers", id, "config"]) => core
            .edit_server(id, ServerEdit::Config(None))
            .await
            .map(|s| json(StatusCode::OK, &s)),
        _ => return json_error(StatusCode::NOT_FOUND, format!("no such API: {path}")),
    };
    result.unwrap_or_else(core_error)
}
