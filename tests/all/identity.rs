//! Who gets a secret, tried as an attacker on the provisioning network would, against the
//! real binary with curl from several loopback addresses: impersonation before and after
//! the real machine, replays, no token, registration takeovers, forged done reports. In
//! each, nothing leaks silently, the alarm is raised where it must be, and the honest
//! machine provisions or fails closed with the reason.

use serde_json::{Value, json};

use crate::http::{MAC_A, UUID_A, register_machine};
use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, curl, param};

const REAL: &str = "127.0.0.1";
const THIEF: &str = "127.0.0.9";
const CONFIG: &str = "machine:\n  type: controlplane\n  ca: {key: SECRET-CA-KEY}\n";

/// `/boot.ipxe` for machine A from `from`: (status, script).
fn boot_from(a: &Appliance, from: &str) -> (u16, String) {
    crate::http::boot(a, from)
}

/// `/configdata` (or with `done`, the report) for machine A from `from` with `token`.
fn configdata(a: &Appliance, from: &str, token: &str, done: bool) -> (u16, String) {
    let path = if done {
        "/configdata/done"
    } else {
        "/configdata"
    };
    let url = a.url(&format!("{path}?uuid={UUID_A}&token={token}"));
    let mut args = vec!["--interface", from];
    if done {
        args.extend(["-X", "POST"]);
    }
    args.push(&url);
    let (s, b, _) = curl(&args);
    (s, String::from_utf8_lossy(&b).into_owned())
}

