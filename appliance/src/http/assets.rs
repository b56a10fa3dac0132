//! Boot assets over HTTP: `/env/<name>/<file>` (an environment's kernel and initrds, by
//! name from the config only) and `/assets/<path>` (anything in the assets folder, root-
//! confined). Both support HEAD, a single byte Range, ETag with If-None-Match and If-Range;
//! large files stream from disk in big chunks read on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};

use super::{Body, HttpContext, text};
use crate::files::{Contents, FileError, FileRoot, OpenFile};
use crate::metrics::Metrics;

/// Bytes read from disk per chunk when streaming.
const CHUNK: usize = 512 * 1024;

/// A requested byte range, resolved against the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Parses a `Range` header value against a file of `len` bytes. Multiple ranges are
/// answered with the whole file, which RFC 9110 allows.
pub fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => b
            .parse::<u64>()
            .ok()
            .map(|n| (len.saturating_sub(n), len.saturating_sub(1), n == 0)),
        (false, true) => a
            .parse::<u64>()
            .ok()
            .map(|s| (s, len.saturating_sub(1), false)),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(len.saturating_sub(1)), false)),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeSpec::Full,
        Some((_, _, true)) => RangeSpec::Unsatisfiable,
        Some((s, _, false)) if s >= len || len == 0 => RangeSpec::Unsatisfiable,
        Some((start, end, false)) => RangeSpec::Part { start, end },
    }
}

fn file_stream(file: OpenFile, start: u64, len: u64, metrics: Arc<Metrics>) -> Body {
    match &file.contents {
        Contents::Memory(b) => {
            metrics.http_bytes_sent.inc_by(len);
            Full::new(b.slice(start as usize..(start + len) as usize))
                .map_err(|never| match never {})
                .boxed()
        }
        Contents::File(_) => {
            let stream = futures_util::stream::unfold(
                (file, start, start + len),
                move |(file, pos, end)| {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        if pos >= end {
                            return None;
                        }
                        let want = ((end - pos) as usize).min(CHUNK);
                        let f = file.clone();
                        let read = tokio::task::spawn_blocking(move || f.read_at(pos, want)).await;
                        let chunk: std::io::Result<Bytes> = match read {
                            Ok(Ok(b)) if b.is_empty() => Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "file shrank while being sent",
                            )),
                            Ok(r) => r,
                            Err(e) => Err(std::io::Error::other(e)),
                        };
                        match chunk {
                            Ok(b) => {
                                metrics.http_bytes_sent.inc_by(b.len() as u64);
                                let n = b.len() as u64;
                                Some((Ok(Frame::data(b)), (file, pos + n, end)))
                            }
                            Err(e) => {
                                tracing::warn!(path = %file.path.display(), error = %e, "asset read failed mid-stream");
                                Some((Err(e), (file, end, end)))
                            }
                        }
                    }
                },
            );
            StreamBody::new(stream).boxed()
        }
    }
}

/// Answers a GET or HEAD for an opened file, honouring conditional and range headers.
pub fn serve_file(
    req: &Request<Incoming>,
    file: OpenFile,
    metrics: Arc<Metrics>,
) -> Response<Body> {
    let etag = file.etag();
    let header = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::LAST_MODIFIED,
            httpdate::fmt_http_date(file.modified),
        )
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(inm) = header(header::IF_NONE_MATCH)
        && (inm.trim() == "*" || inm.split(',').any(|t| t.trim() == etag))
    {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(empty())
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"));
    }
    let len = file.len;
    let mut range = header(header::RANGE).map_or(RangeSpec::Full, |r| parse_range(r, len));
    if let Some(if_range) = header(header::IF_RANGE)
        && if_range.trim() != etag
    {
        range = RangeSpec::Full;
    }
    let (status, start, count) = match range {
        RangeSpec::Full => (StatusCode::OK, 0, len),
        RangeSpec::Part { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeSpec::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(empty())
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response"));
        }
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, count);
    let body = if req.method() == Method::HEAD {
        empty()
    } else {
        file_stream(file, start, count, metrics)
    };
    builder
        .body(body)
        .unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn file_error(e: FileError) -> Response<Body> {
    match e {
        FileError::Forbidden(p) => {
            text(StatusCode::FORBIDDEN, format!("path {p:?} is not allowed"))
        }
        FileError::NotFound(p) => text(StatusCode::NOT_FOUND, format!("{p} not found")),
        FileError::Io { .. } => {
            tracing::error!(error = %e, "asset I/O error");
            text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file")
        }
    }
}

async fn open_then_serve(
    ctx: &HttpContext,
    req: &Request<Incoming>,
    open: impl FnOnce() -> Result<OpenFile, FileError> + Send + 'static,
) -> Response<Body> {
    match tokio::task::spawn_blocking(open).await {
        Ok(Ok(file)) => serve_file(req, file, Arc::clone(ctx.core.metrics())),
        Ok(Err(e)) => file_error(e),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn decoded_path(req: &Request<Incoming>, prefix: &str) -> Option<String> {
    let raw = req.uri().path().strip_prefix(prefix)?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// `/env/<name>/<file>`: a file the environment (from the config or the cluster) names,
/// nothing else.
pub async fn environment_file(ctx: &HttpContext, req: &Request<Incoming>) -> Response<Body> {
    let Some(rest) = decoded_path(req, "/env/") else {
        return text(StatusCode::BAD_REQUEST, "bad path");
    };
    let Some((env, file)) = rest.split_once('/') else {
        return text(StatusCode::NOT_FOUND, "no such file");
    };
    let Some(path) = ctx
        .core
        .environment(env)
        .and_then(|e| e.file_named(file).cloned())
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("environment {env:?} has no file {file:?}"),
        );
    };
    if let Some(file) = ctx.assets.open_trusted_cached(&path) {
        return serve_file(req, file, Arc::clone(ctx.core.metrics()));
    }
    let assets = Arc::clone(&ctx.assets);
    open_then_serve(ctx, req, move || assets.open_trusted(&path)).await
}

/// `<prefix><path>`: any file inside `root` (the assets folder at `/assets/`, the TFTP
/// root and its iPXE fallback at `/boot/`).
pub async fn asset(
    ctx: &HttpContext,
    root: &Arc<FileRoot>,
    prefix: &str,
    req: &Request<Incoming>,
) -> Response<Body> {
    let Some(name) = decoded_path(req, prefix) else {
        return text(StatusCode::BAD_REQUEST, "bad path");
    };
    if let Some(file) = root.open_cached(&name) {
        return serve_file(req, file, Arc::clone(ctx.core.metrics()));
    }
    let root = Arc::clone(root);
    open_then_serve(ctx, req, move || root.open(&name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Part { start: 0, end: 99 });
        assert_eq!(
            parse_range("bytes=900-", 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-100", 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(
            parse_range("bytes=990-2000", 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Full);
        assert_eq!(parse_range("bytes=5-1", 1000), Full);
        assert_eq!(parse_range("items=0-1", 1000), Full);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
    }
}
