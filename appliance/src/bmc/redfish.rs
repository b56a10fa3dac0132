//! Redfish over HTTPS: the host side of a Redfish BMC (hyper over tokio-rustls), the
//! transport under the `http` import of bmc-driver plugins.
//!
//! TLS is checked per BMC, because self-signed BMC certificates are the norm: against a CA
//! file, or against a pinned certificate (sha256 of its DER), and only on an explicit,
//! warned setting against nothing. Authentication is a Redfish session (deleted when the
//! client is done) with a fall back to basic auth where the BMC has no session service.
//! What to ask of the BMC (Reset targets, the boot override with its ETag) is the
//! `redfish` driver's business; polling until a change shows is the power manager's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{HeaderMap, HeaderValue};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig};

use super::PowerFailure;

/// How a BMC's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Against the CA certificates in this PEM file.
    Ca(std::path::PathBuf),
    /// The BMC's own certificate, by the sha256 of its DER encoding (hex).
    Pinned(String),
    /// Anything: only when set explicitly, and warned about on every connection.
    InsecureAcceptAny,
}

/// How to reach and log in to one Redfish BMC.
#[derive(Clone)]
pub struct RedfishTarget {
    /// `host:port` of the BMC's HTTPS service.
    pub authority: String,
    pub user: String,
    pub password: String,
    pub tls: TlsPolicy,
    /// One HTTP exchange.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedfishTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedfishTarget")
            .field("authority", &self.authority)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Why a Redfish exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedfishError {
    #[error("BMC {0}: cannot connect: {1}")]
    Connect(String, String),
    #[error("BMC {0}: TLS: {1}")]
    Tls(String, String),
    #[error("BMC {0} rejected the credentials of user {1:?}")]
    Credentials(String, String),
    #[error("BMC {0}: {1} answered {2}: {3}")]
    Status(String, String, u16, String),
    #[error("BMC {0} did not answer in time")]
    Timeout(String),
    #[error("BMC {0}: {1}")]
    Protocol(String, String),
}

impl RedfishError {
    /// What kind of failure this is.
    pub fn kind(&self) -> PowerFailure {
        match self {
            RedfishError::Connect(..) => PowerFailure::Unreachable,
            RedfishError::Tls(..) => PowerFailure::Tls,
            RedfishError::Credentials(..) => PowerFailure::Credentials,
            RedfishError::Status(..) => PowerFailure::Status,
            RedfishError::Timeout(..) => PowerFailure::Timeout,
            RedfishError::Protocol(..) => PowerFailure::Protocol,
        }
    }
}

fn tls_config(t: &RedfishTarget) -> Result<ClientConfig, RedfishError> {
    let tls_err = |m: String| RedfishError::Tls(t.authority.clone(), m);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?;
    Ok(match &t.tls {
        TlsPolicy::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| tls_err(format!("{}: {e}", path.display())))?
            {
                let cert = cert.map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsPolicy::Pinned(hex_sha) => crate::tls::pinned_client(Some(hex_sha)).map_err(tls_err)?,
        TlsPolicy::InsecureAcceptAny => {
            tracing::warn!(bmc = %t.authority, "TLS certificate NOT checked (tls = insecure-accept-any)");
            crate::tls::pinned_client(None).map_err(tls_err)?
        }
    })
}

/// An answer from the BMC.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

/// Largest answer body taken from a BMC.
const MAX_BODY: usize = 4 << 20;

/// An answer as it came, body unparsed.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A logged-in connection to one Redfish BMC.
pub struct RedfishClient {
    target: RedfishTarget,
    connector: TlsConnector,
    /// `X-Auth-Token` and the session's URI, or basic auth when `None`.
    session: Option<(String, String)>,
}

impl RedfishClient {
    /// Connects and logs in (a session, else basic auth).
    pub async fn login(target: &RedfishTarget) -> Result<RedfishClient, RedfishError> {
        let connector = TlsConnector::from(Arc::new(tls_config(target)?));
        let mut c = RedfishClient {
            target: target.clone(),
            connector,
            session: None,
        };
        let body = json!({"UserName": target.user, "Password": target.password});
        match c
            .send(
                "POST",
                "/redfish/v1/SessionService/Sessions",
                Some(body),
                None,
            )
            .await?
        {
            a if a.status == 201 || a.status == 200 => {
                let token = a.headers.get("x-auth-token").and_then(|v| v.to_str().ok());
                let location = a.headers.get("location").and_then(|v| v.to_str().ok());
                if let (Some(t), Some(l)) = (token, location) {
                    c.session = Some((t.to_string(), l.to_string()));
                }
            }
            a if a.status == 401 || a.status == 403 => {
                return Err(RedfishError::Credentials(
                    target.authority.clone(),
                    target.user.clone(),
                ));
            }
            // No session service: basic auth on every request. Check it once now.
            _ => {
                let a = c.send("GET", "/redfish/v1/Systems", None, None).await?;
                if a.status == 401 || a.status == 403 {
                    return Err(RedfishError::Credentials(
                        target.authority.clone(),
                        target.user.clone(),
                    ));
                }
            }
        }
        Ok(c)
    }

