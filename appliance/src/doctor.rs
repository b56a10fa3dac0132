//! `arges doctor`: what a head node is missing before machines can boot from it.
//!
//! Reads the validated config and the disk, never the network: the iPXE binaries each
//! firmware family loads, the discovery environment's kernel and initramfs, whether
//! machines can reach the addresses HTTP, TFTP and proxyDHCP listen on, whether the
//! process may bind the ports below 1024 it is configured for, and (with [`plugins`])
//! which plugins load and whether any of them can drive a BMC.

use std::net::SocketAddr;
use std::path::Path;

use crate::config::{Config, DhcpMode};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Ok,
    /// Works, but probably not as intended.
    Warning,
    /// Machines will fail to boot.
    Missing,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

fn finding(severity: Severity, message: impl Into<String>) -> Finding {
    Finding {
        severity,
        message: message.into(),
    }
}

fn loopback_only(addrs: &[SocketAddr]) -> bool {
    addrs.iter().all(|a| a.ip().is_loopback())
}

/// Checks `config` against the disk. `may_bind_low_ports` is whether the process is root
/// (or has CAP_NET_BIND_SERVICE).
pub fn check(config: &Config, may_bind_low_ports: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let b = &config.dhcp.boot_files;
    for (family, name) in [
        ("BIOS", &b.bios),
        ("UEFI x86-64", &b.uefi_x86_64),
        ("UEFI i386", &b.uefi_i386),
        ("UEFI arm64", &b.uefi_arm64),
    ] {
        let in_root = config.tftp_root.join(name);
        let in_ipxe = config.ipxe_dir.as_deref().map(|d| d.join(name));
        let found = [Some(in_root.as_path()), in_ipxe.as_deref()]
            .into_iter()
            .flatten()
            .find(|p| p.is_file());
        out.push(match found {
            Some(p) => finding(
                Severity::Ok,
                format!("{family}: {name} found at {}", p.display()),
            ),
            // x86-64 is what nearly every server is; the others are warnings.
            None => finding(
                if family == "BIOS" || family == "UEFI x86-64" {
                    Severity::Missing
                } else {
                    Severity::Warning
                },
                format!(
                    "{family}: {name} is in neither {} nor {} (install Debian's ipxe package, or copy the binary into the TFTP root)",
                    config.tftp_root.display(),
                    config
                        .ipxe_dir
                        .as_deref()
                        .unwrap_or(Path::new(crate::config::DEBIAN_IPXE_DIR))
                        .display()
                ),
            ),
        });
    }
    for env in config.environments.values() {
        let missing: Vec<String> = env
            .files()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let discovery = env.name == config.discovery_environment;
        out.push(if missing.is_empty() {
            finding(
                Severity::Ok,
                format!("environment {}: kernel and initrds present", env.name),
            )
        } else {
            finding(
                if discovery {
                    Severity::Missing
                } else {
                    Severity::Warning
                },
                format!(
                    "environment {}: missing {}{}",
                    env.name,
                    missing.join(", "),
                    if discovery {
                        " (build them with deploy/build-initramfs.sh --out <that folder>)"
                    } else {
                        ""
                    }
                ),
            )
        });
    }
    match config.dhcp.mode {
        DhcpMode::Off => out.push(finding(
            Severity::Warning,
            "proxyDHCP is off: the site's DHCP server must hand out the boot file, or start with --dhcp proxy",
        )),
        DhcpMode::Proxy => {
            out.push(finding(
                Severity::Ok,
                format!(
                    "proxyDHCP on {:?} and {:?}{}",
                    config.dhcp.listen,
                    config.dhcp.pxe_listen,
                    if config.dhcp.interfaces.is_empty() {
                        " on every interface".to_string()
                    } else {
                        format!(" on {}", config.dhcp.interfaces.join(", "))
                    }
                ),
            ));
            if config.http.public_url.is_none() && loopback_only(&config.http.listen) {
                out.push(finding(
                    Severity::Missing,
                    format!(
                        "HTTP listens on {:?} only: machines cannot fetch boot scripts (set http.listen to 0.0.0.0:8080)",
                        config.http.listen
                    ),
                ));
            }
            if loopback_only(&config.tftp_listen) {
                out.push(finding(
                    Severity::Missing,
                    format!(
                        "TFTP listens on {:?} only: firmware cannot load iPXE (set tftp.listen to 0.0.0.0:69)",
                        config.tftp_listen
                    ),
                ));
            } else if !config.tftp_listen.iter().any(|a| a.port() == 69) {
                out.push(finding(
                    Severity::Missing,
                    "TFTP is not on port 69: PXE firmware always asks port 69".to_string(),
                ));
            }
        }
    }
    let mut low: Vec<SocketAddr> = config
        .http
        .listen
        .iter()
        .chain(&config.tftp_listen)
        .copied()
        .collect();
    if config.dhcp.mode == DhcpMode::Proxy {
        low.extend(config.dhcp.listen.iter().chain(&config.dhcp.pxe_listen));
    }
    low.retain(|a| a.port() != 0 && a.port() < 1024);
    if !low.is_empty() && !may_bind_low_ports {
        out.push(finding(
            Severity::Missing,
            format!("ports below 1024 ({low:?}) need root or CAP_NET_BIND_SERVICE"),
        ));
    }
    out.extend(https_findings(config));
    out
}

