//! `[http]`: the HTTP server's section of `appliance.toml`, and its check.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Invalid;

/// `[http]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Base URL machines use to reach the appliance; by default taken from each request's
    /// Host header.
    pub public_url: Option<String>,
    /// Host names the admin API answers to, beside IP addresses, `localhost` and
    /// `public_url`'s host: a request naming any other is refused, so a web page an
    /// operator visits cannot reach the admin API by rebinding its own name to ours.
    pub names: Vec<String>,
    /// HTTPS listeners: everything the plain listeners serve (agents register here,
    /// pinning the certificate), and the admin API unless `admin_listen` takes it.
    pub tls_listen: Vec<SocketAddr>,
    /// The admin API's own HTTPS listeners. When set, the admin API is served here only
    /// (the machines' listeners answer 404 for it). Loopback in the shipped configs: the
    /// network only when asked.
    pub admin_listen: Vec<SocketAddr>,
    /// The certificate and key (PEM) of the HTTPS listeners; unset, a self-signed pair is
    /// made on first start in the data folder (`tls/appliance.crt`, `tls/appliance.key`).
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Connections open at once; past it new ones are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_connections_per_source: usize,
    /// A connection that moves no byte either way for this long is closed, seconds.
    pub idle_secs: u64,
    /// A request's headers must arrive within this, seconds.
    pub header_secs: u64,
    /// A request's body must arrive whole within this, seconds.
    pub body_secs: u64,
    /// Largest registration body, bytes.
    pub max_registration_bytes: usize,
    /// Largest admin API body (a machine's configuration), bytes.
    pub max_admin_body_bytes: usize,
    /// `/boot.ipxe` requests one address may make: a burst, then this many a second
    /// (0: no limit).
    pub boot_per_source_per_sec: f64,
    pub boot_per_source_burst: u32,
    /// Registrations one address may make: a burst, then this many a second (0: no
    /// limit).
    pub registrations_per_source_per_sec: f64,
    pub registrations_per_source_burst: u32,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            public_url: None,
            names: Vec::new(),
            tls_listen: Vec::new(),
            admin_listen: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            max_connections: 1024,
            max_connections_per_source: 64,
            idle_secs: 60,
            header_secs: 30,
            body_secs: 30,
            max_registration_bytes: 256 << 10,
            max_admin_body_bytes: 8 << 20,
            boot_per_source_per_sec: 2.0,
            boot_per_source_burst: 20,
            registrations_per_source_per_sec: 0.5,
            registrations_per_source_burst: 10,
        }
    }
}

/// The HTTP edge's limits, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub idle: Duration,
    pub header: Duration,
    pub body: Duration,
    pub max_registration_bytes: usize,
    pub max_admin_body_bytes: usize,
    pub boot_per_sec: f64,
    pub boot_burst: u32,
    pub registrations_per_sec: f64,
    pub registrations_burst: u32,
}

/// `[http]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
    /// Without a trailing `/`.
    pub public_url: Option<String>,
    /// Names the admin API answers to (lower case), `public_url`'s host among them.
    pub names: Vec<String>,
    pub tls_listen: Vec<SocketAddr>,
    pub admin_listen: Vec<SocketAddr>,
    pub limits: HttpLimits,
}

impl TryFrom<&HttpSection> for HttpConfig {
    type Error = Invalid;

    fn try_from(h: &HttpSection) -> Result<Self, Invalid> {
        if h.listen.is_empty() {
            return Err(Invalid::new("http.listen", "needs at least one address"));
        }
        if let Some(url) = &h.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Invalid::new(
                "http.public_url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        let mut names: Vec<String> = h.names.iter().map(|n| n.to_ascii_lowercase()).collect();
        if let Some(url) = &h.public_url {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or_default();
            names.push(host_of(authority).to_ascii_lowercase());
        }
        for n in &names {
            if n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '/') {
                return Err(Invalid::new(
                    "http.names",
                    format!("{n:?} is not a host name"),
                ));
            }
        }
        for (key, zero) in [
            ("http.max_connections", h.max_connections == 0),
            (
                "http.max_connections_per_source",
                h.max_connections_per_source == 0,
            ),
            ("http.idle_secs", h.idle_secs == 0),
            ("http.header_secs", h.header_secs == 0),
            ("http.body_secs", h.body_secs == 0),
            (
                "http.max_registration_bytes",
                h.max_registration_bytes < 1024,
            ),
            ("http.max_admin_body_bytes", h.max_admin_body_bytes < 1024),
        ] {
            if zero {
                return Err(Invalid::new(
                    key,
                    "is too small (at least 1; bodies 1024 bytes)",
                ));
            }
        }
        for (key, rate) in [
            ("http.boot_per_source_per_sec", h.boot_per_source_per_sec),
            (
                "http.registrations_per_source_per_sec",
                h.registrations_per_source_per_sec,
            ),
        ] {
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(Invalid::new(key, "must be 0 (no limit) or more"));
            }
        }
        if h.tls_cert_file.is_some() != h.tls_key_file.is_some() {
            return Err(Invalid::new(
                "http.tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither (a certificate is made)",
            ));
        }
        Ok(HttpConfig {
            tls_listen: h.tls_listen.clone(),
            admin_listen: h.admin_listen.clone(),
            limits: HttpLimits {
                max_connections: h.max_connections,
                max_connections_per_source: h.max_connections_per_source,
                idle: Duration::from_secs(h.idle_secs),
                header: Duration::from_secs(h.header_secs),
                body: Duration::from_secs(h.body_secs),
                max_registration_bytes: h.max_registration_bytes,
                max_admin_body_bytes: h.max_admin_body_bytes,
                boot_per_sec: h.boot_per_source_per_sec,
                boot_burst: h.boot_per_source_burst,
                registrations_per_sec: h.registrations_per_source_per_sec,
                registrations_burst: h.registrations_per_source_burst,
            },
            listen: h.listen.clone(),
            public_url: h
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            names,
        })
    }
}

/// The host of a `Host` header or URL authority, without the port (`[::1]:80` → `::1`).
pub fn host_of(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or_default();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    }
}

impl HttpConfig {
    /// Whether an admin request naming `host` (its `Host` header) is for us: an IP
    /// address, `localhost`, or a configured name. A DNS rebinding attack needs a name.
    pub fn admin_host_allowed(&self, host: &str) -> bool {
        let h = host_of(host).to_ascii_lowercase();
        h.parse::<std::net::IpAddr>().is_ok() || h == "localhost" || self.names.contains(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_public_url() {
        let mut h = HttpSection {
            public_url: Some("http://10.0.0.2:8080/".into()),
            ..Default::default()
        };
        let c = HttpConfig::try_from(&h).unwrap();
        assert_eq!(c.public_url.as_deref(), Some("http://10.0.0.2:8080"));
        h.public_url = Some("ftp://x".into());
        assert_eq!(HttpConfig::try_from(&h).unwrap_err().key, "http.public_url");
        h.public_url = Some("http://Arges.Rack1:8080/".into());
        let c = HttpConfig::try_from(&h).unwrap();
        assert!(c.admin_host_allowed("arges.rack1:8080"));
        assert!(c.admin_host_allowed("10.0.0.2:8080") && c.admin_host_allowed("[::1]:8080"));
        assert!(c.admin_host_allowed("localhost"));
        assert!(!c.admin_host_allowed("evil.example.com"));
        assert!(!c.admin_host_allowed(""));
        h.public_url = None;
        h.listen.clear();
        assert_eq!(HttpConfig::try_from(&h).unwrap_err().key, "http.listen");
    }
}