    /// Whether a Redfish session (not basic auth) is in use.
    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }

    /// Deletes the session, if any.
    pub async fn logout(self) -> Result<(), RedfishError> {
        if let Some((_, location)) = &self.session {
            let path = location
                .find("/redfish/")
                .map(|i| location[i..].to_string())
                .unwrap_or_else(|| location.clone());
            self.send("DELETE", &path, None, None).await?;
        }
        Ok(())
    }

    /// One JSON request on a fresh connection (BMCs drop idle ones eagerly).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Result<Answer, RedfishError> {
        let bytes = body
            .as_ref()
            .map(|b| Bytes::from(serde_json::to_vec(b).unwrap_or_default()))
            .unwrap_or_default();
        let headers: Vec<(String, String)> = if_match
            .map(|t| vec![("if-match".to_string(), t.to_string())])
            .unwrap_or_default();
        let raw = self.send_raw(method, path, bytes, &headers).await?;
        Ok(Answer {
            status: raw.status,
            body: serde_json::from_slice(&raw.body).unwrap_or(Value::Null),
            headers: raw.headers,
        })
    }

    /// One request with a body as given and extra headers, authenticated by the client.
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
        extra: &[(String, String)],
    ) -> Result<RawAnswer, RedfishError> {
        let t = &self.target;
        let bmc = t.authority.clone();
        let protocol =
            |e: &dyn std::fmt::Display| RedfishError::Protocol(bmc.clone(), e.to_string());
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&t.authority)
                .await
                .map_err(|e| RedfishError::Connect(bmc.clone(), e.to_string()))?;
            let host = t
                .authority
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&t.authority);
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| RedfishError::Tls(bmc.clone(), e.to_string()))?;
            let tls = self
                .connector
                .connect(name, tcp)
                .await
                .map_err(|e| RedfishError::Tls(bmc.clone(), e.to_string()))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| protocol(&e))?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", &t.authority)
                .header("accept", "application/json")
                .header("content-type", "application/json")
                .body(Full::new(body))
                .map_err(|e| protocol(&e))?;
            let h = req.headers_mut();
            let auth = match &self.session {
                Some((token, _)) => ("x-auth-token", token.clone()),
                None => {
                    use base64::Engine;
                    let v = base64::engine::general_purpose::STANDARD
                        .encode(format!("{}:{}", t.user, t.password));
                    ("authorization", format!("Basic {v}"))
                }
            };
            h.insert(
                auth.0,
                HeaderValue::from_str(&auth.1).map_err(|e| protocol(&e))?,
            );
            for (name, value) in extra {
                h.insert(
                    hyper::header::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| protocol(&e))?,
                    HeaderValue::from_str(value).map_err(|e| protocol(&e))?,
                );
            }
            let resp = sender.send_request(req).await.map_err(|e| protocol(&e))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            // A BMC's answers are small JSON documents; a runaway one must not fill memory.
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| protocol(&e))?
                .to_bytes();
            Ok(RawAnswer {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(t.timeout, exchange)
            .await
            .map_err(|_| RedfishError::Timeout(t.authority.clone()))?
    }
}