/// Where the admin token may cross the network in clear, and the HTTPS certificate with
/// the sha256 agents and operators pin.
fn https_findings(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let exposed: Vec<_> = (config.http.listen.iter())
        .filter(|a| !a.ip().is_loopback())
        .collect();
    if config.http.admin_listen.is_empty() && !exposed.is_empty() {
        out.push(finding(
            Severity::Warning,
            format!(
                "the admin API is served on plain HTTP at {exposed:?}, reachable from the network: give it its own listener (http.admin_listen, loopback)"
            ),
        ));
    }
    if config.http.tls_listen.is_empty() && config.http.admin_listen.is_empty() {
        if !exposed.is_empty() {
            out.push(finding(
                Severity::Warning,
                "no HTTPS listener (http.tls_listen): agents' registrations cross the network in clear".to_string(),
            ));
        }
        return out;
    }
    out.push(certificate_finding(config));
    out
}

/// The HTTPS certificate, and the sha256 agents and operators pin.
fn certificate_finding(config: &Config) -> Finding {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    match CertificateDer::pem_file_iter(&config.tls_cert)
        .ok()
        .and_then(|mut certs| certs.next())
        .and_then(Result::ok)
    {
        Some(cert) => finding(
            Severity::Ok,
            format!(
                "HTTPS certificate {}: sha256 {} (agents pin it with arges.pin=)",
                config.tls_cert.display(),
                crate::tls::cert_sha256(cert.as_ref())
            ),
        ),
        None if config.tls_generate => finding(
            Severity::Ok,
            format!(
                "HTTPS certificate {} will be made on first start",
                config.tls_cert.display()
            ),
        ),
        None => finding(
            Severity::Missing,
            format!(
                "HTTPS certificate {} cannot be read",
                config.tls_cert.display()
            ),
        ),
    }
}

