//! HTTP edge (hyper 1): boot scripts, boot assets, iPXE binaries for UEFI HTTP boot
//! (`/boot/`), `/configdata`, the registration and
//! admin API, `/healthz` and `/metrics`.
//!
//! The server takes an already bound listener and a cancellation token (tests bind port
//! 0); each connection is served by hyper's HTTP/1 machinery and shut down gracefully when
//! the token fires. Handlers live beside this file by concern and reach the rest of the
//! appliance only through [`Core`].

mod api;
mod assets;
mod boot;
pub mod config;
pub mod console;
pub mod guard;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::timeline::{Step, Who};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::core::{Core, CoreError};
use crate::files::FileRoot;

/// Response body: either whole bytes or a file stream.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// What the HTTP handlers share.
pub struct HttpContext {
    pub core: Arc<Core>,
    /// The assets folder (`/assets/...`).
    pub assets: Arc<FileRoot>,
    /// The TFTP root with its iPXE fallback (`/boot/...`, for UEFI HTTP boot).
    pub boot_files: Arc<FileRoot>,
    /// The abuse limits.
    pub guard: Arc<guard::Guard>,
    /// The console's sessions.
    pub sessions: console::Sessions,
}

/// Whether `path` is the console's.
fn console_path(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut b = body.into();
    if !b.ends_with('\n') {
        b.push('\n');
    }
    full(status, "text/plain; charset=utf-8", b)
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(v) => full(status, "application/json", v),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// 429, to come back in a second.
fn too_many() -> Response<Body> {
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests from this address; try again shortly",
    );
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

fn status_of(e: &CoreError) -> StatusCode {
    match e {
        CoreError::NotFound(_) => StatusCode::NOT_FOUND,
        CoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        CoreError::Forbidden(_) => StatusCode::FORBIDDEN,
        CoreError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        CoreError::Managed(_) | CoreError::Conflict(_) => StatusCode::CONFLICT,
        CoreError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        CoreError::Store(_) | CoreError::Template(_) | CoreError::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The value of `name` in a query string.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// The bearer token of a request.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Reads a body of at most `limit` bytes, which must arrive within `within`.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    within: std::time::Duration,
) -> Result<Bytes, Response<Body>> {
    // A declared length past the cap is refused before the body is polled: hyper then
    // sends no `100 Continue`, so a client that asked first (curl does above 1 MiB) never
    // sends it, and no unread body makes the close a reset that loses the answer.
    if hyper::body::Body::size_hint(req.body()).lower() > limit as u64 {
        let mut refused = json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes"),
        );
        refused.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Err(refused);
    }
    let collected = tokio::time::timeout(
        within,
        http_body_util::Limited::new(req.into_body(), limit).collect(),
    )
    .await;
    let Ok(collected) = collected else {
        return Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {within:?}"),
        ));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes"),
            ))
        }
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            format!("cannot read body: {e}"),
        )),
    }
}

async fn route(
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    role: Role,
    req: Request<Incoming>,
) -> (&'static str, Response<Body>) {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // The console goes wherever the admin API goes.
    let admin_path =
        (path.starts_with("/api/v1/") && path != "/api/v1/register") || console_path(&path);
    let common = matches!(path.as_str(), "/healthz" | "/metrics");
    match role {
        Role::Admin if !admin_path && !common => {
            return (
                "other",
                text(
                    StatusCode::NOT_FOUND,
                    "this listener serves the admin API only",
                ),
            );
        }
        Role::Machines { admin: false } if admin_path => {
            return (
                "admin",
                text(
                    StatusCode::NOT_FOUND,
                    "the admin API is served on its own listener (http.admin_listen)",
                ),
            );
        }
        _ => {}
    }
    match (method, path.as_str()) {
        (Method::GET, "/healthz") => ("healthz", text(StatusCode::OK, "ok")),
        (Method::GET, "/metrics") => (
            "metrics",
            full(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                ctx.core.metrics().render(),
            ),
        ),
        (Method::GET, "/boot.ipxe") if !ctx.guard.boot_allowed(peer.ip()) => {
            guard::refused(ctx.core.metrics(), "boot_rate", peer.ip());
            ("boot", too_many())
        }
        (Method::GET, "/boot.ipxe") => ("boot", boot::boot_script(&ctx, peer, &req).await),
        (Method::GET, "/configdata") => ("configdata", boot::configdata(&ctx, peer, &req).await),
        (Method::POST, "/configdata/done") => (
            "configdata_done",
            boot::configdata_done(&ctx, peer, &req).await,
        ),
        (Method::GET | Method::HEAD, p) if p.starts_with("/env/") => {
            ("env", assets::environment_file(&ctx, &req).await)
        }
        (Method::GET | Method::HEAD, p) if p.starts_with("/assets/") => (
            "assets",
            assets::asset(&ctx, &ctx.assets, "/assets/", &req).await,
        ),
        (Method::GET | Method::HEAD, p) if p.starts_with("/boot/") => (
            "boot_file",
            assets::asset(&ctx, &ctx.boot_files, "/boot/", &req).await,
        ),
        (_, "/api/v1/register") if !ctx.guard.registration_allowed(peer.ip()) => {
            guard::refused(ctx.core.metrics(), "registration_rate", peer.ip());
            ("register", too_many())
        }
        (_, "/api/v1/register") => ("register", api::register(&ctx, peer, req).await),
        (_, p) if p.starts_with("/api/v1/") => ("admin", api::admin(&ctx, peer, req).await),
        (_, p) if console_path(p) => ("console", console::console(&ctx, peer, req).await),
        _ => (
            "other",
            text(StatusCode::NOT_FOUND, format!("no such resource: {path}")),
        ),
    }
}

