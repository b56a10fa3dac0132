//! `[http]`: the HTTP server's section of `appliance.toml`, and its check.

use std::net::SocketAddr;

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
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            public_url: None,
            names: Vec::new(),
        }
    }
}

/// `[http]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
    /// Without a trailing `/`.
    pub public_url: Option<String>,
    /// Names the admin API answers to (lower case), `public_url`'s host among them.
    pub names: Vec<String>,
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
        Ok(HttpConfig {
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
