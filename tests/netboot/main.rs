//! End to end with real firmware: QEMU machines power on in a network namespace, with a
//! site DHCP server that only leases addresses and Arges answering proxyDHCP, TFTP and
//! HTTP, and go from power-on to a registered Server; and (`cluster.rs`) from a bare
//! machine behind a BMC to a Cluster API machine.
//!
//! These need root, QEMU and a few Debian packages, and take a minute or two each under
//! TCG, so `cargo test` leaves them out (ignored); `tests/run-all.sh` runs them, and when
//! a peer is missing they fail with the reason.

mod cluster;
mod deployed;
mod lab;

use lab::{Firmware, Lab, Machine};
use serde_json::Value;

fn find<'a>(servers: &'a [Value], uuid: &str) -> &'a Value {
    servers
        .iter()
        .find(|s| s["uuid"] == uuid)
        .unwrap_or_else(|| panic!("no server {uuid} in {servers:#?}"))
}

/// The machine registered itself with what QEMU gave it: UUID, MAC and disk.
fn assert_registered_as(lab: &Lab, m: &Machine) -> Value {
    let servers = lab.servers();
    let s = find(&servers, &m.uuid).clone();
    assert_eq!(s["id"], m.uuid.as_str());
    assert!(
        s["macs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == m.mac.as_str())),
        "MAC {} missing: {s:#}",
        m.mac
    );
    let disks = s["hardware"]["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        disks
            .iter()
            .any(|d| d["serial"] == m.disk_serial.as_str() && d["size_bytes"] == 64u64 << 20),
        "disk {} (64 MiB) missing: {s:#}",
        m.disk_serial
    );
    assert!(
        s["hardware"]["memory_bytes"].as_u64().unwrap_or(0) > 256 << 20,
        "memory not read: {s:#}"
    );
    s
}

/// The value of a metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
}

/// Each of `lines` (a metric with its labels) counted at least once.
fn assert_counted(lab: &Lab, m: &Machine, lines: &[&str]) {
    let metrics = lab.metrics();
    for line in lines {
        assert!(
            metric(&metrics, line) >= 1.0,
            "{line} not counted:\n{metrics}\n{}",
            lab.logs(&m.serial_log)
        );
    }
}

/// The latest boot decision the inventory recorded for `uuid`.
fn last_boot(lab: &Lab, uuid: &str) -> Value {
    let servers = lab.servers();
    find(&servers, uuid)["boot_history"]
        .as_array()
        .and_then(|h| h.last().cloned())
        .unwrap_or_else(|| panic!("no boot record for {uuid}: {servers:#?}"))
}

fn report(firmware: &str, lab: &Lab, wall: std::time::Duration) {
    let m = lab.metrics();
    let count = metric(&m, "arges_boot_to_registration_seconds_count");
    let sum = metric(&m, "arges_boot_to_registration_seconds_sum");
    eprintln!(
        "{firmware}: first proxyDHCP answer to registered {:.1} s (appliance histogram, {count} boots); power-on to power-off {:.1} s",
        sum / count,
        wall.as_secs_f64()
    );
}

/// The appliance witnessed the machine's first boot as `steps` (in this order, other
/// steps between them allowed; a transfer only once it finished); the timeline is
/// printed.
fn assert_boot_witnessed(lab: &Lab, m: &Machine, steps: &[&str]) {
    let answer: Value =
        serde_json::from_str(&lab.api("GET", &format!("/api/v1/servers/{}/boots", m.uuid), None))
            .expect("boots JSON");
    let boot = &answer["boots"][0];
    let seen: Vec<&Value> = boot["steps"]
        .as_array()
        .map_or(vec![], |a| a.iter().collect());
    let mut want = steps.iter().peekable();
    for s in &seen {
        // A transfer counts when it finished (UEFI asks for the size first and aborts
        // that read: the timeline shows it, the sequence skips it).
        let finished = match s["step"].as_str() {
            Some("tftp") => s["outcome"] == "complete",
            Some("fetch") => s["status"] == 200,
            _ => true,
        };
        if finished && want.peek().is_some_and(|w| s["step"] == **w) {
            want.next();
        }
    }
    let timeline: Vec<String> = seen
        .iter()
        .map(|s| {
            format!(
                "+{} ms {} {}",
                s["gap_ms"],
                s["step"].as_str().unwrap_or("?"),
                s["file"]
                    .as_str()
                    .or(s["path"].as_str())
                    .or(s["client"].as_str())
                    .or(s["action"].as_str())
                    .unwrap_or("")
            )
        })
        .collect();
    assert!(
        want.peek().is_none(),
        "the boot should read {steps:?}; witnessed:\n{}",
        timeline.join("\n")
    );
    eprintln!("witnessed boot of {}:\n  {}", m.uuid, timeline.join("\n  "));
}

