//! Power control through the appliance: the shipped bmc-driver plugins (`ipmi`,
//! `supermicro`, `redfish`) and a faulty one, the power manager's queue, retries and
//! confirmation, sealed credentials, the admin API and `arges bmc`, against ipmi_sim and
//! sushy-emulator on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use arges::bmc::ipmi::IpmiClient;
use serde_json::{Value, json};

use crate::chassis;
use crate::ipmi::lossy_relay;
use crate::plugins::built;
use crate::redfish::Sushy;
use test_support::ipmi_sim::{Bmc, SUPERMICRO};
use test_support::{ADMIN_TOKEN, Appliance, Registration, raw_http, runtime};

/// An appliance with every shipped driver (and the faulty one) in its plugins folder.
pub(crate) fn appliance(extra: &str) -> Appliance {
    let dir = Appliance::prepare(extra);
    let plugins = dir.path().join("data/plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["ipmi", "supermicro", "redfish", "driver-faults"] {
        let file = format!("{name}.wasm");
        std::fs::copy(built().join(&file), plugins.join(&file)).unwrap();
    }
    let a = Appliance::start_in(dir, &[]);
    a.wait_metric("arges_plugins_active 4");
    a
}

/// Registers machine `i` and returns its id.
fn server(a: &Appliance, i: u32) -> String {
    a.register(&Registration::numbered(i))
}

fn api(a: &Appliance, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, raw) = raw_http(
        a.http,
        method,
        path,
        Some(ADMIN_TOKEN),
        body.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", a.log()));
    let v = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&raw)));
    (status, v)
}

pub(crate) fn set_bmc(a: &Appliance, id: &str, bmc: Value) {
    let (status, v) = api(a, "PUT", &format!("/api/v1/servers/{id}/bmc"), bmc);
    assert_eq!(status, 200, "{v}");
}

pub(crate) fn ipmi_bmc(addr: SocketAddr, password: &str) -> Value {
    json!({"address": addr.to_string(), "protocol": "ipmi", "username": "admin", "password": password})
}

fn power(a: &Appliance, id: &str, action: &str) -> (u16, Value) {
    api(
        a,
        "POST",
        &format!("/api/v1/servers/{id}/bmc/power"),
        json!({ "action": action }),
    )
}

fn bootdev(a: &Appliance, id: &str, device: &str, efi: bool) -> (u16, Value) {
    api(
        a,
        "POST",
        &format!("/api/v1/servers/{id}/bmc/bootdev"),
        json!({"device": device, "persistent": false, "efi": efi}),
    )
}

fn sessions(bmc: &Bmc) -> u8 {
    runtime()
        .block_on(
            IpmiClient::default()
                .with_session(&bmc.target(), async |s| chassis::active_sessions(s).await),
        )
        .unwrap()
}

const FAST: &str = "[bmc]\nbackoff_ms = 100\npoll_ms = 200\nsettle_s = 30\n";

