//! The operator's console at `/console/`: server-rendered HTML (maud), a few lines of our
//! own JavaScript (confirmations, live updates), served wherever the admin API is.
//!
//! Access: the admin token (or, in Kubernetes mode, the token of a Kubernetes user the
//! cluster allows to update Servers: TokenReview, then SubjectAccessReview), typed once
//! into the login form, is exchanged for a session
//! (a random id in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/console`, eight
//! hours); the appliance keeps only the id's sha256. Every action is a POST carrying the
//! session's CSRF token and, when the browser sends one, an `Origin` naming this host: a
//! cross-site form is refused. Without a valid session every page is the login page
//! (401). Pages: the fleet (filtered, searched, paged), a server (hardware, power and its
//! history, window and alarm, its boots drawn as timelines, actions), live boots (updated
//! by server-sent events), and the audit log. Actions are recorded in the audit log like
//! the admin API's, as `admin (console)`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest, Sha256};

use super::{Body, HttpContext, full, query_param, read_body};
use crate::audit::Outcome;
use crate::bmc::PowerAction;
use crate::core::{CoreError, ServerEdit};
use crate::inventory::Server;
use crate::timeline::Boot;

/// How long a session lasts.
const SESSION: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most (each login makes one; the oldest go).
const MAX_SESSIONS: usize = 1024;
/// Servers per fleet page.
const PAGE: usize = 100;
const COOKIE: &str = "arges_session";

/// The console's sessions, by the sha256 of their id.
#[derive(Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<String, Session>>,
}

struct Session {
    csrf: String,
    /// Who logged in (`admin`, or `kubernetes <user>`), for the audit log.
    who: String,
    expires: Instant,
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    hex::encode(b)
}

fn hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

impl Sessions {
    /// A new session for `who`: its id (for the cookie).
    fn open(&self, who: &str) -> String {
        let id = random_hex();
        let mut m = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, s| s.expires > now);
        if m.len() >= MAX_SESSIONS
            && let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            m.remove(&oldest);
        }
        m.insert(
            hash(&id),
            Session {
                csrf: random_hex(),
                who: who.to_string(),
                expires: now + SESSION,
            },
        );
        id
    }

    /// The CSRF token and the operator of the live session `id`.
    fn csrf_of(&self, id: &str) -> Option<(String, String)> {
        let m = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&hash(id))
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.csrf.clone(), s.who.clone()))
    }

    fn close(&self, id: &str) {
        let mut m = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&hash(id));
    }
}