fn admin(a: &Appliance, method: &str, path: &str) -> (u16, Value) {
    let (s, b, _) = curl(&[
        "-X",
        method,
        "-H",
        &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        &a.url(path),
    ]);
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn server(a: &Appliance) -> Value {
    admin(a, "GET", &format!("/api/v1/servers/{UUID_A}")).1
}

fn metrics(a: &Appliance) -> String {
    String::from_utf8_lossy(&curl(&[&a.url("/metrics")]).1).into_owned()
}

/// Machine A registered (shared token), accepted into `talos` with a configuration.
fn provisioned_machine(extra: &str) -> Appliance {
    let a = Appliance::start(extra);
    assert!(register_machine(&a, "a").status.success(), "{}", a.log());
    for (method, path, body) in [
        ("POST", "accept", ""),
        ("PUT", "environment", r#"{"environment":"talos"}"#),
        ("PUT", "config", CONFIG),
    ] {
        let (s, _, _) = curl(&[
            "-X",
            method,
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
            "--data-binary",
            body,
            &a.url(&format!("/api/v1/servers/{UUID_A}/{path}")),
        ]);
        assert_eq!(s, 200, "{path}");
    }
    a
}

fn arm(a: &Appliance) {
    assert_eq!(
        admin(a, "POST", &format!("/api/v1/servers/{UUID_A}/arm")).0,
        200
    );
}

/// What the agent sends for recorded machine A, as JSON to edit.
fn registration_a() -> Value {
    json!({
        "uuid": UUID_A,
        "mode": "discover",
        "hardware": {
            "vendor": "Dell Inc.", "product": "PowerEdge R640", "serial": "SVC-a",
            "cpu": {"count": 2, "model": "Intel(R) Xeon(R) Gold 6130"},
            "memory_bytes": 67108864000u64,
            "nics": [{"name": "eth0", "mac": MAC_A, "addresses": []}],
            "disks": [
                {"name": "nvme0n1", "size_bytes": 1920383410176u64, "model": "", "serial": "nvme-a", "rotational": false},
                {"name": "sda", "size_bytes": 960197124096u64, "model": "PERC H740P", "serial": "sda-a", "rotational": true}
            ],
            "bmc": null
        }
    })
}

/// A change to a registration body.
type Edit = dyn Fn(&mut Value);

/// `POST /api/v1/register` from `from` with `token`: (status, body).
fn register(a: &Appliance, from: &str, token: &str, body: &Value) -> (u16, String) {
    let (s, b, _) = curl(&[
        "--interface",
        from,
        "-H",
        &format!("Authorization: Bearer {token}"),
        "--data-binary",
        &body.to_string(),
        &a.url("/api/v1/register"),
    ]);
    (s, String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn impersonation_before_the_real_machine_trips_the_window_and_is_never_silent() {
    let a = provisioned_machine("");
    arm(&a);
    // The thief asks first, naming the victim's UUID and MAC: it is the claimant.
    let (_, stolen) = boot_from(&a, THIEF);
    let stolen = param(&stolen, "token");
    assert_eq!(stolen.len(), 64);
    // The real machine boots in its window: a second requester. It trips the window,
    // and the real machine is told why instead of booting into a failing install.
    let (s, script) = boot_from(&a, REAL);
    assert_eq!(s, 200);
    assert!(
        script.contains("stands in alarm") && !script.contains("/env/talos/"),
        "{script}"
    );
    // The grant is revoked: the thief's token opens nothing.
    assert_eq!(configdata(&a, THIEF, &stolen, false).0, 403);
    let s = server(&a);
    assert_eq!(s["alarm"]["kind"], "second-requester", "{s}");
    assert_eq!(s["alarm"]["first"]["source"], THIEF);
    assert_eq!(s["alarm"]["second"]["source"], REAL);
    assert_eq!(s["window"]["closed"]["why"], "tripped");
    let log = a.log();
    assert!(
        log.lines()
            .any(|l| l.contains("no secret goes out") && l.contains(THIEF) && l.contains(REAL)),
        "a log line with both sources:\n{log}"
    );
    assert!(metrics(&a).contains("arges_identity_alarms_total{kind=\"second_requester\"} 1"));
    // Until an operator arms it again, nobody gets a token, not even the claimant.
    assert_eq!(param(&boot_from(&a, REAL).1, "token"), "");
    assert_eq!(param(&boot_from(&a, THIEF).1, "token"), "");

    // Re-armed, the real machine provisions.
    arm(&a);
    assert!(server(&a)["alarm"].is_null(), "arming clears the alarm");
    let token = param(&boot_from(&a, REAL).1, "token");
    let (code, body) = configdata(&a, REAL, &token, false);
    assert_eq!((code, body.as_str()), (200, CONFIG));

    // A thief that asks first and fetches at once gets the configuration once: then
    // the real machine's boot raises the alarm. A secret never goes out silently.
    arm(&a);
    let stolen = param(&boot_from(&a, THIEF).1, "token");
    assert_eq!(configdata(&a, THIEF, &stolen, false).0, 200);
    let (_, script) = boot_from(&a, REAL);
    assert!(script.contains("stands in alarm"), "{script}");
    assert_eq!(server(&a)["alarm"]["kind"], "second-requester");
    assert!(metrics(&a).contains("arges_identity_alarms_total{kind=\"second_requester\"} 2"));
}

#[test]
fn impersonation_after_the_real_machine_revokes_its_token_and_fails_closed() {
    let a = provisioned_machine("");
    arm(&a);
    let token = param(&boot_from(&a, REAL).1, "token");
    assert_eq!(token.len(), 64);
    // The thief asks after the real machine, before it fetched: the window trips, the
    // grant is revoked, and neither gets the configuration.
    let (_, script) = boot_from(&a, THIEF);
    assert!(script.contains("stands in alarm"), "{script}");
    let (code, body) = configdata(&a, REAL, &token, false);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("alarm") || body.contains("no configuration"),
        "{body}"
    );
    let s = server(&a);
    assert_eq!(s["alarm"]["first"]["source"], REAL, "{s}");
    assert_eq!(s["alarm"]["second"]["source"], THIEF);
    assert!(
        metrics(&a).contains("arges_configdata_requests_total{result=\"served\"} 0\n"),
        "nothing served"
    );
}

#[test]
fn a_used_token_replayed_from_elsewhere_raises_the_alarm() {
    let a = provisioned_machine("");
    arm(&a);
    let token = param(&boot_from(&a, REAL).1, "token");
    assert_eq!(configdata(&a, REAL, &token, false).0, 200);
    // Sniffed off the wire and replayed from another address: refused, and the alarm.
    let (code, body) = configdata(&a, THIEF, &token, false);
    assert_eq!(code, 403, "{body}");
    let s = server(&a);
    assert_eq!(s["alarm"]["kind"], "secret-replayed", "{s}");
    assert_eq!(s["alarm"]["first"]["source"], REAL);
    assert_eq!(s["alarm"]["second"]["source"], THIEF);
    // Neither the done report from the thief nor anything after the alarm counts.
    assert_eq!(configdata(&a, THIEF, &token, true).0, 403);
    assert_eq!(configdata(&a, REAL, &token, false).0, 403);
    assert!(metrics(&a).contains("arges_identity_alarms_total{kind=\"secret_replayed\"} 1"));
}

#[test]
fn no_token_is_refused_even_from_the_boot_address_and_raises_nothing() {
    let a = provisioned_machine("");
    arm(&a);
    let token = param(&boot_from(&a, REAL).1, "token");
    for q in ["", "&token="] {
        let url = a.url(&format!("/configdata?uuid={UUID_A}{q}"));
        let (s, body, _) = curl(&["--interface", REAL, &url]);
        assert_eq!(s, 403);
        assert!(String::from_utf8_lossy(&body).contains("a token is required"));
    }
    // A forged done report, without the token or with a wrong one, is refused.
    assert_eq!(configdata(&a, REAL, "", true).0, 403);
    assert_eq!(configdata(&a, REAL, &"0".repeat(64), true).0, 403);
    assert!(server(&a)["alarm"].is_null());
    // The honest machine still gets its configuration.
    assert_eq!(configdata(&a, REAL, &token, false).0, 200);
}

#[test]
fn registrations_cannot_take_over_a_server() {
    let a = provisioned_machine("");
    let before = server(&a);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = registration_a();
        f(&mut r);
        r
    };
    // The same machine reporting the same: fine, and nothing changes.
    let (s, body) = register(&a, REAL, REG_TOKEN, &registration_a());
    assert_eq!(s, 200, "{body}");
    // No MAC at all: the registration is malformed.
    let (s, body) = register(
        &a,
        REAL,
        REG_TOKEN,
        &with(&|r| r["hardware"]["nics"] = json!([])),
    );
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("hardware.nics"), "{body}");
    // An extra MAC, other hardware, a BMC address: refused without the secret of a
    // discover boot of this server, and recorded on it.
    let changes: Vec<(&str, Box<Edit>)> = vec![
        (
            "MACs",
            Box::new(|r| {
                r["hardware"]["nics"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "eth1", "mac": "02:00:00:00:00:66"}))
            }),
        ),
        ("hardware", Box::new(|r| r["hardware"]["disks"] = json!([]))),
        (
            "BMC address",
            Box::new(|r| r["hardware"]["bmc"] = json!({"ip": "10.6.6.6", "mac": ""})),
        ),
    ];
    for (what, change) in &changes {
        let (s, body) = register(&a, THIEF, REG_TOKEN, &with(change.as_ref()));
        assert_eq!(s, 403, "{what}: {body}");
        assert!(
            body.contains(what) && body.contains("arges server arm"),
            "{body}"
        );
    }
    // A MAC of this server claimed for another UUID: refused, it never moves.
    let (s, body) = register(
        &a,
        THIEF,
        REG_TOKEN,
        &with(&|r| r["uuid"] = json!("11111111-2222-3333-4444-555555555555")),
    );
    assert_eq!(s, 409, "{body}");
    let after = server(&a);
    for field in ["macs", "hardware", "bmc_address", "accepted", "environment"] {
        assert_eq!(before[field], after[field], "{field} changed");
    }
    assert_eq!(after["refusals"].as_array().unwrap().len(), 4, "{after}");
    // The victim's UUID with a new MAC is another machine (duplicate UUIDs exist): a
    // server of its own, which changes nothing of the victim's.
    let (s, body) = register(
        &a,
        THIEF,
        REG_TOKEN,
        &with(&|r| r["hardware"]["nics"][0]["mac"] = json!("02:00:00:00:00:77")),
    );
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["server_id"], format!("{UUID_A}-020000000077"));
    let victim = server(&a);
    assert_eq!(victim["macs"], before["macs"]);
    assert_eq!(victim["hardware"], before["hardware"]);
    let m = metrics(&a);
    assert!(
        m.contains("arges_registrations_total{result=\"refused\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("arges_registrations_total{result=\"conflict\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("arges_registrations_total{result=\"invalid\"} 1"),
        "{m}"
    );
    // A token nobody handed out is no credential.
    let (s, _) = register(&a, REAL, &"f".repeat(64), &registration_a());
    assert_eq!(s, 401);
}

#[test]
fn a_discover_boot_in_a_window_may_change_its_server_and_only_once() {
    let a = Appliance::start("[policy]\nunaccepted = \"discover\"\n");
    // Unknown: the script's secret registers the machine, from the address that booted.
    let (_, script) = boot_from(&a, REAL);
    let bound = param(&script, "arges.token");
    assert!(a.agent("a", &bound, None).status.success(), "{}", a.log());
    // Its boot-bound secret is spent, and never worked from elsewhere.
    let (s, _) = register(&a, THIEF, &bound, &registration_a());
    assert_eq!(s, 403);
    // Outside a window, a discover boot of the known server carries a secret that may
    // only re-register it unchanged.
    let (_, script) = boot_from(&a, REAL);
    let outside = param(&script, "arges.token");
    let changed = {
        let mut r = registration_a();
        r["hardware"]["memory_bytes"] = json!(137438953472u64);
        r
    };
    let (s, body) = register(&a, REAL, &outside, &changed);
    assert_eq!(s, 403, "{body}");
    // Armed: its discover boot gets the window's secret, which may change it.
    arm(&a);
    let (_, script) = boot_from(&a, REAL);
    let secret = param(&script, "arges.token");
    assert_eq!(secret.len(), 64, "{script}");
    // The window's secret from another address is a replay: the alarm.
    let mut stolen_try = changed.clone();
    stolen_try["hardware"]["product"] = json!("owned");
    let (s, body) = register(&a, THIEF, &secret, &stolen_try);
    assert_eq!(s, 403, "{body}");
    assert_eq!(server(&a)["alarm"]["kind"], "secret-replayed");
    assert_eq!(server(&a)["hardware"]["product"], "PowerEdge R640");
    // Armed again, the real machine changes its record with its own boot's secret.
    arm(&a);
    let secret = param(&boot_from(&a, REAL).1, "arges.token");
    let (s, body) = register(&a, REAL, &secret, &changed);
    assert_eq!(s, 200, "{body}");
    assert_eq!(server(&a)["hardware"]["memory_bytes"], 137438953472u64);
    assert_eq!(server(&a)["window"]["closed"]["why"], "used");
}

#[test]
fn configurations_are_sealed_at_rest_and_tokens_never_shown() {
    let a = provisioned_machine("");
    arm(&a);
    let token = param(&boot_from(&a, REAL).1, "token");
    let (_, all, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        &a.url("/api/v1/servers"),
    ]);
    assert!(!String::from_utf8_lossy(&all).contains(&token));
    // Neither the configuration nor the token is in the store's bytes.
    let db = std::fs::read(a.dir.path().join("data/inventory.redb")).unwrap();
    assert!(
        !db.windows(13).any(|w| w == b"SECRET-CA-KEY"),
        "the configuration is sealed"
    );
    assert!(
        !db.windows(token.len()).any(|w| w == token.as_bytes()),
        "only the hash is kept"
    );
    assert_eq!(
        configdata(&a, REAL, &token, false),
        (200, CONFIG.to_string())
    );
}

