//! `arges check-config` on every sample config we ship, and on broken ones.

use std::process::Command;

use test_support::{bin, run};

#[test]
fn every_sample_config_is_valid() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let mut checked = 0;
    let files = std::fs::read_dir(deploy)
        .unwrap()
        .chain(std::fs::read_dir(format!("{deploy}/mgmt")).unwrap());
    for entry in files {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = run(Command::new(bin()).arg("check-config").arg(&path));
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "sample configs not found in {deploy}");
}

/// `arges <command>` prints what `file` (under deploy/) holds, or the test says how to
/// regenerate it.
fn generated_matches(command: &str, file: &str) {
    let out = run(Command::new(bin()).arg(command));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == checked_in,
        "deploy/{file} is stale: run `cargo run -- {command} > deploy/{file}`"
    );
}

#[test]
fn checked_in_crds_match_the_rust_types() {
    generated_matches("crds", "crds/arges.yaml");
}

#[test]
fn checked_in_provider_components_match_their_sources() {
    generated_matches("components", "clusterctl/infrastructure-components.yaml");
}

/// Every rule's error is tested where the rule lives (the config module's unit tests);
/// here, that `check-config` says one and fails, and says when the file is missing.
#[test]
fn check_config_names_the_key_and_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("appliance.toml");
    std::fs::write(
        &path,
        "[http]\nlisten = [\"127.0.0.1:8080\"]\n\n[tftp]\nmax_blksize = 4\n",
    )
    .unwrap();
    let out = run(Command::new(bin()).arg("check-config").arg(&path));
    assert!(!out.status.success(), "a broken config was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tftp.max_blksize (line 5)") && err.contains("expected 8 to 65464"),
        "{err}"
    );
    let out = run(Command::new(bin())
        .arg("check-config")
        .arg(dir.path().join("missing.toml")));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{out:?}"
    );
}

#[test]
fn template_overrides_are_used_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("local-disk.ipxe"),
        "#!ipxe\necho custom local boot for {{ machine.mac }}\nsanboot --drive 0x81\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("appliance.toml"),
        test_support::appliance::config("[templates]\nlocal-disk = \"local-disk.ipxe\"\n"),
    )
    .unwrap();
    let a = test_support::Appliance::start_in(dir, &[]);
    assert!(crate::http::register_machine(&a, "a").status.success());
    let (_, script) = crate::http::boot(&a, "127.0.0.1");
    assert_eq!(
        script,
        "#!ipxe\necho custom local boot for b8:ca:3a:00:00:0a\nsanboot --drive 0x81\n"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("deny.ipxe"),
        "#!ipxe\n\n  echo {{ reason | loud }}\n",
    )
    .unwrap();
    let path = dir.path().join("appliance.toml");
    std::fs::write(&path, "[templates]\ndeny = \"deny.ipxe\"\n").unwrap();
    let out = run(Command::new(bin()).arg("check-config").arg(&path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("deny.ipxe") && err.contains("line 3, column 8"),
        "{err}"
    );
}

#[test]
fn the_appliance_refuses_to_start_with_one_token_for_both_roles() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("both.token");
    std::fs::write(&token, "the-same-token-for-both-0001\n").unwrap();
    let config = dir.path().join("appliance.toml");
    std::fs::write(
        &config,
        format!(
            "[tokens]\nregistration_file = \"{0}\"\nadmin_file = \"{0}\"\n",
            token.display()
        ),
    )
    .unwrap();
    let out = run(Command::new(bin())
        .args([
            "run",
            "--http",
            "127.0.0.1:0",
            "--tftp",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin token and the registration token are the same"),
        "{err}"
    );
}