fn cookie(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The page headers every console answer carries.
fn page(status: StatusCode, body: Markup) -> Response<Body> {
    let mut r = full(status, "text/html; charset=utf-8", body.into_string());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn redirect(to: &str, set_cookie: Option<String>) -> Response<Body> {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

const STYLE: &str = include_str!("console/style.css");
const SCRIPT: &str = include_str!("console/app.js");

fn layout(title: &str, csrf: Option<&str>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Arges" }
                link rel="stylesheet" href="/console/style.css";
                script src="/console/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/console/" { "Arges" }
                    @if let Some(csrf) = csrf {
                        nav {
                            a href="/console/" { "Fleet" }
                            a href="/console/boots" { "Live boots" }
                            a href="/console/plugins" { "Plugins" }
                            a href="/console/audit" { "Audit log" }
                            form method="post" action="/console/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (content) }
            }
        }
    }
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response<Body> {
    page(
        status,
        layout(
            "Log in",
            None,
            html! {
                h1 { "Log in" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form.login method="post" action="/console/login" {
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="current-password" required;
                    button type="submit" { "Log in" }
                }
                p.hint { "The token is in the appliance's data folder (admin.token)." }
            },
        ),
    )
}

fn ago(unix: u64) -> String {
    let now = crate::inventory::now();
    let d = now.saturating_sub(unix);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86_400),
    }
}

/// A boot drawn as a timeline: one bar per step, placed by its time in the boot.
fn timeline(b: &Boot) -> Markup {
    let total = b.duration_ms().max(1) as f64;
    html! {
        figure.timeline {
            figcaption {
                "Boot at " (httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(b.started_ms)))
                ": " (b.steps.len()) " steps, " (format!("{:.1}", b.duration_ms() as f64 / 1000.0)) " s"
                @if b.dropped > 0 { " (" (b.dropped) " more not kept)" }
            }
            ol {
                @for s in &b.steps {
                    @let (kind, words) = (s.step.name(), s.step.describe());
                    @let at = s.at_ms.saturating_sub(b.started_ms);
                    li class=(format!("step {kind}")) {
                        // SVG geometry, not a style attribute: the page's CSP allows no
                        // inline style.
                        svg.track viewBox="0 0 1000 10" preserveAspectRatio="none" role="img" aria-label=(format!("at {:.0}% of the boot", at as f64 * 100.0 / total)) {
                            rect.bar x=(format!("{:.0}", at as f64 * 988.0 / total)) y="0" width="12" height="10" rx="2" {}
                        }
                        span.when { "+" (format!("{:.3}", at as f64 / 1000.0)) " s" }
                        span.gap { "(+" (format!("{:.3}", s.gap_ms as f64 / 1000.0)) " s)" }
                        span.what { (words) }
                    }
                }
            }
        }
    }
}

/// The label that names a server's rack (set it with `PUT /api/v1/servers/{id}/labels`,
/// or as a Server's label in Kubernetes mode).
pub const RACK_LABEL: &str = "rack";

/// One requirement of a label filter, as `kubectl -l` writes it: `key=value` (or `==`),
/// `key!=value`, `key` (has it), `!key` (has it not).
#[derive(Debug, PartialEq)]
enum LabelRequirement<'a> {
    Equals(&'a str, &'a str),
    NotEquals(&'a str, &'a str),
    Exists(&'a str),
    Absent(&'a str),
}

/// Parses a comma-separated label filter; the requirement it cannot read, in its error.
fn parse_label_filter(filter: &str) -> Result<Vec<LabelRequirement<'_>>, String> {
    filter
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            let req = if let Some((k, v)) = r.split_once("!=") {
                LabelRequirement::NotEquals(k.trim(), v.trim())
            } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                LabelRequirement::Equals(k.trim(), v.trim())
            } else if let Some(k) = r.strip_prefix('!') {
                LabelRequirement::Absent(k.trim())
            } else {
                LabelRequirement::Exists(r)
            };
            let (key, value) = match &req {
                LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => (*k, *v),
                LabelRequirement::Exists(k) | LabelRequirement::Absent(k) => (*k, ""),
            };
            let plain = |t: &str| {
                t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            };
            if key.is_empty() || !plain(key) || !plain(value) {
                return Err(format!(
                    "{r:?} is not a label requirement (key=value, key!=value, key or !key; set-based ones such as `in (a,b)` are not taken)"
                ));
            }
            Ok(req)
        })
        .collect()
}

