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
