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
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            public_url: None,
        }
    }
}

/// `[http]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: Vec<SocketAddr>,
    /// Without a trailing `/`.
    pub public_url: Option<String>,
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
        Ok(HttpConfig {
            listen: h.listen.clone(),
            public_url: h
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
        })
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
        h.public_url = None;
        h.listen.clear();
        assert_eq!(HttpConfig::try_from(&h).unwrap_err().key, "http.listen");
    }
}