fn labels_match(
    reqs: &[LabelRequirement<'_>],
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    reqs.iter().all(|r| match r {
        LabelRequirement::Equals(k, v) => labels.get(*k).is_some_and(|x| x == v),
        LabelRequirement::NotEquals(k, v) => labels.get(*k).is_none_or(|x| x != v),
        LabelRequirement::Exists(k) => labels.contains_key(*k),
        LabelRequirement::Absent(k) => !labels.contains_key(*k),
    })
}

/// What the fleet page is asked to show.
#[derive(Debug, Default)]
struct FleetQuery {
    q: String,
    phase: String,
    rack: String,
    label: String,
    page: usize,
}

fn fleet(servers: &[Server], query: &FleetQuery, csrf: &str) -> Markup {
    let FleetQuery {
        q,
        phase,
        rack,
        label,
        page: page_no,
    } = query;
    let q_low = q.to_ascii_lowercase();
    let (requirements, label_error) = match parse_label_filter(label) {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    fn rack_of(s: &Server) -> Option<&str> {
        s.labels.get(RACK_LABEL).map(String::as_str)
    }
    let matching: Vec<&Server> = servers
        .iter()
        .filter(|s| phase.is_empty() || s.phase().eq_ignore_ascii_case(phase))
        .filter(|s| match rack.as_str() {
            "" => true,
            "-" => rack_of(s).is_none(),
            r => rack_of(s) == Some(r),
        })
        .filter(|s| label_error.is_none() && labels_match(&requirements, &s.labels))
        .filter(|s| {
            q_low.is_empty()
                || s.id.to_ascii_lowercase().contains(&q_low)
                || s.macs.iter().any(|m| m.contains(&q_low))
                || s.hardware.serial.to_ascii_lowercase().contains(&q_low)
        })
        .collect();
    let mut by_phase: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut by_rack: std::collections::BTreeMap<&str, usize> = Default::default();
    for s in servers {
        *by_phase.entry(s.phase()).or_default() += 1;
        *by_rack.entry(rack_of(s).unwrap_or("-")).or_default() += 1;
    }
    let pages = matching.len().div_ceil(PAGE).max(1);
    let page_no = (*page_no).min(pages - 1);
    let shown = matching.iter().skip(page_no * PAGE).take(PAGE);
    let link = |p: usize| {
        let mut l = String::from("/console/?");
        for (k, v) in [("q", q), ("phase", phase), ("rack", rack), ("label", label)] {
            if !v.is_empty() {
                let _ = write!(
                    l,
                    "{k}={}&",
                    form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                );
            }
        }
        let _ = write!(l, "page={p}");
        l
    };
    layout(
        "Fleet",
        Some(csrf),
        html! {
            h1 { "Fleet" }
            p.summary {
                (servers.len()) " servers"
                @for (p, n) in &by_phase { " · " a href=(format!("/console/?phase={p}")) { (p) ": " (n) } }
            }
            @if by_rack.len() > 1 || !by_rack.contains_key("-") {
                p.summary {
                    "By rack"
                    @for (r, n) in &by_rack {
                        " · " a href=(format!("/console/?rack={}", form_urlencoded::byte_serialize(r.as_bytes()).collect::<String>())) {
                            (if *r == "-" { "no rack" } else { r }) ": " (n)
                        }
                    }
                }
            }
            form.filters method="get" action="/console/" {
                input type="search" name="q" value=(q) placeholder="UUID, MAC or serial" aria-label="Search";
                select name="phase" aria-label="Phase" {
                    option value="" selected[phase.is_empty()] { "Every phase" }
                    @for p in ["Available", "Claimed", "Installing", "Installed", "Wiping", "Dirty", "Alarm"] {
                        option value=(p) selected[phase == p] { (p) }
                    }
                }
                select name="rack" aria-label="Rack" {
                    option value="" selected[rack.is_empty()] { "Every rack" }
                    @for r in by_rack.keys() {
                        option value=(r) selected[rack == r] { (if *r == "-" { "no rack" } else { r }) }
                    }
                }
                input type="search" name="label" value=(label) placeholder="labels: role=worker,!gpu" aria-label="Labels";
                button type="submit" { "Filter" }
            }
            @if let Some(e) = &label_error { p.error { (e) } }
            table.servers {
                thead { tr { th { "Server" } th { "Phase" } th { "Rack" } th { "Vendor" } th { "Serial" } th { "Environment" } th { "Power" } th { "Flags" } } }
                tbody {
                    @for s in shown {
                        tr {
                            td { a href=(format!("/console/servers/{}", s.id)) { (s.id) } }
                            td class=(format!("phase {}", s.phase().to_ascii_lowercase())) { (s.phase()) }
                            td { (rack_of(s).unwrap_or("—")) }
                            td { (s.hardware.vendor) " " (s.hardware.product) }
                            td { (s.hardware.serial) }
                            td { (s.environment.as_deref().unwrap_or("—")) }
                            td { (power_word(s).unwrap_or_else(|| "—".into())) }
                            td {
                                @if s.accepted { span.flag { "accepted" } }
                                @if s.cordoned { span.flag { "cordoned" } }
                                @if s.alarm.is_some() { span.flag.alarm { "alarm" } }
                            }
                        }
                    }
                }
            }
            nav.pages {
                "Page " (page_no + 1) " of " (pages) " (" (matching.len()) " matching)"
                @if page_no > 0 { " · " a href=(link(page_no - 1)) { "previous" } }
                @if page_no + 1 < pages { " · " a href=(link(page_no + 1)) { "next" } }
            }
        },
    )
}

/// The server's last known power state, in a word (`on`, `off`).
fn power_word(s: &Server) -> Option<String> {
    s.power.state.map(|p| format!("{p:?}").to_ascii_lowercase())
}

fn action_form(id: &str, csrf: &str, action: &str, label: &str, confirm: &str) -> Markup {
    html! {
        form.action method="post" action=(format!("/console/servers/{id}/action")) data-confirm=(confirm) {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="action" value=(action);
            button type="submit" { (label) }
        }
    }
}

fn server_page(s: &Server, boots: &[Boot], csrf: &str, notice: Option<&str>) -> Markup {
    let id = s.id.as_str();
    layout(
        id,
        Some(csrf),
        html! {
            h1 { "Server " (id) }
            @if let Some(n) = notice { p.notice role="status" { (n) } }
            @if let Some(a) = &s.alarm { p.error role="alert" { "ALARM: " (a.message) } }
            section.actions {
                h2 { "Actions" }
                @if s.accepted { (action_form(id, csrf, "unaccept", "Unaccept", "Unaccept this server?")) }
                @else { (action_form(id, csrf, "accept", "Accept", "Accept this server into the fleet?")) }
                @if s.cordoned { (action_form(id, csrf, "uncordon", "Uncordon", "Uncordon this server?")) }
                @else { (action_form(id, csrf, "cordon", "Cordon", "Cordon this server (it boots its disk)?")) }
                (action_form(id, csrf, "arm", "Arm", "Open a provisioning window (and clear an alarm)?"))
                @if s.bmc.is_some() {
                    (action_form(id, csrf, "power-on", "Power on", "Power this server on?"))
                    (action_form(id, csrf, "power-off", "Power off", "Power this server off now?"))
                    (action_form(id, csrf, "power-cycle", "Power cycle", "Power-cycle this server?"))
                    (action_form(id, csrf, "bootdev-pxe", "Next boot: network", "Boot from the network next time?"))
                    (action_form(id, csrf, "bootdev-disk", "Next boot: disk", "Boot from the disk next time?"))
                }
            }
            section.facts {
                h2 { "Hardware" }
                dl {
                    dt { "Phase" } dd { (s.phase()) }
                    dt { "Vendor" } dd { (s.hardware.vendor) " " (s.hardware.product) }
                    dt { "Serial" } dd { (s.hardware.serial) }
                    dt { "CPUs" } dd { (s.hardware.cpu.count) " × " (s.hardware.cpu.model) }
                    dt { "Memory" } dd { (s.hardware.memory_bytes >> 30) " GiB" }
                    dt { "Disks" } dd { @for d in &s.hardware.disks { (d.name) " " (d.size_bytes >> 30) " GiB " } }
                    dt { "MACs" } dd { (s.macs.join(", ")) }
                    dt { "Environment" } dd { (s.environment.as_deref().unwrap_or("—")) }
                    dt { "Labels" } dd { @for (k, v) in &s.labels { code { (k) "=" (v) } " " } }
                    dt { "Registered" } dd { (ago(s.registered_at)) }
                }
            }
            section.power {
                h2 { "Power" }
                p {
                    "State: " (power_word(s).unwrap_or_else(|| "unknown".into()))
                    @if let Some(b) = &s.bmc { " · BMC " (b.address) }
                    @else { " · no BMC" }
                }
                @if !s.power.history.is_empty() {
                    table.history {
                        thead { tr { th { "When" } th { "Operation" } th { "Result" } } }
                        tbody {
                            @for e in s.power.history.iter().rev() {
                                tr { td { (ago(e.at)) } td { (e.operation) } td { @if e.ok { "ok" } @else { "failed: " (e.message.as_deref().unwrap_or("")) } } }
                            }
                        }
                    }
                }
            }
            section.boots {
                h2 { "Boots" }
                @if boots.is_empty() { p { "No boot witnessed yet." } }
                @for b in boots.iter().rev() { (timeline(b)) }
            }
        },
    )
}

fn boots_fragment(machines: &[crate::timeline::Machine]) -> Markup {
    let now = crate::inventory::now_ms();
    html! {
        table.live {
            thead { tr { th { "Machine" } th { "Server" } th { "Boot started" } th { "Latest step" } th { "Since" } } }
            tbody {
                @for m in machines {
                    @if let Some(b) = m.boots.back() {
                        @let last = b.last_step();
                        tr {
                            td { (m.mac.clone().or(m.address.map(|a| a.to_string())).unwrap_or_default()) }
                            td { @if let Some(u) = &m.uuid { a href=(format!("/console/servers/{u}")) { (u) } } @else { "unknown" } }
                            td { (format!("{:.0} s ago", now.saturating_sub(b.started_ms) as f64 / 1000.0)) }
                            td { @if let Some(l) = last { (l.step.describe()) } }
                            td { (format!("{:.1} s", now.saturating_sub(b.last_ms) as f64 / 1000.0)) }
                        }
                    }
                }
            }
        }
    }
}

/// What the metrics say of each plugin: its loads and its calls by result.
#[derive(Default)]
struct PluginFigures {
    loads: std::collections::BTreeMap<String, u64>,
    calls: std::collections::BTreeMap<String, u64>,
    seconds: f64,
    count: f64,
    /// The call-time histogram's cumulative buckets: (upper bound, calls).
    buckets: Vec<(f64, f64)>,
}

impl PluginFigures {
    /// The bucket bound under which `q` of the calls finished (an upper bound, as
    /// Prometheus's `histogram_quantile` reads a bucket).
    fn quantile(&self, q: f64) -> Option<f64> {
        let want = self.count * q;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want && *n > 0.0)
            .map(|(le, _)| *le)
    }
}

fn millis(seconds: f64) -> String {
    if seconds.is_infinite() {
        let (start, factor, count) = crate::metrics::PLUGIN_CALL_BUCKETS;
        let last = start * factor.powi(i32::from(count) - 1);
        format!("more than {last:.0} s")
    } else {
        format!("{:.3} ms", seconds * 1000.0)
    }
}

/// The plugins page, read from the appliance's own metrics (loads and calls by plugin
/// and result, the plugins in the chain, each plugin's call time).
fn plugins_page(metrics: &str, csrf: &str) -> Markup {
    let mut by_plugin: std::collections::BTreeMap<String, PluginFigures> = Default::default();
    let mut active = 0.0;
    for line in metrics.lines() {
        let value = |l: &str| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let label = |l: &str, k: &str| {
            l.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(String::from)
        };
        if line.starts_with("arges_plugins_active ") {
            active = value(line);
        } else if line.starts_with("arges_plugin_call_seconds")
            && let Some(plugin) = label(line, "plugin")
        {
            let f = by_plugin.entry(plugin).or_default();
            if line.starts_with("arges_plugin_call_seconds_sum") {
                f.seconds = value(line);
            } else if line.starts_with("arges_plugin_call_seconds_count") {
                f.count = value(line);
            } else if let Some(le) = label(line, "le") {
                f.buckets
                    .push((le.parse().unwrap_or(f64::INFINITY), value(line)));
            }
        }
        for (prefix, loads) in [
            ("arges_plugin_loads_total{", true),
            ("arges_plugin_calls_total{", false),
        ] {
            if line.starts_with(prefix)
                && let (Some(plugin), Some(result)) = (label(line, "plugin"), label(line, "result"))
            {
                let f = by_plugin.entry(plugin).or_default();
                let m = if loads { &mut f.loads } else { &mut f.calls };
                *m.entry(result).or_default() += value(line) as u64;
            }
        }
    }
    let ok = |r: &str| matches!(r, "decided" | "pass" | "ok" | "compiled" | "cached");
    let seconds: f64 = by_plugin.values().map(|f| f.seconds).sum();
    let count: f64 = by_plugin.values().map(|f| f.count).sum();
    layout(
        "Plugins",
        Some(csrf),
        html! {
            h1 { "Plugins" }
            p.summary {
                (active) " in the chain · "
                @if count > 0.0 { "mean call " (millis(seconds / count)) " over " (count) " calls" }
                @else { "no decision yet" }
            }
            table.plugins {
                thead { tr { th { "Plugin" } th { "Loads" } th { "Calls" } th { "Failing" } th { "Mean call" } th { "95% under" } } }
                tbody {
                    @for (name, f) in &by_plugin {
                        @let failing: u64 = f.calls.iter().chain(&f.loads).filter(|(r, _)| !ok(r)).map(|(_, n)| n).sum();
                        tr {
                            td { (name) }
                            td { @for (r, n) in &f.loads { (r) ": " (n) " " } }
                            td { @for (r, n) in &f.calls { (r) ": " (n) " " } }
                            td class=(if failing > 0 { "phase alarm" } else { "" }) { (failing) }
                            td { @if f.count > 0.0 { (millis(f.seconds / f.count)) } @else { "—" } }
                            td { (f.quantile(0.95).map(millis).unwrap_or_else(|| "—".into())) }
                        }
                    }
                }
            }
        },
    )
}

fn audit_page(entries: &[crate::inventory::AuditEntry], csrf: &str) -> Markup {
    layout(
        "Audit log",
        Some(csrf),
        html! {
            h1 { "Audit log" }
            table.audit {
                thead { tr { th { "#" } th { "When" } th { "Who" } th { "From" } th { "What" } th { "Server" } th { "Outcome" } th { "Detail" } } }
                tbody {
                    @for e in entries.iter().rev() {
                        tr class=(format!("outcome {}", e.outcome)) {
                            td { (e.seq) }
                            td { (ago(e.at_ms / 1000)) }
                            td { (e.who) }
                            td { (e.from.as_deref().unwrap_or("")) }
                            td { (e.action) }
                            td { @if let Some(s) = &e.server { a href=(format!("/console/servers/{s}")) { (s) } } }
                            td { (e.outcome) }
                            td { (e.detail.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        },
    )
}

/// Whether a form post comes from this console: its CSRF token, and (when the browser
/// says) its origin and fetch site.
fn same_site(req_headers: &hyper::HeaderMap, form_csrf: Option<&str>, csrf: &str) -> bool {
    let token_ok = form_csrf.is_some_and(|t| crate::core::secret_eq(t, csrf));
    let host = req_headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_ok = match req_headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        None => true,
        Some(o) => o
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
    };
    let site_ok = req_headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == "same-origin" || v == "none");
    token_ok && origin_ok && site_ok
}

/// Answers everything under `/console`.
pub async fn console(
    ctx: &HttpContext,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/console/style.css") => {
            return full(StatusCode::OK, "text/css; charset=utf-8", STYLE);
        }
        (&Method::GET, "/console/app.js") => {
            return full(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT);
        }
        (&Method::GET, "/console/login") => return login_page(StatusCode::OK, None),
        (&Method::POST, "/console/login") => return login(ctx, peer, req).await,
        _ => {}
    }
    let session = cookie(&req);
    let Some((id, (csrf, who))) = session.and_then(|id| ctx.sessions.csrf_of(&id).map(|c| (id, c)))
    else {
        return login_page(StatusCode::UNAUTHORIZED, None);
    };
    let core = &ctx.core;
    match (&method, path.as_str()) {
        (&Method::GET, "/console" | "/console/") => match core.servers().await {
            Ok(servers) => {
                let query = FleetQuery {
                    q: query_param(&req, "q").unwrap_or_default(),
                    phase: query_param(&req, "phase").unwrap_or_default(),
                    rack: query_param(&req, "rack").unwrap_or_default(),
                    label: query_param(&req, "label").unwrap_or_default(),
                    page: query_param(&req, "page")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0),
                };
                page(StatusCode::OK, fleet(&servers, &query, &csrf))
            }
            Err(e) => error_page(&e, &csrf),
        },
        (&Method::GET, "/console/boots") => page(
            StatusCode::OK,
            layout(
                "Live boots",
                Some(&csrf),
                html! {
                    h1 { "Live boots" }
                    p.hint { "Every machine the appliance saw booting, latest first; updated as it happens." }
                    div #live data-events="/console/boots/events" { (boots_fragment(&core.witnessed(200))) }
                },
            ),
        ),
        (&Method::GET, "/console/boots/events") => live_events(ctx),
        (&Method::GET, "/console/plugins") => page(
            StatusCode::OK,
            plugins_page(&core.metrics().render(), &csrf),
        ),
        (&Method::GET, "/console/audit") => match core.audit().entries(None, 500) {
            Ok(entries) => page(StatusCode::OK, audit_page(&entries, &csrf)),
            Err(e) => error_page(&CoreError::from(e), &csrf),
        },
        (&Method::POST, "/console/logout") => {
            let headers = req.headers().clone();
            let form = form_of(req).await;
            if !same_site(&headers, form.get("csrf").map(String::as_str), &csrf) {
                return refused(ctx, peer, "logout", None);
            }
            ctx.sessions.close(&id);
            redirect(
                "/console/login",
                Some(format!(
                    "{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict"
                )),
            )
        }
        (&Method::GET, p) if p.starts_with("/console/servers/") => {
            let sid = decode(&p["/console/servers/".len()..]);
            match core.server(&sid).await {
                Ok(s) => {
                    let boots = core.server_boots(&s.id).await.unwrap_or_default();
                    let notice = query_param(&req, "done");
                    page(
                        StatusCode::OK,
                        server_page(&s, &boots, &csrf, notice.as_deref()),
                    )
                }
                Err(e) => error_page(&e, &csrf),
            }
        }
        (&Method::POST, p) if p.starts_with("/console/servers/") && p.ends_with("/action") => {
            let sid = decode(&p["/console/servers/".len()..p.len() - "/action".len()]);
            let headers = req.headers().clone();
            let form = form_of(req).await;
            if !same_site(&headers, form.get("csrf").map(String::as_str), &csrf) {
                return refused(ctx, peer, "action", Some(&sid));
            }
            let action = form.get("action").cloned().unwrap_or_default();
            let result = act(ctx, &sid, &action).await;
            let (outcome, detail) = match &result {
                Ok(()) => (Outcome::Ok, None),
                Err(e) => (crate::core::audit_outcome(e), Some(e.to_string())),
            };
            core.audit().record(
                format!("{who} (console)"),
                Some(peer.ip()),
                format!("console {action}"),
                Some(&sid),
                outcome,
                detail,
            );
            let done = match result {
                Ok(()) => format!("{action}: done"),
                Err(e) => format!("{action}: {e}"),
            };
            redirect(
                &format!(
                    "/console/servers/{}?done={}",
                    form_urlencoded::byte_serialize(sid.as_bytes()).collect::<String>(),
                    form_urlencoded::byte_serialize(done.as_bytes()).collect::<String>()
                ),
                None,
            )
        }
        _ => page(
            StatusCode::NOT_FOUND,
            layout(
                "Not found",
                Some(&csrf),
                html! { h1 { "Not found" } p { (path) } },
            ),
        ),
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

async fn form_of(req: Request<Incoming>) -> HashMap<String, String> {
    match read_body(req, 16 * 1024, Duration::from_secs(10)).await {
        Ok(b) => form_urlencoded::parse(&b).into_owned().collect(),
        Err(_) => HashMap::new(),
    }
}

fn refused(
    ctx: &HttpContext,
    peer: SocketAddr,
    what: &str,
    server: Option<&str>,
) -> Response<Body> {
    ctx.core.audit().record(
        "unknown",
        Some(peer.ip()),
        format!("console {what}"),
        server,
        Outcome::Refused,
        Some("cross-site or stale form (no matching CSRF token or origin)".into()),
    );
    page(
        StatusCode::FORBIDDEN,
        layout(
            "Refused",
            None,
            html! { h1 { "Refused" } p { "This form did not come from this console. Reload the page and try again." } },
        ),
    )
}

fn error_page(e: &CoreError, csrf: &str) -> Response<Body> {
    page(
        super::status_of(e),
        layout(
            "Error",
            Some(csrf),
            html! { h1 { "Error" } p.error { (e.to_string()) } },
        ),
    )
}

async fn login(ctx: &HttpContext, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if !ctx.guard.registration_allowed(peer.ip()) {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many attempts; wait a moment."),
        );
    }
    let form = form_of(req).await;
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    let who = match ctx.core.operator(token).await {
        Ok(Some(who)) => who,
        Ok(None) => {
            ctx.core.audit().record(
                "unknown",
                Some(peer.ip()),
                "console login",
                None,
                Outcome::Refused,
                Some("not the admin token, nor a Kubernetes user allowed to update Servers".into()),
            );
            return login_page(
                StatusCode::UNAUTHORIZED,
                Some("That is not the admin token."),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "a console login could not be reviewed");
            return login_page(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("The credential could not be checked just now; try again."),
            );
        }
    };
    let id = ctx.sessions.open(&who);
    ctx.core.audit().record(
        format!("{who} (console)"),
        Some(peer.ip()),
        "console login",
        None,
        Outcome::Ok,
        None,
    );
    redirect(
        "/console/",
        Some(format!(
            "{COOKIE}={id}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict",
            SESSION.as_secs()
        )),
    )
}

async fn act(ctx: &HttpContext, id: &str, action: &str) -> Result<(), CoreError> {
    let core = &ctx.core;
    let boot = |device: crate::bmc::BootDevice| crate::bmc::BootSetting {
        device,
        persistent: false,
        efi: true,
    };
    match action {
        "accept" | "unaccept" | "cordon" | "uncordon" => {
            let edit = match action {
                "accept" => ServerEdit::Accepted(true),
                "unaccept" => ServerEdit::Accepted(false),
                "cordon" => ServerEdit::Cordoned(true),
                _ => ServerEdit::Cordoned(false),
            };
            core.edit_server(id, edit).await.map(drop)
        }
        "arm" => core.arm(id, "the console").await.map(drop),
        "power-on" | "power-off" | "power-cycle" => {
            let a = match action {
                "power-on" => PowerAction::On,
                "power-off" => PowerAction::Off,
                _ => PowerAction::Cycle,
            };
            let r = core.bmc_power(id, a).await?;
            if r.event.ok {
                Ok(())
            } else {
                Err(CoreError::Internal(
                    r.event
                        .message
                        .unwrap_or_else(|| "the BMC did not do it".into()),
                ))
            }
        }
        "bootdev-pxe" | "bootdev-disk" => {
            let d = if action == "bootdev-pxe" {
                crate::bmc::BootDevice::Pxe
            } else {
                crate::bmc::BootDevice::Disk
            };
            core.bmc_boot_device(id, boot(d)).await.map(drop)
        }
        other => Err(CoreError::Invalid(format!("no console action {other:?}"))),
    }
}

/// Server-sent events for the live boots page: the table, again whenever it changed
/// (checked each second), for as long as the page is open.
fn live_events(ctx: &HttpContext) -> Response<Body> {
    let core = std::sync::Arc::clone(&ctx.core);
    let stream = futures_util::stream::unfold(
        (core, String::new(), true),
        |(core, last, first)| async move {
            loop {
                if !first || !last.is_empty() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let html = boots_fragment(&core.witnessed(200)).into_string();
                if html != last {
                    let mut event = String::new();
                    for line in html.lines() {
                        let _ = writeln!(event, "data: {line}");
                    }
                    event.push('\n');
                    return Some((
                        Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
                        (core, html, false),
                    ));
                }
            }
        },
    );
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_filters_read_as_kubectl_writes_them() {
        let labels: std::collections::BTreeMap<String, String> =
            [("role", "worker"), ("rack", "r1")]
                .map(|(k, v)| (k.into(), v.into()))
                .into();
        let ok = |f: &str| labels_match(&parse_label_filter(f).unwrap(), &labels);
        assert!(ok(""));
        assert!(ok("role=worker, rack==r1"));
        assert!(ok("role!=cp,!gpu,rack"));
        assert!(!ok("role=cp"));
        assert!(!ok("gpu"));
        assert!(!ok("role=worker,!rack"));
        for bad in ["role=worker,=x", "!a=b", "a=b=c", "env in (a", "a b"] {
            let e = parse_label_filter(bad).unwrap_err();
            assert!(e.contains("is not a label requirement"), "{bad}: {e}");
        }
    }

    #[test]
    fn sessions_are_found_by_their_id_only_and_close() {
        let s = Sessions::default();
        let id = s.open("admin");
        let (csrf, who) = s.csrf_of(&id).expect("a live session");
        assert_eq!(who, "admin");
        assert_eq!(csrf.len(), 64);
        assert!(s.csrf_of(&random_hex()).is_none());
        assert!(
            !s.by_hash.lock().unwrap().contains_key(&id),
            "only the id's hash is kept"
        );
        s.close(&id);
        assert!(s.csrf_of(&id).is_none());
    }

    #[test]
    fn a_cross_site_post_is_refused() {
        let mut h = hyper::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("10.0.0.1:8080"));
        assert!(same_site(&h, Some("t"), "t"));
        assert!(!same_site(&h, Some("x"), "t"), "a wrong token");
        assert!(!same_site(&h, None, "t"), "no token");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_site(&h, Some("t"), "t"), "another origin");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://10.0.0.1:8080"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_site(&h, Some("t"), "t"), "a cross-site fetch");
    }

    #[test]
    fn text_is_escaped_in_pages() {
        let m = html! { p { ("<script>alert(1)</script>") } };
        assert_eq!(
            m.into_string(),
            "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
        );
    }
}