/// A new machine powers on in lab `tag`, registers and powers off; `counted` metrics
/// show the path it took, and its timeline the `steps` it went through. Returns the lab,
/// the machine and its Server.
fn discovers(
    tag: &str,
    firmware: Firmware,
    n: u8,
    label: &str,
    counted: &[&str],
    steps: &[&str],
) -> (Lab, Machine, Value) {
    let mut lab = Lab::start(tag, "");
    let m = Machine::new(&lab, firmware, n);
    let i = lab.boot(&m);
    let wall = lab.wait_exit(i, &m);
    let s = assert_registered_as(&lab, &m);
    // The agent registered over HTTPS, trusting the certificate its boot script pinned.
    let serial = lab.serial(&m);
    let pinned = serial.lines().any(|l| {
        l.contains("arges-init: cmdline:")
            && l.contains(":8443 arges.pin=")
            && l.split("arges.pin=").nth(1).is_some_and(|p| {
                p.split_whitespace()
                    .next()
                    .is_some_and(|p| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            })
    });
    assert!(
        pinned && serial.contains("arges.appliance=https://"),
        "the discovery boot should send the agent to HTTPS with a pin:\n{}",
        lab.logs(&m.serial_log)
    );
    assert_counted(&lab, &m, counted);
    assert_boot_witnessed(&lab, &m, steps);
    report(label, &lab, wall);
    (lab, m, s)
}

#[test]
#[ignore = "QEMU end to end in network namespaces (root); tests/run-all.sh runs it"]
fn bios_machine_registers_then_boots_its_environment() {
    let (mut lab, m, s) = discovers(
        "b",
        Firmware::Bios,
        1,
        "BIOS (SeaBIOS + iPXE ROM)",
        &["arges_dhcp_replies_total{client=\"ipxe\",firmware=\"bios\"}"],
        &["dhcp", "boot_script", "fetch", "fetch", "registered"],
    );
    let serial = lab.serial(&m);
    assert!(
        serial.contains("arges-init: action: power-off"),
        "the agent should have been told to power off:\n{}",
        lab.logs(&m.serial_log)
    );
    assert_eq!(
        metric(&lab.metrics(), "arges_boot_to_registration_seconds_count"),
        1.0
    );

    // Accepted, with an environment: the next boot gets that kernel and command line.
    let id = s["id"].as_str().expect("id").to_string();
    lab.api("POST", &format!("/api/v1/servers/{id}/accept"), None);
    lab.api(
        "PUT",
        &format!("/api/v1/servers/{id}/environment"),
        Some(r#"{"environment":"install"}"#),
    );
    let i = lab.boot(&m);
    lab.wait_exit(i, &m);
    let serial = lab.serial(&m);
    // The command line the kernel got is the environment's (iPXE puts initrd= first).
    let cmdline = serial
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("arges-init: cmdline: ")
        })
        .unwrap_or_default();
    assert!(
        cmdline.ends_with(&format!(
            " console=ttyS0,115200 arges.mode=install arges.marker=install-{id}"
        )) && serial.contains("arges-init: environment booted (mode install)"),
        "the second boot should run the install environment:\n{}",
        lab.logs(&m.serial_log)
    );
    let last = last_boot(&lab, &m.uuid);
    assert_eq!(last["action"], "environment");
    assert_eq!(last["environment"], "install");
}

#[test]
#[ignore = "QEMU end to end in network namespaces (root); tests/run-all.sh runs it"]
fn uefi_machine_loads_ipxe_efi_over_tftp_and_registers() {
    // The firmware's PXE client got ipxe.efi (over TFTP), then iPXE got the script URL.
    discovers(
        "u",
        Firmware::Uefi,
        2,
        "UEFI PXE (OVMF, ipxe.efi over TFTP)",
        &[
            "arges_dhcp_replies_total{client=\"pxe\",firmware=\"uefi_x86_64\"}",
            "arges_dhcp_replies_total{client=\"ipxe\",firmware=\"uefi_x86_64\"}",
            "arges_tftp_transfers_total{outcome=\"complete\"}",
        ],
        &[
            "dhcp",
            "tftp",
            "dhcp",
            "boot_script",
            "fetch",
            "fetch",
            "registered",
        ],
    );
}

#[test]
#[ignore = "QEMU end to end in network namespaces (root); tests/run-all.sh runs it"]
fn uefi_http_boot_machine_loads_ipxe_efi_over_http_and_registers() {
    discovers(
        "h",
        Firmware::UefiHttp,
        3,
        "UEFI HTTP boot (OVMF, ipxe.efi over HTTP)",
        &[
            "arges_dhcp_replies_total{client=\"http\",firmware=\"uefi_x86_64\"}",
            "arges_http_requests_total{route=\"boot_file\",status=\"2xx\"}",
        ],
        &[
            "dhcp",
            "fetch",
            "dhcp",
            "boot_script",
            "fetch",
            "fetch",
            "registered",
        ],
    );
}

#[test]
#[ignore = "QEMU end to end in network namespaces (root); tests/run-all.sh runs it"]
fn registered_but_unaccepted_machine_boots_its_local_disk() {
    let mut lab = Lab::start("d", "");
    let m = Machine::new(&lab, Firmware::Bios, 4).with_boot_sector("ARGES-LOCAL-DISK-BOOTED");
    // Known to the inventory (registered as the agent would), not accepted: the default
    // policy sends it to its local disk.
    let body = serde_json::json!({
        "uuid": m.uuid,
        "mode": "discover",
        "hardware": {"nics": [{"name": "eth0", "mac": m.mac}]},
    });
    lab.register(&body.to_string());
    let i = lab.boot(&m);
    lab.wait_serial(&m, "ARGES-LOCAL-DISK-BOOTED");
    lab.kill(i);
    let last = last_boot(&lab, &m.uuid);
    assert_eq!(last["action"], "local-disk", "{last:#}");
    assert!(
        !lab.serial(&m).contains("arges-init:"),
        "the discovery environment must not have booted:\n{}",
        lab.logs(&m.serial_log)
    );
}
