//! The core's rules on the seam ([`super::testing`]): provisioning windows and their
//! secrets, registrations that may or may not change a server, a server's cluster life
//! and its claims. No process, no socket: each test is a few milliseconds.

use super::testing::{Machine, REGISTRATION_TOKEN};
use super::{BootRequest, ClaimRequest, Core, CoreError, RegistrationProof, ServerEdit};
use crate::inventory::{AlarmKind, InstalledBy};
use crate::registration::RegistrationMode;

const CONFIG: &str = "machine:\n  type: controlplane\n  ca: {key: SECRET-CA-KEY}\n";

fn claim(machine: &str) -> ClaimRequest {
    ClaimRequest {
        machine: format!("default/{machine}"),
        uid: format!("uid-{machine}"),
        cluster: Some("c1".into()),
        server_object: None,
    }
}

/// `m` provisioned with [`CONFIG`], armed, and booted once: its server and the token
/// its script carried.
async fn armed_and_booted(core: &Core, m: &Machine) -> (crate::inventory::Server, String) {
    let s = core.provisioned(m, CONFIG).await;
    core.arm(&s.id, "test").await.unwrap();
    let token = core.boot(m).await.token();
    (s, token)
}

// ---- windows and the configuration's token ----

#[tokio::test]
async fn outside_a_window_a_machine_boots_its_environment_without_a_token() {
    let core = Core::test();
    let m = Machine::test(1);
    core.provisioned(&m, CONFIG).await;
    let booted = core.boot(&m).await;
    assert_eq!(booted.action, "environment");
    assert!(
        booted.body.contains("/env/talos/vmlinuz"),
        "{}",
        booted.body
    );
    assert_eq!(booted.token(), "", "no secret outside a window");
    let e = core.config_for(&m.uuid, None, m.source).await.unwrap_err();
    assert!(matches!(e, CoreError::Forbidden(_)), "{e}");
}

#[tokio::test]
async fn an_armed_window_gives_its_first_claimant_the_token_which_one_fetch_spends() {
    let core = Core::test();
    let m = Machine::test(1);
    let (s, token) = armed_and_booted(&core, &m).await;
    assert_eq!(token.len(), 64);
    let got = core.config_for(&m.uuid, Some(&token), m.source).await;
    assert_eq!(got.unwrap(), CONFIG.as_bytes());
    // The claimant asking again in its window gets no second secret.
    assert_eq!(core.boot(&m).await.token(), "");
    // Tokens never show in what the admin API answers.
    let json = serde_json::to_string(&core.server(&s.id).await.unwrap()).unwrap();
    assert!(!json.contains(&token));
    assert!(!json.contains("SECRET-CA-KEY"), "configurations are sealed");
}

#[tokio::test]
async fn an_impostor_before_the_real_machine_trips_the_window_and_nobody_gets_the_config() {
    let core = Core::test();
    let real = Machine::test(1);
    let thief = real.from([10, 0, 0, 66]);
    let s = core.provisioned(&real, CONFIG).await;
    core.arm(&s.id, "test").await.unwrap();
    let stolen = core.boot(&thief).await.token();
    assert_eq!(stolen.len(), 64, "the first requester is the claimant");
    let booted = core.boot(&real).await;
    assert_eq!(booted.action, "deny");
    assert!(booted.body.contains("stands"), "{}", booted.body);
    let e = core
        .config_for(&real.uuid, Some(&stolen), thief.source)
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Forbidden(_)), "revoked: {e}");
    let alarm = core.server(&s.id).await.unwrap().alarm.expect("alarm");
    assert_eq!(alarm.kind, AlarmKind::SecondRequester);
    assert!(
        alarm.message.contains("10.0.0.66") && alarm.message.contains("10.0.0.1"),
        "both sources: {}",
        alarm.message
    );
    assert!(core.metrics_text().contains("arges_identity_alarms_total"));
    // Arming again clears the alarm and the real machine provisions.
    core.arm(&s.id, "operator").await.unwrap();
    let token = core.boot(&real).await.token();
    let got = core.config_for(&real.uuid, Some(&token), real.source).await;
    assert_eq!(got.unwrap(), CONFIG.as_bytes());
}

