//! The operator's console over real HTTP (curl keeps the session cookie as a browser
//! does): nothing but the login page without a session, a wrong token refused, the fleet
//! and a server's page with its boot timeline, actions with the session's CSRF token
//! (a forged cross-site post refused), a power-on through ipmi_sim, live boots as
//! server-sent events, and every action in the audit log. And the fleet page's weight and
//! render time with 5,000 servers (printed).

use std::path::Path;

use test_support::ipmi_sim::Bmc;
use test_support::{ADMIN_TOKEN, Appliance, Registration, curl};

/// curl with the cookie jar `jar`: (status, body).
fn browse(jar: &Path, args: &[&str]) -> (u16, String) {
    let jar = jar.display().to_string();
    let mut all = vec!["-b", &jar, "-c", &jar];
    all.extend_from_slice(args);
    let (s, b, _) = curl(&all);
    (s, String::from_utf8_lossy(&b).into_owned())
}

fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..at + 64].to_string()
}

#[test]
fn the_console_logs_in_shows_the_fleet_acts_with_csrf_and_audits_everything() {
    let a = crate::power::appliance("");
    let dir = tempfile::tempdir().unwrap();
    let jar = dir.path().join("cookies");
    let url = |p: &str| a.url(p);

    // No session: the login page only, whatever is asked for.
    for p in [
        "/console/",
        "/console/audit",
        "/console/servers/x",
        "/console/boots/events",
    ] {
        let (s, body) = browse(&jar, &[&url(p)]);
        assert_eq!(s, 401, "{p}");
        assert!(
            body.contains("Admin token") && !body.contains("Fleet"),
            "{p}: {body}"
        );
    }
    let (s, body) = browse(
        &jar,
        &["--data-urlencode", "token=wrong", &url("/console/login")],
    );
    assert_eq!(s, 401);
    assert!(body.contains("not the admin token"), "{body}");
    let (s, _) = browse(
        &jar,
        &[
            "--data-urlencode",
            &format!("token={ADMIN_TOKEN}"),
            &url("/console/login"),
        ],
    );
    assert_eq!(s, 303, "logged in");

    // A machine boots (its script asked for) and registers; it has a BMC.
    let r = Registration::numbered(7);
    let id = r.uuid().to_string();
    let _ = a.boot_script(&id, r.mac(), "127.0.0.1");
    a.register(&r);
    let bmc = Bmc::start();
    crate::power::set_bmc(&a, &id, crate::power::ipmi_bmc(bmc.addr, "password"));

    let (s, fleet) = browse(&jar, &[&url("/console/")]);
    assert_eq!(s, 200);
    assert!(
        fleet.contains(&id) && fleet.contains("1 servers"),
        "{fleet}"
    );
    let (_, found) = browse(&jar, &[&url(&format!("/console/?q={}", r.mac()))]);
    assert!(found.contains(&id), "search by MAC");
    let (_, none) = browse(&jar, &[&url("/console/?q=no-such-serial")]);
    assert!(
        !none.contains(&format!("/console/servers/{id}")),
        "a search that matches nothing"
    );
    // A second machine in another rack: the rack and label filters tell them apart.
    let other = Registration::numbered(8);
    a.register(&other);
    for (server, labels) in [
        (&id, r#"{"rack":"r1","role":"worker"}"#),
        (&other.uuid().to_string(), r#"{"rack":"r2"}"#),
    ] {
        let (code, body) = a.request(
            "PUT",
            &format!("/api/v1/servers/{server}/labels"),
            Some(ADMIN_TOKEN),
            labels.as_bytes(),
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    }
    let fleet_page = |query: &str| {
        let (s, page) = browse(&jar, &[&url(&format!("/console/?{query}"))]);
        assert_eq!(s, 200, "{query}");
        page
    };
    let shows = |query: &str| {
        let page = fleet_page(query);
        (
            page.contains(&format!("/console/servers/{id}\"")),
            page.contains(&format!("/console/servers/{}\"", other.uuid())),
        )
    };
    let all = fleet_page("");
    assert!(
        all.contains("r1: 1") && all.contains("r2: 1"),
        "by rack: {all}"
    );
    assert_eq!(shows("rack=r1"), (true, false));
    assert_eq!(shows("rack=r2"), (false, true));
    assert_eq!(shows("label=role%3Dworker"), (true, false));
    assert_eq!(shows("label=%21role"), (false, true));
    assert_eq!(shows("label=%3Dworker"), (false, false));
    let bad = fleet_page("label=%3Dworker");
    assert!(bad.contains("is not a label requirement"), "{bad}");

    let (s, page) = browse(&jar, &[&url(&format!("/console/servers/{id}"))]);
    assert_eq!(s, 200);
    assert!(
        page.contains("/boot.ipxe: discover") && page.contains("registered as"),
        "the timeline: {page}"
    );
    let token = csrf(&page);
    let action = url(&format!("/console/servers/{id}/action"));

    // A forged cross-site post (the session cookie would go along; the token cannot):
    // refused, and so is one with the token from another origin.
    let (s, _) = browse(&jar, &["-d", "action=accept&csrf=guessed", &action]);
    assert_eq!(s, 403);
    let (s, _) = browse(
        &jar,
        &[
            "-H",
            "Origin: https://evil.example",
            "-d",
            &format!("action=accept&csrf={token}"),
            &action,
        ],
    );
    assert_eq!(s, 403);
    let api = |path: &str| {
        let (_, b) = a.request("GET", path, Some(ADMIN_TOKEN), b"");
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()
    };
    assert_eq!(api(&format!("/api/v1/servers/{id}"))["accepted"], false);

    // The real forms: accept, then power on through the BMC.
    for act in ["accept", "power-on"] {
        let (s, _) = browse(
            &jar,
            &["-d", &format!("action={act}&csrf={token}"), &action],
        );
        assert_eq!(s, 303, "{act}");
    }
    assert_eq!(api(&format!("/api/v1/servers/{id}"))["accepted"], true);
    assert!(bmc.ipmitool_says_on(), "powered on from the console");
    let (_, page) = browse(&jar, &[&url(&format!("/console/servers/{id}?done=x"))]);
    assert!(
        page.contains("BMC power on"),
        "the power-on is a step of the timeline: {page}"
    );

    // Plugins: the drivers loaded, the one that powered the machine called.
    let (_, plugins) = browse(&jar, &[&url("/console/plugins")]);
    assert!(
        plugins.contains("4 in the chain") && plugins.contains("driver-faults"),
        "{plugins}"
    );
    assert!(plugins.contains("<td>ipmi</td>"), "{plugins}");
    let ipmi_row = plugins
        .split("<tr>")
        .find(|r| r.contains("<td>ipmi</td>"))
        .unwrap_or_default();
    assert!(
        ipmi_row.matches(" ms</td>").count() == 2,
        "the ipmi driver's call time, mean and 95%: {ipmi_row}"
    );

    // Live boots: the events stream carries the machine.
    let (_, events) = browse(&jar, &["--max-time", "2", &url("/console/boots/events")]);
    assert!(
        events.starts_with("data: ") && events.contains(r.mac()),
        "{events}"
    );

    // Every action, refusal and login is in the audit log, on its page too.
    test_support::eventually(10, "the console's actions audited", || {
        let all = api("/api/v1/audit?after=0&limit=1000");
        let all = all.as_array().cloned().unwrap_or_default();
        let has = |what: &str, outcome: &str| {
            all.iter()
                .any(|e| e["action"] == what && e["outcome"] == outcome)
        };
        (has("console login", "refused")
            && has("console login", "ok")
            && has("console action", "refused")
            && has("console accept", "ok")
            && has("console power-on", "ok"))
        .then_some(())
    });
    let (_, audit) = browse(&jar, &[&url("/console/audit")]);
    assert!(
        audit.contains("console power-on") && audit.contains("admin (console)"),
        "{audit}"
    );

    // Logged out: the session is gone.
    let (s, _) = browse(
        &jar,
        &["-d", &format!("csrf={token}"), &url("/console/logout")],
    );
    assert_eq!(s, 303);
    let (s, _) = browse(&jar, &[&url("/console/")]);
    assert_eq!(s, 401);
}

#[test]
fn the_fleet_page_stays_small_and_quick_with_five_thousand_servers() {
    let a = Appliance::start("[policy]\nmax_unaccepted = 6000\n");
    for i in 1..=5000 {
        a.register(&Registration::numbered(i));
    }
    let dir = tempfile::tempdir().unwrap();
    let jar = dir.path().join("cookies");
    browse(
        &jar,
        &[
            "--data-urlencode",
            &format!("token={ADMIN_TOKEN}"),
            &a.url("/console/login"),
        ],
    );
    let started = std::time::Instant::now();
    let (s, page) = browse(&jar, &[&a.url("/console/")]);
    let took = started.elapsed();
    assert_eq!(s, 200);
    assert!(
        page.contains("5000 servers") && page.contains("Page 1 of 50"),
        "paged"
    );
    assert_eq!(
        page.matches("/console/servers/").count(),
        100,
        "one page of 100"
    );
    let (_, last) = browse(&jar, &[&a.url("/console/?page=49")]);
    assert!(last.contains("Page 50 of 50"));
    let css = curl(&[&a.url("/console/style.css")]).1.len();
    let js = curl(&[&a.url("/console/app.js")]).1.len();
    eprintln!(
        "console fleet page, 5,000 servers: {} bytes of HTML + {css} CSS + {js} JS; rendered and sent in {:.1} ms",
        page.len(),
        took.as_secs_f64() * 1000.0
    );
}

/// A headless Chromium driven over WebDriver (Debian's chromium and chromedriver).
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = test_support::free_port();
        test_support::require("chromedriver");
        test_support::require("chromium");
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts (Debian package chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        test_support::eventually(20, "chromedriver answering", || {
            let (s, _, _) = curl(&[&format!("{base}/status")]);
            (s == 200).then_some(())
        });
        let chromium = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
            .expect("chromium on PATH");
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            _profile: profile,
        };
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                         format!("--user-data-dir={}", b._profile.path().display())]
            }
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .expect("a WebDriver session")
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let url = format!("{}{path}", self.base);
        let body = body.map(|b| b.to_string());
        let mut args = vec!["-X", method, "-H", "Content-Type: application/json"];
        if let Some(b) = &body {
            args.extend(["--data-binary", b]);
        }
        args.push(&url);
        let (_, out, _) = curl(&args);
        let v: serde_json::Value = serde_json::from_slice(&out)
            .unwrap_or_else(|_| panic!("{method} {path}: {}", String::from_utf8_lossy(&out)));
        v.get("value").cloned().unwrap_or(v)
    }

    fn s(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.s("POST", "/url", Some(serde_json::json!({ "url": url })));
    }

    fn find(&self, css: &str) -> String {
        let v = self.s(
            "POST",
            "/element",
            Some(serde_json::json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|e| e.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}\n{}", self.source()))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.s(
            "POST",
            &format!("/element/{e}/value"),
            Some(serde_json::json!({ "text": text })),
        );
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.s(
            "POST",
            &format!("/element/{e}/click"),
            Some(serde_json::json!({})),
        );
    }

    fn source(&self) -> String {
        self.s("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn accept_dialog(&self) -> String {
        let text = self.s("GET", "/alert/text", None);
        self.s("POST", "/alert/accept", Some(serde_json::json!({})));
        text.as_str().unwrap_or_default().to_string()
    }

    fn resize(&self, width: u32, height: u32) {
        self.s(
            "POST",
            "/window/rect",
            Some(serde_json::json!({"width": width, "height": height})),
        );
    }

    /// Saves a screenshot of the page as `name`.png among the test's artefacts.
    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        use base64::Engine;
        let png = self.s("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a screenshot"))
            .expect("base64");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn wait_for(&self, what: &str, text: &str) -> String {
        test_support::eventually(20, what, || {
            let s = self.source();
            s.contains(text).then_some(s)
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.s("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn a_real_browser_logs_in_watches_a_boot_live_powers_a_server_and_finds_it_audited() {
    let a = crate::power::appliance("");
    // A machine boots and the real agent registers it (the recorded machine "a").
    let id = "8c5e3f00-77aa-4b1e-9a00-0000000000a1".to_string();
    let _ = a.boot_script(&id, "b8:ca:3a:00:00:0a", "127.0.0.1");
    let agent = a.agent("a", test_support::REG_TOKEN, Some(&id));
    assert!(
        agent.status.success(),
        "{}",
        String::from_utf8_lossy(&agent.stderr)
    );
    let bmc = Bmc::start();
    crate::power::set_bmc(&a, &id, crate::power::ipmi_bmc(bmc.addr, "password"));
    test_support::random_file(&a.tftp_root().join("ipxe.efi"), 100_000, 9);
    let b = Browser::start();

    // A wrong token gets the login page again; the right one, the fleet.
    b.goto(&a.url("/console/"));
    b.wait_for("the login page", "Admin token");
    b.screenshot("login");
    b.type_into("#token", "not-the-token");
    b.click("button[type=submit]");
    b.wait_for("the refusal", "not the admin token");
    b.type_into("#token", ADMIN_TOKEN);
    b.click("button[type=submit]");
    b.wait_for("the fleet", &id);
    b.screenshot("fleet");
    b.resize(390, 844);
    b.screenshot("fleet-phone");
    b.resize(1280, 900);

    // Live boots: a boot storm (the appliance's own loadtest, bounded) fills the page
    // while it is open, with no reload.
    b.goto(&a.url("/console/boots"));
    b.wait_for("the live page", "Live boots");
    let storm = a
        .loadtest()
        .args([
            "--machines",
            "20",
            "--concurrency",
            "4",
            "--max-seconds",
            "60",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("arges loadtest");
    let live = b.wait_for("the storm's machines, pushed live", "10adbeef-");
    assert!(
        live.contains("data-updated"),
        "updated by the event stream, not a reload"
    );
    b.screenshot("live-boots");
    let storm = storm.wait_with_output().expect("the loadtest ends");
    assert!(storm.status.success(), "the loadtest");

    // The server's page: its timeline; power on through ipmi_sim, confirmed.
    b.goto(&a.url(&format!("/console/servers/{id}")));
    b.wait_for("the server page", "registered as");
    b.screenshot("server");
    b.click("form[data-confirm='Power this server on?'] button");
    let asked = b.accept_dialog();
    assert_eq!(asked, "Power this server on?");
    b.wait_for("the action done", "power-on: done");
    assert!(bmc.ipmitool_says_on(), "powered on from the browser");
    b.wait_for("the power step in the timeline", "BMC power on");

    // A forged cross-site form (another origin posting to the console) changes nothing.
    let forged = format!(
        "data:text/html,<form method=post action='{}'><input name=action value=cordon><input name=csrf value=x></form><script>document.forms[0].submit()</script>",
        a.url(&format!("/console/servers/{id}/action"))
    );
    b.goto(&forged);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        a.server_json(&id)["cordoned"],
        false,
        "the forged post did nothing"
    );

    b.goto(&a.url("/console/plugins"));
    b.wait_for("the plugins page", "in the chain");
    b.screenshot("plugins");

    // The audit log page has the power-on, by the console, from this browser.
    test_support::eventually(10, "the power-on audited", || {
        b.goto(&a.url("/console/audit"));
        b.source().contains("console power-on").then_some(())
    });
    let shot = b.screenshot("audit");
    eprintln!("console screenshots: {}", shot.parent().unwrap().display());
}