#[test]
fn ipmi_power_and_one_time_pxe_through_the_appliance() {
    let bmc = Bmc::start();
    let a = appliance(FAST);
    let id = server(&a, 1);
    set_bmc(&a, &id, ipmi_bmc(bmc.addr, "password"));

    let (status, r) = bootdev(&a, &id, "pxe", true);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["event"]["driver"], "ipmi", "the generic driver fits: {r}");
    assert_eq!(r["power"]["next_boot"]["device"], "pxe");

    let (status, r) = power(&a, &id, "on");
    assert_eq!(status, 200, "{r}\n{}", a.log());
    assert_eq!(r["power"]["state"], "on", "confirmed by polling: {r}");
    assert!(bmc.ipmitool_says_on(), "ipmitool disagrees");
    // The boot device went out for the bootdev and again before the power-on.
    let asked = bmc.requests();
    assert_eq!(asked.matches("boot pxe").count(), 2, "{asked}");
    assert!(
        asked.rfind("boot pxe").unwrap() < asked.find("power 1").unwrap(),
        "boot device before power: {asked}"
    );
    // ipmi_sim drops the EFI bit; what we sent is in the driver's command trace.
    assert!(
        a.log().contains("data=[5, 160, 4, 0, 0, 0]"),
        "valid + EFI + PXE sent"
    );

    let (status, r) = api(
        &a,
        "GET",
        &format!("/api/v1/servers/{id}/bmc/status"),
        json!(null),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["power"]["state"], "on");
    for action in ["cycle", "off"] {
        let (status, r) = power(&a, &id, action);
        assert_eq!(status, 200, "{action}: {r}");
    }
    assert!(!bmc.ipmitool_says_on());
    assert_eq!(
        sessions(&bmc),
        1,
        "every session the appliance opened was closed"
    );

    // The record is on the server; the CLI reads the same.
    let (_, s) = api(&a, "GET", &format!("/api/v1/servers/{id}"), json!(null));
    let ops: Vec<&str> = s["power"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "bootdev pxe efi",
            "power on",
            "status",
            "power cycle",
            "power off"
        ]
    );
    let out = Command::new(test_support::bin())
        .args([
            "bmc",
            "--url",
            &a.url(""),
            "--token",
            ADMIN_TOKEN,
            "status",
            &id,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("status ok (driver ipmi") && text.contains("power off"),
        "{text}"
    );
    assert!(
        a.metrics()
            .contains(r#"arges_bmc_operations_total{operation="power",result="ok"} 3"#)
    );
}

#[test]
fn bmc_passwords_are_sealed_and_never_shown() {
    let a = appliance("");
    let id = server(&a, 2);
    let secret = "Zebra-s3cret-Quartz-9041";
    set_bmc(&a, &id, ipmi_bmc("127.0.0.1:9".parse().unwrap(), secret));
    let (_, s) = api(&a, "GET", &format!("/api/v1/servers/{id}"), json!(null));
    let (_, b) = api(&a, "GET", &format!("/api/v1/servers/{id}/bmc"), json!(null));
    assert_eq!(b["bmc"]["username"], "admin");
    for text in [s.to_string(), b.to_string(), a.log()] {
        assert!(!text.contains(secret), "the password leaked: {text}");
    }
    let db = std::fs::read(a.data().join("inventory.redb")).unwrap();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the password is sealed at rest"
    );
    let key = a.data().join("bmc-credentials.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Half a credential is refused; a bad TLS choice for Redfish too.
    let (status, v) = api(
        &a,
        "PUT",
        &format!("/api/v1/servers/{id}/bmc"),
        json!({"address": "h", "username": "admin"}),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = api(
        &a,
        "PUT",
        &format!("/api/v1/servers/{id}/bmc"),
        json!({"address": "h", "protocol": "redfish", "username": "u", "password": "p"}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("tls"), "{v}");
}

#[test]
fn failures_are_told_apart_and_never_block_the_others() {
    let good = Bmc::start();
    let other = Bmc::start();
    let slow = Bmc::start();
    let a = appliance(
        "[bmc]\nexchange_timeout_ms = 400\nattempts = 2\nbackoff_ms = 100\npoll_ms = 200\nsettle_s = 20\n\
         [plugins]\ndriver_timeout_ms = 1000\n[plugins.config.driver-faults]\nmode = \"loop\"\n",
    );
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    // 50 ms each way and every fourth packet lost.
    let relay = lossy_relay(slow.addr, Duration::from_millis(50), 4);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("good", ipmi_bmc(good.addr, "password"), "ok"),
        (
            "wrong-password",
            ipmi_bmc(other.addr, "not-it"),
            "credentials",
        ),
        (
            "nothing-listens",
            ipmi_bmc(closed, "password"),
            "unreachable",
        ),
        (
            "silent",
            ipmi_bmc(silent.local_addr().unwrap(), "password"),
            "timeout",
        ),
        ("slow-lossy", ipmi_bmc(relay, "password"), "ok"),
        (
            "plugin-loops",
            json!({"address": good.addr.to_string(), "username": "admin", "password": "password", "driver": "driver-faults"}),
            "timeout",
        ),
    ];
    let ids: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, bmc, _))| {
            let id = server(&a, 10 + i as u32);
            set_bmc(&a, &id, bmc.clone());
            id
        })
        .collect();
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(|| power(&a, id, "on")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((name, _, want), (status, r)) in cases.iter().zip(&results) {
        let got = if r["event"]["ok"] == true {
            "ok"
        } else {
            r["event"]["reason"].as_str().unwrap_or("?")
        };
        assert_eq!(got, *want, "{name}: {r}\n{}", a.log());
        assert_eq!(*status == 200, *want == "ok", "{name}: {status}");
    }
    // Wrong credentials are not retried; a silent BMC is.
    assert_eq!(results[1].1["event"]["attempts"], 1, "{}", results[1].1);
    assert!(results[3].1["event"]["attempts"].as_u64().unwrap() >= 2);
    assert!(
        results[5].1["event"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{}",
        results[5].1
    );
    assert!(
        !results[1].1.to_string().contains("not-it"),
        "no password in errors"
    );
    let m = a.metrics();
    for result in ["ok", "credentials", "unreachable", "timeout"] {
        assert!(
            m.contains(&format!(
                "arges_bmc_operations_total{{operation=\"power\",result=\"{result}\"}}"
            )),
            "{result}: {m}"
        );
    }
    // The good BMCs were left clean.
    assert_eq!(sessions(&good), 1);
    assert_eq!(sessions(&slow), 1);
}

#[test]
fn a_supermicro_bmc_gets_the_vendor_driver_and_its_uefi_disk_code() {
    let bmc = Bmc::start_as(SUPERMICRO);
    let a = appliance(FAST);
    let id = server(&a, 20);
    set_bmc(&a, &id, ipmi_bmc(bmc.addr, "password"));
    let (status, r) = bootdev(&a, &id, "pxe", true);
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["event"]["driver"], "supermicro",
        "the vendor driver outscored ipmi: {r}"
    );
    // The faulty driver's probe trapped and was passed over.
    assert!(a.log().contains("driver probe failed; trying the others"));
    let (status, r) = bootdev(&a, &id, "disk", false);
    assert_eq!(status, 200, "{r}");
    assert!(
        a.log().contains("data=[5, 128, 8, 0, 0, 0]"),
        "legacy disk: the spec's 0x08"
    );
    // UEFI disk: Supermicro's 0x24, which the simulator (not a Supermicro) refuses.
    let (status, r) = bootdev(&a, &id, "disk", true);
    assert!(
        a.log().contains("data=[5, 160, 36, 0, 0, 0]"),
        "UEFI disk: 0x24 sent"
    );
    assert_eq!(status, 502, "{r}");
    assert_eq!(r["event"]["reason"], "driver_failed", "{r}");
    // A generic BMC gets the spec's code for the same request.
    let generic = Bmc::start();
    let other = server(&a, 21);
    set_bmc(&a, &other, ipmi_bmc(generic.addr, "password"));
    let (status, r) = bootdev(&a, &other, "disk", true);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["event"]["driver"], "ipmi");
    assert!(a.log().contains("data=[5, 160, 8, 0, 0, 0]"));
}