#[tokio::test]
async fn an_impostor_after_the_real_machine_trips_the_window_too() {
    let core = Core::test();
    let real = Machine::test(1);
    let (_, token) = armed_and_booted(&core, &real).await;
    assert_eq!(core.boot(&real.from([10, 0, 0, 66])).await.action, "deny");
    assert!(
        core.config_for(&real.uuid, Some(&token), real.source)
            .await
            .is_err(),
        "the tripped window's token is revoked"
    );
}

#[tokio::test]
async fn a_spent_token_is_retried_honestly_from_its_address_and_a_replay_raises_the_alarm() {
    let core = Core::test_with("[windows]\nretries = 1\n");
    let m = Machine::test(1);
    let (s, token) = armed_and_booted(&core, &m).await;
    assert!(
        core.config_for(&m.uuid, Some(&token), m.source)
            .await
            .is_ok()
    );
    assert!(
        core.config_for(&m.uuid, Some(&token), m.source)
            .await
            .is_ok(),
        "one honest retry from the same address"
    );
    assert!(
        core.config_for(&m.uuid, Some(&token), m.source)
            .await
            .is_err(),
        "retries are bounded"
    );
    let replay = core
        .config_for(&m.uuid, Some(&token), [10, 0, 0, 99].into())
        .await;
    assert!(replay.is_err());
    let alarm = core.server(&s.id).await.unwrap().alarm.expect("alarm");
    assert_eq!(alarm.kind, AlarmKind::SecretReplayed);
}

#[tokio::test]
async fn a_fetch_needs_the_token_even_from_the_boot_address() {
    let core = Core::test();
    let m = Machine::test(1);
    let (_, token) = armed_and_booted(&core, &m).await;
    assert!(core.config_for(&m.uuid, None, m.source).await.is_err());
    assert!(
        core.config_for(&m.uuid, Some("0".repeat(64).as_str()), m.source)
            .await
            .is_err()
    );
    assert!(
        core.config_for(&Machine::test(2).uuid, Some(&token), m.source)
            .await
            .is_err(),
        "another machine's UUID with this token"
    );
}

#[tokio::test]
async fn a_window_closes_after_its_length() {
    let core = Core::test_with("[windows]\nsecs = 30\nretry_secs = 10\n");
    let m = Machine::test(1);
    let s = core.provisioned(&m, CONFIG).await;
    let mut armed = core.arm(&s.id, "test").await.unwrap();
    let w = armed.window.as_mut().unwrap();
    assert_eq!(w.expires_at - w.opened_at, 30);
    assert!(w.is_open(w.opened_at + 29));
    assert!(!w.is_open(w.opened_at + 30));
}

// ---- registrations ----

#[tokio::test]
async fn registrations_without_their_boot_secret_cannot_change_a_server() {
    let core = Core::test();
    let m = Machine::test(1);
    let s = core.provisioned(&m, CONFIG).await;
    let shared = |req| core.register(req, RegistrationProof::Shared, m.source);
    // Unchanged: answered, nothing written.
    assert!(
        shared(m.registration(RegistrationMode::Discover))
            .await
            .is_ok()
    );
    // Other hardware, an extra MAC, no MAC: refused and recorded on the server.
    let mut other = m.registration(RegistrationMode::Discover);
    other.hardware.vendor = "Evil Corp".into();
    let mut extra = m.registration(RegistrationMode::Discover);
    extra.hardware.nics.push(crate::registration::Nic {
        name: "eth1".into(),
        mac: "52:54:00:aa:bb:cc".into(),
        ..Default::default()
    });
    for req in [other, extra] {
        let e = shared(req).await.unwrap_err();
        assert!(matches!(e, CoreError::Forbidden(_)), "{e}");
    }
    let after = core.server(&s.id).await.unwrap();
    assert_eq!(after.hardware, s.hardware, "nothing changed");
    assert_eq!(after.macs, s.macs);
    assert!(after.refusals.len() >= 2, "{:?}", after.refusals);
    // A wipe report without the wipe boot's secret never marks a server clean.
    core.claim_server(&s.id, claim("m1"), b"x".to_vec())
        .await
        .unwrap();
    core.release_server(&s.id, Some("uid-m1"), true)
        .await
        .unwrap();
    assert!(
        shared(m.registration(RegistrationMode::Wipe))
            .await
            .is_err()
    );
    assert!(core.server(&s.id).await.unwrap().provisioning.dirty);
}

