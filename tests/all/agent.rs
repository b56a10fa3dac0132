//! The real agent binary registering against a running appliance.

use std::process::Command;

use crate::http::{UUID_A, register_machine};
use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, bin, curl, run};

fn servers(a: &Appliance) -> Vec<serde_json::Value> {
    let (_, body, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        &a.url("/api/v1/servers"),
    ]);
    serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap()
}

#[test]
fn registers_hardware_from_the_machine() {
    let a = Appliance::start("");
    let out = register_machine(&a, "a");
    assert!(out.status.success(), "{out:?}");
    let list = servers(&a);
    assert_eq!(list.len(), 1);
    let s = &list[0];
    assert_eq!(s["id"], UUID_A);
    assert_eq!(s["macs"], serde_json::json!(["b8:ca:3a:00:00:0a"]));
    assert_eq!(s["hardware"]["vendor"], "Dell Inc.");
    assert_eq!(s["hardware"]["cpu"]["count"], 2);
    assert_eq!(s["hardware"]["memory_bytes"], 65536000u64 * 1024);
    let disks: Vec<&str> = s["hardware"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(disks, vec!["nvme0n1", "sda"]);
    assert_eq!(s["hardware"]["disks"][1]["serial"], "sda-a");
    assert_eq!(s["hardware"]["disks"][1]["rotational"], true);
}

#[test]
fn reads_appliance_and_token_from_the_kernel_command_line() {
    let a = Appliance::start("");
    let cmdline = a.dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "console=ttyS0 arges.appliance={} arges.token={REG_TOKEN} arges.mode=discover\n",
            a.url("")
        ),
    )
    .unwrap();
    let out = run(Command::new(bin())
        .args(["agent", "--timeout", "10", "--cmdline"])
        .arg(&cmdline)
        .arg("--root")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/machines/a"
        )));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "power-off");
}

#[test]
fn wrong_token_is_refused_and_nothing_is_stored() {
    let a = Appliance::start("");
    let out = run(Command::new(bin())
        .args([
            "agent",
            "--appliance",
            &a.url(""),
            "--token",
            "not-the-token",
            "--timeout",
            "5",
            "--root",
        ])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/machines/a"
        )));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the registration (401)"), "{err}");
    assert!(servers(&a).is_empty());
}

#[test]
fn duplicate_uuids_become_two_flagged_servers() {
    let a = Appliance::start("");
    assert!(register_machine(&a, "a").status.success());
    assert!(register_machine(&a, "b").status.success());
    assert!(
        register_machine(&a, "a").status.success(),
        "re-registering updates, it does not add a third"
    );
    let list = servers(&a);
    let ids: Vec<&str> = list.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        vec![UUID_A.to_string(), format!("{UUID_A}-b8ca3a00000b")]
    );
    assert!(list.iter().all(|s| s["uuid_conflict"] == true));
    assert_eq!(list[1]["hardware"]["serial"], "SVC-b");
}

#[test]
fn unreachable_appliance_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let out = run(Command::new(bin())
        .args([
            "agent",
            "--appliance",
            &format!("http://{addr}"),
            "--token",
            REG_TOKEN,
            "--timeout",
            "2",
            "--root",
        ])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/machines/a"
        )));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not reach the appliance"),
        "{out:?}"
    );
}