#[test]
fn redfish_power_and_boot_through_sushy_with_the_redfish_driver() {
    let bmc = Sushy::start();
    // sushy applies power changes after a random 1-11 s.
    let a = appliance("[bmc]\npoll_ms = 500\nsettle_s = 40\n");
    let id = server(&a, 30);
    let settings = |tls: Value| json!({"address": bmc.authority, "protocol": "redfish", "username": "admin", "password": "password", "tls": tls});
    set_bmc(&a, &id, settings(json!({"ca_file": bmc.ca_file()})));
    let (status, r) = bootdev(&a, &id, "pxe", true);
    assert_eq!(status, 200, "{r}\n{}", a.log());
    assert_eq!(r["event"]["driver"], "redfish");
    // sushy reads the override back as Continuous whatever is sent: check what was sent.
    assert!(
        a.log().contains(r#""BootSourceOverrideEnabled":"Once""#),
        "one-time boot asked for"
    );
    for (action, state) in [("on", "on"), ("cycle", "on"), ("off", "off")] {
        let (status, r) = power(&a, &id, action);
        assert_eq!(status, 200, "{action}: {r}\n{}", a.log());
        assert_eq!(r["power"]["state"], state, "{action}: {r}");
    }
    // A pin that is not the BMC's certificate: refused before any credential is sent.
    set_bmc(&a, &id, settings(json!({"pin_sha256": "ab".repeat(32)})));
    let (status, r) = api(
        &a,
        "GET",
        &format!("/api/v1/servers/{id}/bmc/status"),
        json!(null),
    );
    assert_eq!(status, 502, "{r}");
    assert_eq!(r["event"]["reason"], "tls", "{r}");
}

#[test]
fn fifty_servers_at_once_and_no_session_left_open() {
    let bmcs: Vec<Bmc> = (0..50).map(|_| Bmc::start()).collect();
    let a = appliance(FAST);
    let ids: Vec<String> = bmcs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let id = server(&a, 100 + i as u32);
            set_bmc(&a, &id, ipmi_bmc(b.addr, "password"));
            id
        })
        .collect();
    // Two operations per server at once: the manager queues them per BMC.
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .flat_map(|id| {
                [
                    s.spawn(|| bootdev(&a, id, "pxe", true)),
                    s.spawn(|| power(&a, id, "on")),
                ]
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, r) in &results {
        assert_eq!(*status, 200, "{r}");
    }
    for b in &bmcs {
        assert_eq!(sessions(b), 1, "{}: sessions left open", b.addr);
        assert!(b.requests().contains("power 1"), "{}", b.requests());
    }
}