#[tokio::test]
async fn another_servers_mac_is_never_moved() {
    let core = Core::test();
    let a = Machine::test(1);
    let b = Machine::test(2);
    core.register_shared(&a).await;
    let mut stealing = b.registration(RegistrationMode::Discover);
    stealing.hardware.nics[0].mac = a.mac.clone();
    let e = core
        .register(stealing, RegistrationProof::Shared, b.source)
        .await
        .unwrap_err();
    assert!(
        matches!(e, CoreError::Forbidden(_) | CoreError::Conflict(_)),
        "{e}"
    );
    assert!(core.server(&b.uuid).await.is_err(), "b was not created");
}

#[tokio::test]
async fn a_discover_boots_secret_registers_its_machine_once() {
    let core = Core::test();
    let m = Machine::test(1);
    let booted = core.boot(&m).await;
    assert_eq!(booted.action, "discover");
    let secret = booted.registration_secret();
    assert_eq!(secret.len(), 64);
    assert_ne!(secret, REGISTRATION_TOKEN, "never the shared token");
    let proof = RegistrationProof::Secret(&secret);
    let reg = || m.registration(RegistrationMode::Discover);
    core.register(reg(), proof, m.source).await.unwrap();
    assert!(core.server(&m.uuid).await.is_ok());
    // From another address it is no credential for this machine.
    let other = Machine::test(2);
    let e = core
        .register(
            other.registration(RegistrationMode::Discover),
            proof,
            m.source,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, CoreError::Forbidden(_) | CoreError::Unauthorized(_)),
        "{e}"
    );
    let e = core
        .register(reg(), RegistrationProof::Secret("nope"), m.source)
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Unauthorized(_)), "{e}");
}

// ---- a server's cluster life ----

#[tokio::test]
async fn a_claimed_server_installs_then_boots_its_disk_and_its_wipe_frees_it() {
    let core = Core::test();
    let m = Machine::test(1);
    let id = core.register_shared(&m).await.server_id;
    for edit in [
        ServerEdit::Accepted(true),
        ServerEdit::Environment(Some("talos".into())),
    ] {
        core.edit_server(&id, edit).await.unwrap();
    }
    core.claim_server(&id, claim("m1"), CONFIG.as_bytes().to_vec())
        .await
        .unwrap();
    // Without a BMC an operator arms it; it boots its install with the token.
    core.arm(&id, "test").await.unwrap();
    core.mark_powered(&id, "uid-m1").await.unwrap();
    let booted = core.boot(&m).await;
    assert_eq!(booted.action, "environment", "{}", booted.body);
    let token = booted.token();
    assert_eq!(
        core.config_for(&m.uuid, Some(&token), m.source)
            .await
            .unwrap(),
        CONFIG.as_bytes()
    );
    let s = core
        .report_installed(&m.uuid, Some(&token), m.source)
        .await
        .unwrap();
    let c = s.provisioning.claim.unwrap();
    assert_eq!(c.installed_by, Some(InstalledBy::Reported));
    assert_eq!(core.boot(&m).await.action, "local-disk");

    // Released with a wipe: the wipe environment, whose own secret frees the server.
    core.release_server(&id, Some("uid-m1"), true)
        .await
        .unwrap();
    let s = core.server(&id).await.unwrap();
    assert!(s.provisioning.dirty && s.provisioning.claim.is_none());
    core.open_window(&id, "power cycle").await.unwrap();
    let wipe = core.boot(&m).await;
    assert_eq!(wipe.action, "wipe", "{}", wipe.body);
    let secret = wipe.registration_secret();
    core.register(
        m.registration(RegistrationMode::Wipe),
        RegistrationProof::Secret(&secret),
        m.source,
    )
    .await
    .unwrap();
    assert!(!core.server(&id).await.unwrap().provisioning.dirty);
}

