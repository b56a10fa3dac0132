//! The admin API from a shell: `arges bmc status|power|bootdev|set SERVER` (power) and
//! `arges server arm|disarm|show SERVER` (provisioning windows). Each prints one line per
//! answer (or the JSON with `--json`) and exits non-zero when it was not done.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{Value, json};

use crate::cli::{AdminArgs, BmcArgs, BmcCommand, ServerArgs, ServerCommand};

/// One request to the admin API.
async fn call(
    args: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let file = args.data_dir.join("admin.token");
            std::fs::read_to_string(&file)
                .with_context(|| {
                    format!(
                        "no --token and cannot read {} (use --data-dir or ARGES_ADMIN_TOKEN)",
                        file.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    let url: hyper::Uri = args.url.parse().context("--url is not a URL")?;
    let tls = match url.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("--url must be http://host:port or https://host:port"),
    };
    let host = url.host().context("--url has no host")?;
    let authority = url.authority().context("--url has no host")?.to_string();
    let addr = format!(
        "{host}:{}",
        url.port_u16().unwrap_or(if tls { 443 } else { 80 })
    );
    let pin = if tls { Some(admin_pin(args)?) } else { None };
    let mut sender = arges::tls::http1_connect(&addr, host, pin.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the appliance at {}: {e}", args.url))?;
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&raw)}));
    Ok((status, value))
}

/// The sha256 the admin API's certificate must have: `--pin`, or the certificate the
/// appliance keeps in its data folder (the CLI runs on the head node beside it).
fn admin_pin(args: &AdminArgs) -> Result<String> {
    if let Some(pin) = &args.pin {
        return Ok(pin.clone());
    }
    let cert = args.data_dir.join("tls").join("appliance.crt");
    let pem = std::fs::read(&cert).with_context(|| {
        format!(
            "an https:// --url needs the certificate's sha256: give --pin (arges doctor prints it) or --data-dir holding {}",
            cert.display()
        )
    })?;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
        .with_context(|| format!("{} holds no PEM certificate", cert.display()))?;
    Ok(arges::tls::cert_sha256(der.as_ref()))
}

/// `/api/v1/servers/ID`, the id percent-encoded.
fn server_path(id: &str) -> String {
    // Unreserved characters and `:` stay as they are; anything else is encoded.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b':');
    format!(
        "/api/v1/servers/{}",
        percent_encoding::utf8_percent_encode(id, SEGMENT)
    )
}

/// Runs an `arges server` subcommand.
pub async fn server(args: ServerArgs) -> Result<()> {
    let (method, path) = match &args.command {
        ServerCommand::Arm { server } => ("POST", format!("{}/arm", server_path(server))),
        ServerCommand::Disarm { server } => ("POST", format!("{}/disarm", server_path(server))),
        ServerCommand::Show { server } => ("GET", server_path(server)),
        ServerCommand::Boots { server, .. } => ("GET", format!("{}/boots", server_path(server))),
    };
    let (status, answer) = call(&args.admin, method, &path, None).await?;
    if args.admin.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if let Some(e) = answer["error"].as_str() {
        println!("error: {e}");
    } else if let ServerCommand::Boots { last, .. } = &args.command {
        print!("{}", boots_text(&answer, *last));
    } else {
        println!("{}", window_summary(&answer));
    }
    match status {
        200 => Ok(()),
        s => bail!("the appliance answered {s}"),
    }
}

/// A server's last `last` boots, a line per step: time into the boot, the gap since the
/// step before, and what happened.
fn boots_text(answer: &Value, last: usize) -> String {
    let boots = answer["boots"].as_array().map_or(&[][..], Vec::as_slice);
    if boots.is_empty() {
        return format!(
            "{}: no boot witnessed since the appliance started\n",
            answer["server"].as_str().unwrap_or("?")
        );
    }
    let mut out = String::new();
    for b in &boots[boots.len().saturating_sub(last)..] {
        let started = b["started_ms"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "boot at {} ({} steps, {:.1} s{})\n",
            httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(started)
            ),
            b["steps"].as_array().map_or(0, Vec::len),
            b["last_ms"]
                .as_u64()
                .unwrap_or(started)
                .saturating_sub(started) as f64
                / 1000.0,
            match b["dropped"].as_u64() {
                Some(n) if n > 0 => format!(", {n} more not kept"),
                _ => String::new(),
            }
        ));
        for s in b["steps"].as_array().map_or(&[][..], Vec::as_slice) {
            let at = s["at_ms"]
                .as_u64()
                .unwrap_or(started)
                .saturating_sub(started);
            out.push_str(&format!(
                "  +{:>8.3} s  (gap {:>7.3} s)  {}\n",
                at as f64 / 1000.0,
                s["gap_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                step_text(s)
            ));
        }
    }
    out
}

