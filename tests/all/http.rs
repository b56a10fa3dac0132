//! HTTP edge with curl: boot scripts through a machine's life, assets with ranges and
//! validators, the admin API and its refusals, `/configdata` only for its machine.

use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, curl, param, random_file};

pub const UUID_A: &str = "4c4c4544-0042-3510-8051-b4c04f595031";
pub const MAC_A: &str = "b8:ca:3a:00:00:0a";

/// `/boot.ipxe` of machine A from loopback address `from`.
pub fn boot(a: &Appliance, from: &str) -> (u16, String) {
    a.boot_script(UUID_A, MAC_A, from)
}

/// The agent registers recorded machine `machine` with the shared registration token.
pub fn register_machine(a: &Appliance, machine: &str) -> std::process::Output {
    a.agent(machine, REG_TOKEN, None)
}

fn admin(a: &Appliance, method: &str, path: &str, body: &str) -> u16 {
    curl(&[
        "-X",
        method,
        "-H",
        &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        "--data-binary",
        body,
        &a.url(path),
    ])
    .0
}

#[test]
fn a_machine_through_its_life() {
    let a = Appliance::start("");
    // Unknown: discovery, with a registration secret of its own on the command line
    // (never the shared registration token).
    let (s, script) = boot(&a, "127.0.0.1");
    assert_eq!(s, 200);
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(
        script.contains(&format!(
            "kernel {}/env/discovery/vmlinuz initrd=initramfs.img console=ttyS0",
            a.url("")
        )),
        "{script}"
    );
    let secret = param(&script, "arges.token");
    assert_eq!(secret.len(), 64, "{script}");
    assert!(!script.contains(REG_TOKEN), "{script}");
    assert!(script.contains("arges.mode=discover"), "{script}");
    assert!(
        script.contains(&format!(
            "initrd --name initramfs.img {}/env/discovery/initramfs.img",
            a.url("")
        )),
        "{script}"
    );
    // The assets it names are there.
    let (s, body, _) = curl(&[&a.url("/env/discovery/initramfs.img")]);
    assert_eq!((s, body.as_slice()), (200, b"discovery initrd".as_slice()));

    // The agent registers with that secret, from the address that booted.
    let reg = a.agent("a", &secret, None);
    assert!(reg.status.success(), "{reg:?}\n{}", a.log());
    assert_eq!(String::from_utf8_lossy(&reg.stdout).trim(), "power-off");

    // Registered, not accepted: local disk by default.
    let (_, script) = boot(&a, "127.0.0.1");
    assert!(
        script.contains("\nexit\n") && !script.contains("kernel"),
        "{script}"
    );

    // Accepted with an environment and a configuration.
    assert_eq!(
        admin(&a, "POST", &format!("/api/v1/servers/{UUID_A}/accept"), ""),
        200
    );
    assert_eq!(
        admin(
            &a,
            "PUT",
            &format!("/api/v1/servers/{UUID_A}/environment"),
            r#"{"environment":"talos"}"#
        ),
        200
    );
    assert_eq!(
        admin(
            &a,
            "PUT",
            &format!("/api/v1/servers/{UUID_A}/config"),
            "machine:\n  type: controlplane\n"
        ),
        200
    );
    // Outside a provisioning window it boots its environment, but its script carries no
    // token, and nothing opens its configuration.
    let (_, script) = boot(&a, "127.0.0.1");
    assert!(
        script.contains("/env/talos/vmlinuz initrd=initramfs.xz talos.platform=metal"),
        "{script}"
    );
    assert_eq!(param(&script, "token"), "", "{script}");
    let cfg = |from: &str, q: &str| {
        curl(&[
            "--interface",
            from,
            &a.url(&format!("/configdata?uuid={UUID_A}{q}")),
        ])
    };
    assert_eq!(
        cfg("127.0.0.1", "").0,
        403,
        "no token, from the boot address"
    );

    // Armed (no BMC here): the next boot is the window's claimant and gets a token.
    assert_eq!(
        admin(&a, "POST", &format!("/api/v1/servers/{UUID_A}/arm"), ""),
        200
    );
    let (_, script) = boot(&a, "127.0.0.1");
    let token = param(&script, "token");
    assert_eq!(token.len(), 64, "{script}");
    assert!(
        script.contains(&format!(
            "talos.config={}/configdata?uuid={UUID_A}&token={token}",
            a.url("")
        )),
        "{script}"
    );
    // The token is needed, and is the proof: a wrong one or none is refused.
    assert_eq!(cfg("127.0.0.1", "").0, 403, "no token");
    assert_eq!(cfg("127.0.0.1", "&token=0000").0, 403, "a wrong token");
    // Its first use (an installer may have a new lease) spends it; an honest retry from
    // the same address is served, a bounded number of times.
    let (s, body, _) = cfg("127.0.0.3", &format!("&token={token}"));
    assert_eq!(
        (s, body.as_slice()),
        (200, b"machine:\n  type: controlplane\n".as_slice())
    );
    assert_eq!(
        cfg("127.0.0.3", &format!("&token={token}")).0,
        200,
        "retry 1"
    );
    assert_eq!(
        cfg("127.0.0.3", &format!("&token={token}")).0,
        200,
        "retry 2"
    );
    assert_eq!(
        cfg("127.0.0.3", &format!("&token={token}")).0,
        403,
        "retries are bounded"
    );
    // The window closed with the first use: the next boot carries no token.
    let (_, script) = boot(&a, "127.0.0.1");
    assert_eq!(param(&script, "token"), "", "{script}");

    // Cordoned: local disk again.
    assert_eq!(
        admin(&a, "POST", &format!("/api/v1/servers/{UUID_A}/cordon"), ""),
        200
    );
    let (_, script) = boot(&a, "127.0.0.1");
    assert!(script.contains("\nexit\n"), "{script}");

    let (_, server, _) = curl(&[
        "-H",
        &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        &a.url(&format!("/api/v1/servers/{UUID_A}")),
    ]);
    let text = String::from_utf8_lossy(&server).into_owned();
    assert!(!text.contains(&token), "no token in the admin API: {text}");
    let server: serde_json::Value = serde_json::from_slice(&server).unwrap();
    assert_eq!(server["hardware"]["product"], "PowerEdge R640");
    assert_eq!(server["environment"], "talos");
    assert_eq!(server["window"]["opened_by"], "the admin API");
    assert_eq!(server["window"]["claimant"]["source"], "127.0.0.1");
    assert_eq!(server["window"]["closed"]["why"], "used");
    assert_eq!(server["window"]["uses"][0]["source"], "127.0.0.3");
    let history: Vec<&str> = server["boot_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        vec![
            "local-disk",
            "environment",
            "environment",
            "environment",
            "local-disk"
        ]
    );

    let metrics = String::from_utf8_lossy(&curl(&[&a.url("/metrics")]).1).into_owned();
    for want in [
        "arges_boot_decisions_total{action=\"discover\"} 1",
        "arges_registrations_total{result=\"created\"} 1",
        "arges_configdata_requests_total{result=\"no_token\"} 2",
        "arges_configdata_requests_total{result=\"forbidden\"} 1",
        "arges_configdata_requests_total{result=\"served\"} 1",
        "arges_configdata_requests_total{result=\"retried\"} 2",
        "arges_configdata_requests_total{result=\"spent\"} 1",
        "arges_provisioning_windows_total{event=\"armed\"} 1",
        "arges_provisioning_windows_total{event=\"claimed\"} 1",
        "arges_secrets_issued_total{kind=\"boot-discover\"} 1",
        "arges_secrets_issued_total{kind=\"config-token\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
}