#[tokio::test]
async fn a_done_report_counts_only_with_the_token_from_the_fetching_address() {
    let core = Core::test();
    let m = Machine::test(1);
    let s = core.provisioned(&m, CONFIG).await;
    core.claim_server(&s.id, claim("m1"), CONFIG.as_bytes().to_vec())
        .await
        .unwrap();
    core.arm(&s.id, "test").await.unwrap();
    let token = core.boot(&m).await.token();
    assert!(
        core.report_installed(&m.uuid, None, m.source)
            .await
            .is_err()
    );
    core.config_for(&m.uuid, Some(&token), m.source)
        .await
        .unwrap();
    let forged = core
        .report_installed(&m.uuid, Some(&token), [10, 0, 0, 9].into())
        .await;
    assert!(forged.is_err());
    let s = core.server(&s.id).await.unwrap();
    assert_eq!(s.provisioning.claim.unwrap().installed_at, None);
    assert_eq!(s.alarm.map(|a| a.kind), Some(AlarmKind::SecretReplayed));
}

#[tokio::test]
async fn a_server_has_one_holder_until_released_and_wiped() {
    let core = Core::test();
    let m = Machine::test(1);
    let id = core.register_shared(&m).await.server_id;
    core.claim_server(&id, claim("m1"), b"a".to_vec())
        .await
        .unwrap();
    // The same machine again: its configuration refreshed.
    core.claim_server(&id, claim("m1"), b"b".to_vec())
        .await
        .unwrap();
    let e = core
        .claim_server(&id, claim("m2"), b"c".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Conflict(_)), "{e}");
    // Released by someone else's uid: nothing happens to the holder.
    let _ = core.release_server(&id, Some("uid-m2"), true).await;
    assert!(core.server(&id).await.unwrap().provisioning.claim.is_some());
    core.release_server(&id, Some("uid-m1"), true)
        .await
        .unwrap();
    let e = core
        .claim_server(&id, claim("m2"), b"c".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(e, CoreError::Conflict(_)),
        "not before its wipe: {e}"
    );
    // The configuration of a claimed server is its machine's: not editable by hand.
    let other = Machine::test(2);
    let id2 = core.register_shared(&other).await.server_id;
    core.claim_server(&id2, claim("m3"), b"d".to_vec())
        .await
        .unwrap();
    let e = core
        .edit_server(&id2, ServerEdit::Config(Some(b"mine".to_vec())))
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::Managed(_)), "{e}");
}

#[tokio::test]
async fn unknown_and_unaccepted_machines_boot_as_the_policy_says() {
    let core = Core::test();
    let m = Machine::test(1);
    assert_eq!(core.boot(&m).await.action, "discover");
    core.register_shared(&m).await;
    let booted = core.boot(&m).await;
    assert_ne!(booted.action, "environment", "not accepted: no environment");
    assert_eq!(booted.token(), "");
    // A request naming nothing valid still gets an answer, never an error.
    let odd = BootRequest {
        uuid: Some("not-a-uuid".into()),
        mac: Some("zz".into()),
        arch: Some("x86_64; rm -rf".into()),
        ..m.boot_request()
    };
    assert!(core.decide_boot(odd).await.is_ok());
}

#[tokio::test]
async fn discovery_tells_the_agent_where_to_register_and_what_to_pin() {
    let core = Core::test();
    let m = Machine::test(1);
    let plain = core.boot(&m).await;
    assert_eq!(plain.param("arges.appliance"), "http://10.0.0.254:8080");
    assert_eq!(plain.param("arges.pin"), "");
    let pin = "ab".repeat(32);
    core.set_agent_tls(8443, pin.clone());
    let tls = core.boot(&m).await;
    assert_eq!(tls.param("arges.appliance"), "https://10.0.0.254:8443");
    assert_eq!(tls.param("arges.pin"), pin);
}