/// Loads the plugins folder as the appliance would (compiling into its cache) and says
/// what is there: boot policies, BMC drivers, and files that do not load.
#[cfg(feature = "plugins")]
pub fn plugins(config: &Config) -> Vec<Finding> {
    let mut settings = config.plugins.clone();
    // A one-off load needs no reserved address space.
    settings.pooling = false;
    let host = match crate::plugins::PluginHost::new(
        settings,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    ) {
        Ok(h) => h,
        Err(e) => return vec![finding(Severity::Warning, format!("plugin host: {e}"))],
    };
    let report = host.rescan();
    let mut out: Vec<Finding> = report
        .failed
        .iter()
        .map(|(name, why)| {
            finding(
                Severity::Warning,
                format!("plugin {name} does not load: {why}"),
            )
        })
        .collect();
    let loaded = host.plugins();
    let (policies, drivers): (Vec<_>, Vec<_>) = loaded.iter().partition(|p| p.is_policy());
    let names = |v: &[&std::sync::Arc<crate::plugins::Plugin>]| {
        v.iter()
            .map(|p| p.name.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !policies.is_empty() {
        out.push(finding(
            Severity::Ok,
            format!("boot-policy plugins: {}", names(&policies)),
        ));
    }
    out.push(if drivers.is_empty() {
        finding(
            Severity::Warning,
            format!(
                "no bmc-driver plugin in {}: Arges cannot power machines (copy ipmi.wasm, redfish.wasm from plugins/out)",
                config.plugins.dir.display()
            ),
        )
    } else {
        finding(Severity::Ok, format!("bmc-driver plugins: {}", names(&drivers)))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn names_what_is_missing_and_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let ipxe = dir.path().join("ipxe");
        std::fs::create_dir_all(data.join("tftp")).unwrap();
        std::fs::create_dir_all(&ipxe).unwrap();
        std::fs::write(data.join("tftp/undionly.kpxe"), b"x").unwrap();
        std::fs::write(ipxe.join("ipxe.efi"), b"x").unwrap();
        let src = format!(
            "data_dir = \"{}\"\n[tftp]\nipxe_dir = \"{}\"\nlisten = [\"0.0.0.0:69\"]\n[dhcp]\nmode = \"proxy\"\n",
            data.display(),
            ipxe.display()
        );
        let c = Config::from_source("t.toml", &src, Path::new(""), &Overrides::default()).unwrap();
        let report = check(&c, false);
        let has = |sev: Severity, needle: &str| {
            report
                .iter()
                .any(|f| f.severity == sev && f.message.contains(needle))
        };
        assert!(has(Severity::Ok, "BIOS: undionly.kpxe found"), "{report:?}");
        assert!(
            has(Severity::Ok, "UEFI x86-64: ipxe.efi found"),
            "{report:?}"
        );
        assert!(
            has(Severity::Warning, "UEFI arm64: ipxe-arm64.efi"),
            "{report:?}"
        );
        assert!(
            has(Severity::Missing, "environment discovery: missing"),
            "{report:?}"
        );
        assert!(has(Severity::Missing, "HTTP listens on"), "{report:?}");
        assert!(has(Severity::Missing, "need root"), "{report:?}");
        assert!(!has(Severity::Missing, "TFTP"), "{report:?}");
        assert!(
            check(&c, true)
                .iter()
                .all(|f| !f.message.contains("need root"))
        );
        assert!(
            !has(Severity::Warning, "plain HTTP") && !has(Severity::Warning, "HTTPS"),
            "loopback only: nothing crosses the network {report:?}"
        );
    }

    #[test]
    fn the_https_certificate_and_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let src = format!(
            "data_dir = \"{}\"\n[http]\nadmin_listen = [\"127.0.0.1:8443\"]\n",
            dir.path().display()
        );
        let c = Config::from_source("t.toml", &src, Path::new(""), &Overrides::default()).unwrap();
        assert!(
            certificate_finding(&c)
                .message
                .contains("will be made on first start")
        );
        let exposed = "[http]\nlisten = [\"0.0.0.0:8080\"]\n";
        let open =
            Config::from_source("t.toml", exposed, Path::new(""), &Overrides::default()).unwrap();
        let warned = https_findings(&open);
        assert!(
            warned.iter().any(|f| f.severity == Severity::Warning
                && f.message.contains("admin API is served on plain HTTP"))
                && warned.iter().any(|f| f.message.contains("in clear")),
            "{warned:?}"
        );
        assert_eq!(https_findings(&c).len(), 1, "the certificate only");
        let tls = crate::tls::ServerTls::load_or_generate(
            &c.tls_cert,
            &c.tls_key,
            true,
            &["localhost".to_string()],
        )
        .unwrap();
        let f = certificate_finding(&c);
        assert!(
            f.severity == Severity::Ok && f.message.contains(&tls.sha256),
            "{f:?}"
        );
    }
}