async fn handle(
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    role: Role,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let (route, resp) = route(Arc::clone(&ctx), peer, role, req).await;
    ctx.core
        .metrics()
        .http_request(route, resp.status().as_u16());
    Ok(match route {
        // A file a boot fetches (a kernel, an initrd, an iPXE binary): a step of that
        // boot, recorded when its last byte went (or the client went away).
        "env" | "assets" | "boot_file" => witness_fetch(&ctx, peer, path, started, resp),
        _ => resp,
    })
}

/// `resp` with its body counted; when the body ends or is dropped, the fetch goes into
/// the timeline of the machine at `peer`.
fn witness_fetch(
    ctx: &HttpContext,
    peer: SocketAddr,
    path: String,
    started: std::time::Instant,
    resp: Response<Body>,
) -> Response<Body> {
    let timeline = Arc::clone(ctx.core.timeline());
    let status = resp.status().as_u16();
    let at_ms = crate::inventory::now_ms().saturating_sub(started.elapsed().as_millis() as u64);
    let (parts, body) = resp.into_parts();
    let counted = CountedBody {
        inner: body,
        bytes: 0,
        done: Some(Box::new(move |bytes| {
            timeline.witness_at(
                Who::Address(peer.ip()),
                at_ms,
                Step::Fetch {
                    path,
                    status,
                    bytes,
                    millis: started.elapsed().as_millis() as u64,
                },
            );
        })),
    };
    Response::from_parts(parts, counted.boxed())
}

/// A body that counts the bytes it yields and calls `done` with the count once, when it
/// is dropped (after its end, or cut short).
struct CountedBody {
    inner: Body,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes);
        }
    }
}

/// What a listener serves, and over what.
#[derive(Clone)]
pub struct Listener {
    /// HTTPS with this certificate; `None`: plain HTTP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub role: Role,
}

/// Which routes a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// What machines use; the admin API too unless it has listeners of its own.
    Machines { admin: bool },
    /// The admin API (and `/healthz`, `/metrics`) only.
    Admin,
}

/// Serves `listener` until the shutdown's stop (see [`crate::shutdown`] for the drain).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    shutdown: Shutdown,
    kind: Listener,
) -> std::io::Result<()> {
    tracing::info!(local = %listener.local_addr()?, tls = kind.tls.is_some(), role = ?kind.role, "HTTP listening");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.stop().cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = match ctx.guard.admit(peer.ip()) {
            Ok(p) => p,
            Err(limit) => {
                guard::refused(ctx.core.metrics(), limit, peer.ip());
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        let signals = shutdown.clone();
        let kind = kind.clone();
        // Work in flight: a stop lets the request being answered finish (keep-alive
        // ends after it); the drain deadline cuts it.
        shutdown.spawn(async move {
            let _permit = permit;
            let limits = ctx.guard.limits().clone();
            match kind.tls {
                None => connection(ctx, peer, kind.role, stream, signals, limits).await,
                Some(acceptor) => {
                    // The handshake is part of the request's header deadline.
                    match tokio::time::timeout(limits.header, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(ctx, peer, kind.role, tls, signals, limits).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Metrics::inc(
                                &ctx.core.metrics().http_tls_failures,
                                "reason",
                                "handshake",
                            );
                        }
                        Err(_) => guard::refused(ctx.core.metrics(), "header_time", peer.ip()),
                    }
                }
            }
        });
    }
}

/// One connection, plain or TLS, until it ends, goes idle, or the drain cuts it.
async fn connection<S>(
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    role: Role,
    stream: S,
    signals: Shutdown,
    limits: config::HttpLimits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (stream, last) = guard::Watched::new(stream);
    let metrics = Arc::clone(ctx.core.metrics());
    let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&ctx), peer, role, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        },
        _ = guard::idle_for(last, limits.idle) => {
            // No byte either way for that long: a stalled reader or writer.
            guard::refused(&metrics, "idle", peer.ip());
        }
        _ = signals.stop().cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = signals.abort().cancelled() => {
                    tracing::warn!(%peer, "HTTP connection cut at the drain deadline");
                }
            }
        }
    }
}