/// One witnessed step in words.
fn step_text(s: &Value) -> String {
    let f = |k: &str| s[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    match s["step"].as_str().unwrap_or("?") {
        "dhcp" => format!(
            "proxyDHCP answered {} ({}): boot file {}",
            f("client"),
            f("firmware"),
            f("boot_file")
        ),
        "tftp" => format!(
            "TFTP {} {}: {} bytes in {} ms, blksize {}, window {}, {} retransmits",
            f("file"),
            f("outcome"),
            n("bytes"),
            n("millis"),
            n("blksize"),
            n("window"),
            n("retransmits")
        ),
        "boot_script" => format!("/boot.ipxe: {} (decided by {})", f("action"), f("by")),
        "fetch" => format!(
            "GET {} {}: {} bytes in {} ms",
            f("path"),
            n("status"),
            n("bytes"),
            n("millis")
        ),
        "registered" => format!("registered as {}", f("uuid")),
        "config_served" => format!("configuration served to {}", f("to")),
        "done" => "install reported done".to_string(),
        "power" => format!(
            "BMC {}{}",
            f("operation"),
            if s["ok"].as_bool() == Some(false) {
                " FAILED"
            } else {
                ""
            }
        ),
        other => other.to_string(),
    }
}

/// One line about a server's window and alarm.
fn window_summary(s: &Value) -> String {
    let id = s["id"].as_str().unwrap_or("?");
    let w = &s["window"];
    let window = if w.is_object() {
        let state = match &w["closed"] {
            Value::Object(c) => c.get("why").and_then(Value::as_str).unwrap_or("closed"),
            _ if w["claimant"].is_object() => "claimed",
            _ => "open until its deadline",
        };
        format!(
            "window {} ({}, opened by {}, expires at {}){}",
            w["id"].as_str().unwrap_or("?"),
            state,
            w["opened_by"].as_str().unwrap_or("?"),
            w["expires_at"],
            match w["claimant"]["source"].as_str() {
                Some(src) => format!(", claimed by {src}"),
                None => String::new(),
            }
        )
    } else {
        "no window".to_string()
    };
    match s["alarm"]["message"].as_str() {
        Some(m) => format!("{id}: {window}; ALARM: {m}"),
        None => format!("{id}: {window}"),
    }
}

/// Runs an `arges bmc` subcommand.
pub async fn bmc(args: BmcArgs) -> Result<()> {
    let admin = &args.admin;
    let (status, answer) = match &args.command {
        BmcCommand::Status { server } => {
            call(
                admin,
                "GET",
                &format!("{}/bmc/status", server_path(server)),
                None,
            )
            .await?
        }
        BmcCommand::Power { server, action } => {
            call(
                admin,
                "POST",
                &format!("{}/bmc/power", server_path(server)),
                Some(json!({"action": action})),
            )
            .await?
        }
        BmcCommand::Bootdev {
            server,
            device,
            persistent,
            legacy,
        } => {
            let body = json!({"device": device, "persistent": persistent, "efi": !legacy});
            call(
                admin,
                "POST",
                &format!("{}/bmc/bootdev", server_path(server)),
                Some(body),
            )
            .await?
        }
        BmcCommand::Set {
            server,
            address,
            protocol,
            username,
            password_file,
            driver,
            ca_file,
            pin_sha256,
            insecure,
        } => {
            let password = match password_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
                None => std::env::var("ARGES_BMC_PASSWORD")
                    .context("give --password-file or set ARGES_BMC_PASSWORD")?,
            };
            let mut tls = json!({});
            if let Some(ca) = ca_file {
                tls["ca_file"] = json!(std::path::absolute(ca)?);
            }
            if let Some(pin) = pin_sha256 {
                tls["pin_sha256"] = json!(pin);
            }
            if *insecure {
                tls["insecure"] = json!(true);
            }
            let body = json!({
                "address": address, "protocol": protocol, "username": username,
                "password": password, "driver": driver, "tls": tls,
            });
            call(
                admin,
                "PUT",
                &format!("{}/bmc", server_path(server)),
                Some(body),
            )
            .await?
        }
    };
    if admin.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", summary(&answer));
    }
    match status {
        200 => Ok(()),
        502 => bail!("the BMC did not do it"),
        s => bail!("the appliance answered {s}"),
    }
}

/// One line about an answer.
fn summary(a: &Value) -> String {
    if let Some(e) = a["error"].as_str() {
        return format!("error: {e}");
    }
    if a["event"].is_object() {
        let e = &a["event"];
        let p = &a["power"];
        let boot = match &p["next_boot"] {
            Value::Null => "-".to_string(),
            b => format!(
                "{}{}{}",
                b["device"].as_str().unwrap_or("?"),
                if b["persistent"].as_bool() == Some(true) {
                    " persistent"
                } else {
                    ""
                },
                if b["efi"].as_bool() == Some(true) {
                    " uefi"
                } else {
                    " legacy"
                }
            ),
        };
        return if e["ok"].as_bool() == Some(true) {
            format!(
                "{}: {} ok (driver {}, {} steps, {} ms); power {}, next boot {}",
                a["server"].as_str().unwrap_or("?"),
                e["operation"].as_str().unwrap_or("?"),
                e["driver"].as_str().unwrap_or("?"),
                e["attempts"],
                e["took_ms"],
                p["state"].as_str().unwrap_or("unknown"),
                boot
            )
        } else {
            format!(
                "{}: {} FAILED ({}): {}",
                a["server"].as_str().unwrap_or("?"),
                e["operation"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            )
        };
    }
    match &a["bmc"] {
        Value::Object(b) => format!(
            "{}: BMC {} ({}, user {}{})",
            a["id"].as_str().unwrap_or("?"),
            b.get("address").and_then(|v| v.as_str()).unwrap_or("?"),
            b.get("protocol").and_then(|v| v.as_str()).unwrap_or("?"),
            b.get("username").and_then(|v| v.as_str()).unwrap_or("?"),
            b.get("driver")
                .and_then(|v| v.as_str())
                .map(|d| format!(", driver {d}"))
                .unwrap_or_default()
        ),
        _ => a.to_string(),
    }
}