#[test]
fn local_disk_by_http_404_and_sanboot_per_arch() {
    let a = Appliance::start(
        "[policy]\nlocal_disk_method = \"http-404\"\nunaccepted = \"local-disk\"\n[policy.local_disk_method_by_arch]\ni386 = \"sanboot\"\n",
    );
    assert!(register_machine(&a, "a").status.success());
    assert_eq!(boot(&a, "127.0.0.1").0, 404);
    let (s, b, _) = curl(&[&a.url(&format!("/boot.ipxe?uuid={UUID_A}&mac={MAC_A}&arch=i386"))]);
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("sanboot --no-describe --drive 0x80"));
}

#[test]
fn assets_ranges_validators_and_confinement() {
    let a = Appliance::start("");
    let assets = a.data().join("assets");
    // Large enough to stream from disk rather than memory.
    let big = random_file(&assets.join("images/rootfs.img"), 256 << 20, 21);
    let (s, body, head) = curl(&[&a.url("/assets/images/rootfs.img")]);
    assert_eq!(s, 200);
    assert!(
        head.contains(&format!("content-length: {}", big.len())),
        "{head}"
    );
    assert!(
        body == big,
        "the 256 MiB file differs ({} bytes received)",
        body.len()
    );
    let (s, body, head) = curl(&[
        "-r",
        "100000000-100000099",
        &a.url("/assets/images/rootfs.img"),
    ]);
    assert_eq!(s, 206);
    assert_eq!(body, &big[100_000_000..100_000_100]);
    assert!(
        head.contains(&format!(
            "content-range: bytes 100000000-100000099/{}",
            big.len()
        )),
        "{head}"
    );
    let (s, _, head) = curl(&["-I", &a.url("/assets/images/rootfs.img")]);
    assert!(
        s == 200 && head.contains(&format!("content-length: {}", big.len())),
        "{head}"
    );
    assert_eq!(
        a.request("HEAD", "/assets/images/rootfs.img", None, b""),
        (200, vec![]),
        "HEAD sends no body"
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    let (s, body, _) = curl(&[
        "-H",
        &format!("If-None-Match: {etag}"),
        &a.url("/assets/images/rootfs.img"),
    ]);
    assert_eq!((s, body.len()), (304, 0));
    let (s, body, _) = curl(&[
        "-r",
        "0-9",
        "-H",
        "If-Range: \"stale\"",
        &a.url("/assets/images/rootfs.img"),
    ]);
    assert_eq!(
        (s, body.len()),
        (200, big.len()),
        "a stale If-Range gets the whole file"
    );
    let (s, _, head) = curl(&["-r", "999999999-", &a.url("/assets/images/rootfs.img")]);
    assert_eq!(s, 416);
    assert!(head.contains(&format!("content-range: bytes */{}", big.len())));
    // Small file from memory, suffix range.
    let small = random_file(&assets.join("ipxe.efi"), 1000, 22);
    let (s, body, _) = curl(&["-r", "-10", &a.url("/assets/ipxe.efi")]);
    assert_eq!((s, body.as_slice()), (206, &small[990..]));

    std::fs::write(a.dir.path().join("secret"), "no").unwrap();
    for path in [
        "/assets/../appliance.toml",
        "/assets/%2e%2e/%2e%2e/appliance.toml",
        "/assets/..%2F..%2Fappliance.toml",
        "/assets/images/../../../secret",
    ] {
        let (s, body, _) = curl(&["--path-as-is", &a.url(path)]);
        assert!(s == 403 || s == 404, "{path}: {s}");
        assert!(
            !String::from_utf8_lossy(&body).contains("token"),
            "{path} leaked the config"
        );
    }
    // Only files the config names are served under /env/.
    assert_eq!(curl(&[&a.url("/env/talos/initramfs.img")]).0, 404);
    assert_eq!(curl(&[&a.url("/env/nope/vmlinuz")]).0, 404);
}

#[test]
fn admin_api_refusals() {
    let a = Appliance::start("");
    let url = a.url("/api/v1/servers");
    assert_eq!(curl(&[&url]).0, 401);
    assert_eq!(curl(&["-H", "Authorization: Bearer wrong", &url]).0, 401);
    assert_eq!(
        curl(&["-H", &format!("Authorization: Bearer {REG_TOKEN}"), &url]).0,
        401,
        "the registration token is not an admin token"
    );
    // DNS rebinding: a page whose name now points at us sends its own name as Host.
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let (status, body, _) = curl(&["-H", &auth, "-H", "Host: evil.example.com", &url]);
    assert_eq!(status, 421, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("http.names"));
    assert_eq!(
        curl(&["-H", &auth, "-H", "Host: localhost:8080", &url]).0,
        200
    );
    assert_eq!(curl(&["-H", &auth, &url]).0, 200, "an address as Host");
    let reg = a.url("/api/v1/register");
    assert_eq!(
        curl(&[
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
            "--data-binary",
            "{}",
            &reg
        ])
        .0,
        401
    );
    let as_agent = |body: &str| {
        curl(&[
            "-H",
            &format!("Authorization: Bearer {REG_TOKEN}"),
            "--data-binary",
            body,
            &reg,
        ])
    };
    let (s, body, _) = as_agent("{not json");
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&body).contains("malformed registration"));
    let (s, body, _) = as_agent(r#"{"uuid":"../../etc"}"#);
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&body));
    let huge = a.dir.path().join("huge");
    std::fs::write(&huge, vec![b' '; 2 << 20]).unwrap();
    assert_eq!(
        curl(&[
            "-H",
            &format!("Authorization: Bearer {REG_TOKEN}"),
            "--data-binary",
            &format!("@{}", huge.display()),
            &reg
        ])
        .0,
        413
    );
    assert_eq!(admin(&a, "GET", "/api/v1/servers/nope", ""), 404);
    assert!(register_machine(&a, "a").status.success());
    assert_eq!(
        admin(
            &a,
            "PUT",
            &format!("/api/v1/servers/{UUID_A}/environment"),
            r#"{"environment":"nope"}"#
        ),
        400
    );
    assert_eq!(
        admin(
            &a,
            "PUT",
            &format!("/api/v1/servers/{UUID_A}/labels"),
            r#"{"rack":"r1","role":"cp"}"#
        ),
        200
    );
    assert_eq!(
        admin(
            &a,
            "PUT",
            &format!("/api/v1/servers/{UUID_A}/labels"),
            r#"["x"]"#
        ),
        400
    );
    assert_eq!(
        admin(&a, "DELETE", &format!("/api/v1/servers/{UUID_A}"), ""),
        200
    );
    assert_eq!(
        admin(&a, "GET", &format!("/api/v1/servers/{UUID_A}"), ""),
        404
    );
    assert_eq!(curl(&[&a.url("/healthz")]).0, 200);
}