#[test]
fn doctor_says_which_bmc_drivers_load() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let config = dir.path().join("appliance.toml");
    std::fs::write(&config, "[plugins]\ndir = \"plugins\"\n").unwrap();
    let doctor = || {
        let out = Command::new(test_support::bin())
            .args(["doctor", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        doctor().contains("warning  no bmc-driver plugin in"),
        "{}",
        doctor()
    );
    std::fs::copy(built().join("ipmi.wasm"), plugins.join("ipmi.wasm")).unwrap();
    std::fs::copy(built().join("redfish.wasm"), plugins.join("redfish.wasm")).unwrap();
    std::fs::write(plugins.join("junk.wasm"), b"not wasm").unwrap();
    let text = doctor();
    assert!(
        text.contains("ok       bmc-driver plugins: ipmi, redfish"),
        "{text}"
    );
    assert!(text.contains("plugin junk does not load"), "{text}");
}

#[test]
fn an_operation_whose_caller_hangs_up_still_ends_and_is_recorded() {
    use std::io::Write;
    let a = appliance("[bmc]\nexchange_timeout_ms = 200\nattempts = 1\n");
    let id = server(&a, 40);
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    set_bmc(&a, &id, ipmi_bmc(silent.local_addr().unwrap(), "password"));
    // Ask, then hang up before the answer.
    let body = r#"{"action":"on"}"#;
    let mut c = std::net::TcpStream::connect(a.http).unwrap();
    write!(
        c,
        "POST /api/v1/servers/{id}/bmc/power HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        a.http,
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    let recorded = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let (_, s) = api(&a, "GET", &format!("/api/v1/servers/{id}"), json!(null));
        s["power"]["history"]
            .as_array()
            .and_then(|h| h.first().cloned())
    });
    let e = recorded.unwrap_or_else(|| panic!("never recorded:\n{}", a.log()));
    assert_eq!(e["operation"], "power on");
    assert_eq!(e["reason"], "timeout", "{e}");
}