#[test]
fn the_cli_arms_shows_and_disarms_a_window() {
    let a = provisioned_machine("");
    let cli = |args: &[&str]| {
        let out = test_support::run(
            std::process::Command::new(test_support::bin())
                .args(["server", "--url", &a.url(""), "--token", ADMIN_TOKEN])
                .args(args),
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = cli(&["arm", UUID_A]);
    assert!(ok && out.contains("opened by the admin API"), "{out}");
    boot_from(&a, REAL);
    let (ok, out) = cli(&["show", UUID_A]);
    assert!(ok && out.contains("claimed by 127.0.0.1"), "{out}");
    let (ok, out) = cli(&["disarm", UUID_A]);
    assert!(ok && out.contains("(disarmed"), "{out}");
    assert_eq!(
        param(&boot_from(&a, REAL).1, "token"),
        "",
        "disarmed: no token"
    );
    let (ok, _) = cli(&["arm", "no-such-server"]);
    assert!(!ok);
}

/// The audit log records who did what from where: admin changes (and a wrong token), a
/// configuration served and one refused, a registration refused and a tripped window;
/// in the API in order, in the JSON-lines file, and still there after a restart.
#[test]
fn every_change_secret_and_refusal_is_in_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let mut a = provisioned_machine(&format!("[audit]\nfile = {:?}\n", file.display()));
    arm(&a);
    // A wrong admin token, a refused registration, a configuration served to the real
    // machine and refused to a thief (which trips the window).
    let (s, _, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer not-the-token",
        &a.url(&format!("/api/v1/servers/{UUID_A}/cordon")),
    ]);
    assert_eq!(s, 401);
    assert_eq!(register(&a, THIEF, "forged", &registration_a()).0, 401);
    let (_, script) = boot_from(&a, REAL);
    let token = param(&script, "token");
    assert_eq!(configdata(&a, REAL, &token, false).0, 200);
    assert_eq!(configdata(&a, THIEF, &token, false).0, 403);

    let entries = |a: &Appliance| -> Vec<Value> {
        let (s, v) = admin(a, "GET", "/api/v1/audit?after=0&limit=1000");
        assert_eq!(s, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    };
    let find = |all: &[Value], action: &str, outcome: &str| -> Value {
        all.iter()
            .find(|e| {
                e["action"].as_str().is_some_and(|x| x.contains(action)) && e["outcome"] == outcome
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {action} {outcome} in {all:#?}"))
    };
    let all = test_support::eventually(10, "the audit entries stored", || {
        let all = entries(&a);
        all.iter()
            .any(|e| {
                e["action"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("alarm_"))
            })
            .then_some(all)
    });
    let accepted = find(&all, &format!("POST /api/v1/servers/{UUID_A}/accept"), "ok");
    assert_eq!(
        (accepted["who"].as_str(), accepted["from"].as_str()),
        (Some("admin"), Some(REAL))
    );
    assert_eq!(accepted["server"], UUID_A);
    let wrong = find(&all, "/cordon", "refused");
    assert_eq!(wrong["who"], "unknown");
    let refused = find(&all, "registration", "refused");
    assert_eq!(refused["from"], THIEF);
    let served = find(&all, "config_served", "ok");
    assert_eq!(
        (served["who"].as_str(), served["from"].as_str()),
        (Some(format!("machine {UUID_A}").as_str()), Some(REAL))
    );
    let stolen = find(&all, "config_served", "refused");
    assert_eq!(stolen["from"], THIEF);
    assert!(
        stolen["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{stolen}"
    );
    find(&all, "alarm_", "refused");
    // Reads are not recorded; numbers only grow.
    assert!(
        all.iter()
            .all(|e| !e["action"].as_str().unwrap_or("").contains("admin GET")),
        "{all:#?}"
    );
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The file has the same entries, one JSON line each.
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, all);
    assert!(metrics(&a).contains("arges_audit_entries_total{outcome=\"refused\"}"));
    // Kept across a stop and a start.
    assert!(a.terminate().success());
    a.restart_after_kill9();
    assert_eq!(entries(&a)[..all.len()], all[..]);
}
