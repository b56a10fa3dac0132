//! HTTPS for operators and agents: the admin API on its own TLS listener (curl, with the
//! appliance's certificate as the only trusted one), the same API refused on the
//! machines' plain listener, and the agent registering over HTTPS only to the
//! certificate it pins.

use test_support::appliance::NO_RATE_LIMITS;
use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, curl, run};

/// The certificate's sha256, as the appliance logged it at start.
fn pin_of(a: &Appliance) -> String {
    let log = a.log();
    let at = log
        .find("sha256=")
        .unwrap_or_else(|| panic!("no certificate sha256 logged:\n{log}"));
    log[at + 7..at + 7 + 64].to_string()
}

#[test]
fn the_admin_api_is_served_over_tls_on_its_own_listener() {
    let top = format!("{NO_RATE_LIMITS}http.admin_listen = [\"127.0.0.1:0\"]\n");
    let a = Appliance::start_in(Appliance::prepare_with(&top, ""), &[]);
    let admin = a.admin.expect("the admin listener");
    let cert = a.data().join("tls/appliance.crt");
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let url = format!("https://127.0.0.1:{}/api/v1/servers", admin.port());
    let (status, body, _) = curl(&["--cacert", cert.to_str().unwrap(), "-H", &auth, &url]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // Without the appliance's certificate to trust, curl refuses the connection.
    let (status, _, _) = curl(&["-H", &auth, &url]);
    assert_eq!(status, 0, "an untrusted certificate is not accepted");
    // The machines' listener does not serve the admin API any more.
    let (status, body, _) = curl(&["-H", &auth, &a.url("/api/v1/servers")]);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("http.admin_listen"));
    // The admin listener serves nothing else.
    let boot = format!("https://127.0.0.1:{}/boot.ipxe", admin.port());
    assert_eq!(curl(&["--cacert", cert.to_str().unwrap(), &boot]).0, 404);
    assert_eq!(pin_of(&a).len(), 64, "the sha256 to pin is logged at start");

    // The CLI on the head node trusts the certificate in the data folder, or a --pin.
    let https = format!("https://127.0.0.1:{}", admin.port());
    let cli = |extra: &[&str]| {
        run(std::process::Command::new(test_support::bin())
            .args(["server", "--url", &https, "--token", ADMIN_TOKEN])
            .args(extra)
            .args(["show", "4c4c4544-0000-0000-0000-000000000000"]))
    };
    let data = a.data().to_str().unwrap().to_string();
    for how in [
        vec!["--data-dir", data.as_str()],
        vec!["--pin", &pin_of(&a)],
    ] {
        let out = cli(&how);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("error:") && String::from_utf8_lossy(&out.stderr).contains("404"),
            "the API answered over TLS ({how:?}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrong = cli(&["--pin", &"0".repeat(64)]);
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not the pinned one"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[test]
fn the_agent_registers_over_https_only_to_the_certificate_it_pins() {
    let top = format!("{NO_RATE_LIMITS}http.tls_listen = [\"127.0.0.1:0\"]\n");
    let a = Appliance::start_in(Appliance::prepare_with(&top, ""), &[]);
    let https = format!(
        "https://127.0.0.1:{}",
        a.https.expect("an HTTPS listener").port()
    );
    let pin = pin_of(&a);
    let agent = |pin: Option<&str>| {
        let mut cmd = std::process::Command::new(test_support::bin());
        cmd.args(["agent", "--appliance", &https, "--token", REG_TOKEN])
            .args(["--timeout", "3", "--root"])
            .arg(test_support::repo().join("tests/data/machines/a"));
        if let Some(p) = pin {
            cmd.args(["--pin", p]);
        }
        run(&mut cmd)
    };
    // Another certificate's sha256: the agent never sends its registration.
    let wrong = agent(Some(&"0".repeat(64)));
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not the pinned one"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    // No pin at all for an https:// URL: refused before connecting.
    let unpinned = agent(None);
    assert!(!unpinned.status.success());
    assert!(String::from_utf8_lossy(&unpinned.stderr).contains("arges.pin"));
    let servers = a.request("GET", "/api/v1/servers", Some(ADMIN_TOKEN), b"");
    assert_eq!(
        String::from_utf8_lossy(&servers.1),
        "[]",
        "nothing registered yet"
    );
    // The right one: registered.
    let ok = agent(Some(&pin));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let servers = a.request("GET", "/api/v1/servers", Some(ADMIN_TOKEN), b"");
    assert!(String::from_utf8_lossy(&servers.1).contains("4c4c4544"));
}
