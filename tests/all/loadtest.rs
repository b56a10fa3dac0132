//! `arges loadtest`: a small storm registers every machine; non-loopback targets are refused.

use std::process::Command;

use test_support::{ADMIN_TOKEN, Appliance, bin, random_file, run};

#[test]
fn a_small_boot_storm_registers_every_machine() {
    let a = Appliance::start("");
    random_file(&a.tftp_root().join("ipxe.efi"), 100_000, 50);
    let out = run(a.loadtest().args([
        "--machines",
        "40",
        "--concurrency",
        "10",
        "--max-seconds",
        "120",
        "--json",
    ]));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["registered"].as_u64(), report["failed"].as_u64()),
        (Some(40), Some(0)),
        "{report}"
    );
    // Each machine moved the iPXE binary, the discovery kernel and initrd.
    let per_machine = 100_000 + "discovery kernel".len() + "discovery initrd".len();
    assert_eq!(
        report["bytes"].as_u64(),
        Some(40 * per_machine as u64),
        "{report}"
    );
    let (_, list) = a.request("GET", "/api/v1/servers", Some(ADMIN_TOKEN), b"");
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&list)
            .unwrap()
            .len(),
        40
    );
}

#[test]
fn refuses_targets_off_this_machine() {
    let out = run(Command::new(bin()).args([
        "loadtest",
        "--http",
        "192.0.2.1:80",
        "--tftp",
        "127.0.0.1:69",
        "--token",
        "x",
        "--machines",
        "1",
    ]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only targets loopback"),
        "{out:?}"
    );
}
