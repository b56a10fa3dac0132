//! TLS for the appliance's own services (the admin API, and agents' registrations) and
//! the one client rule they and the Redfish transport share: a certificate accepted by
//! the sha256 of its DER encoding (a pin), so no CA is needed on a provisioning network.
//!
//! The appliance's certificate comes from the config (`[http] tls_cert_file` and
//! `tls_key_file`) or is made on first start into the data folder (self-signed, for the
//! appliance's addresses and names); its sha256 is logged at start, shown by
//! `arges doctor`, and handed to agents on their kernel command line (`arges.pin=`).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};

/// The hex sha256 of a certificate's DER encoding: what a pin names.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Accepts exactly one certificate, by its sha256, or (no pin: an explicit insecure
/// setting) any; handshake signatures are verified either way.
#[derive(Debug)]
pub struct PinnedVerifier {
    sha256: Option<Vec<u8>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.sha256 {
            Some(pin) if Sha256::digest(end_entity.as_ref()).as_slice() != pin.as_slice() => Err(
                rustls::Error::General("the certificate is not the pinned one".into()),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client that accepts only the certificate whose sha256 is `pin` (hex), or, with
/// `None`, any (the caller warns).
pub fn pinned_client(pin: Option<&str>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sha256 = match pin {
        Some(hex_sha) => Some(
            hex::decode(hex_sha.trim())
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| format!("pin {hex_sha:?} is not a hex sha256"))?,
        ),
        None => None,
    };
    Ok(ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier { sha256, provider }))
        .with_no_client_auth())
}

/// An HTTP/1 connection to `host_port` (`host` names it for TLS): plain without a pin,
/// TLS to exactly the pinned certificate with one. The admin CLI and the agent dial this
/// way; neither has an "accept any certificate" mode.
pub async fn http1_connect(
    host_port: &str,
    host: &str,
    pin: Option<&str>,
) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(host_port)
        .await
        .map_err(|e| format!("cannot reach {host_port}: {e}"))?;
    let Some(pin) = pin else {
        return handshake(stream).await;
    };
    let config = pinned_client(Some(pin))?;
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host:?} cannot name a TLS server: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS with {host_port}: {e}"))?;
    handshake(stream).await
}

async fn handshake<S>(io: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The appliance's own certificate, ready to serve.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// The certificate's sha256 (hex): what agents pin.
    pub sha256: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Why the appliance's certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("cannot make a certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not go together: {0}")]
    Config(String),
}

impl ServerTls {
    /// The certificate in `cert` and key in `key` (PEM). When both are missing and
    /// `generate` holds, a self-signed one for `names` (host names and addresses) is made
    /// and written there first (the key 0600).
    pub fn load_or_generate(
        cert: &Path,
        key: &Path,
        generate: bool,
        names: &[String],
    ) -> Result<ServerTls, TlsError> {
        if generate && !cert.exists() && !key.exists() {
            let made = rcgen::generate_simple_self_signed(names.to_vec())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            let file_err = |p: &Path, e: std::io::Error| TlsError::File {
                path: p.display().to_string(),
                message: e.to_string(),
            };
            crate::sealing::write_private(key, made.signing_key.serialize_pem().as_bytes())
                .map_err(|e| file_err(key, e))?;
            std::fs::write(cert, made.cert.pem()).map_err(|e| file_err(cert, e))?;
            tracing::info!(cert = %cert.display(), ?names, "made a self-signed TLS certificate");
        }
        let bad = |p: &Path, e: String| TlsError::File {
            path: p.display().to_string(),
            message: e,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        let first = chain
            .first()
            .ok_or_else(|| bad(cert, "holds no certificate".into()))?;
        let sha256 = cert_sha256(first.as_ref());
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(ServerTls {
            config: Arc::new(config),
            sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_kept_and_pinned_by_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let first = ServerTls::load_or_generate(&cert, &key, true, &names).unwrap();
        assert_eq!(first.sha256.len(), 64);
        let again = ServerTls::load_or_generate(&cert, &key, true, &names).unwrap();
        assert_eq!(again.sha256, first.sha256, "kept, not made again");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let missing = ServerTls::load_or_generate(
            &dir.path().join("none.crt"),
            &dir.path().join("none.key"),
            false,
            &names,
        );
        assert!(missing.is_err(), "nothing made unless asked");
        assert!(pinned_client(Some("abc")).is_err());
        assert!(pinned_client(Some(&first.sha256)).is_ok());
    }
}
