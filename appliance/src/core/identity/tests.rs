//! The window rules and the boot-bound secrets, as pure functions over a server.

use super::*;

const U: &str = "4c4c4544-0042-3510-8051-b4c04f595031";
const MAC: &str = "b8:ca:3a:00:00:0a";

fn server() -> Server {
    serde_json::from_value(serde_json::json!({
        "id": U, "uuid": U, "macs": [MAC], "hardware": {},
        "registered_at": 0, "updated_at": 0,
    }))
    .unwrap()
}

fn asker(source: &str, mac: &str, at: u64) -> Requester {
    Requester {
        source: source.parse().unwrap(),
        mac: Some(mac.into()),
        uuid: Some(U.into()),
        at,
    }
}

fn rules() -> WindowsConfig {
    WindowsConfig::default()
}

fn grant(s: &Server, kind: SecretKind, source: &str) -> Grant {
    Grant {
        window: s.window.as_ref().unwrap().id.clone(),
        kind,
        sha256: "x".into(),
        source: source.parse().unwrap(),
    }
}

#[test]
fn outside_a_window_nobody_is_a_claimant() {
    let mut s = server();
    assert_eq!(
        admit(&mut s, &asker("10.0.0.7", MAC, 10), &[], 10),
        Admission::Outside
    );
    open_on(&mut s, "power on", &rules(), 10);
    assert_eq!(
        admit(&mut s, &asker("10.0.0.7", MAC, 2000), &[], 2000),
        Admission::Outside,
        "expired"
    );
}

#[test]
fn the_first_matching_requester_claims_and_a_second_trips() {
    let mut s = server();
    open_on(&mut s, "power cycle", &rules(), 10);
    let real = asker("10.0.0.7", MAC, 11);
    assert_eq!(admit(&mut s, &real, &[], 11), Admission::Claimant);
    assert_eq!(
        admit(&mut s, &real, &[], 12),
        Admission::Claimant,
        "asking again"
    );
    let thief = asker("10.0.0.66", MAC, 13);
    let Admission::Tripped(alarm) = admit(&mut s, &thief, &[], 13) else {
        panic!("a second requester trips the window")
    };
    assert_eq!(alarm.first.as_ref(), Some(&real));
    assert_eq!(alarm.second, thief);
    assert_eq!(s.window.as_ref().unwrap().state(13), "tripped");
    assert_eq!(admit(&mut s, &real, &[], 14), Admission::Alarmed);
    // Armed again: open, and the real machine claims.
    s.alarm = None;
    open_on(&mut s, "armed", &rules(), 20);
    assert_eq!(admit(&mut s, &real, &[], 21), Admission::Claimant);
}

#[test]
fn a_requester_that_is_not_the_server_trips_it_first() {
    let mut s = server();
    open_on(&mut s, "power on", &rules(), 10);
    let other_mac = asker("10.0.0.7", "b8:ca:3a:00:00:0b", 11);
    assert!(
        matches!(admit(&mut s, &other_mac, &[], 11), Admission::Tripped(a) if a.first.is_none())
    );
    // The MAC proxyDHCP answered in the window must be the one asking.
    let mut s = server();
    s.macs.push("b8:ca:3a:00:00:0b".into());
    open_on(&mut s, "power on", &rules(), 10);
    let seen = vec![MAC.to_string()];
    assert!(matches!(
        admit(
            &mut s,
            &asker("10.0.0.7", "b8:ca:3a:00:00:0b", 11),
            &seen,
            11
        ),
        Admission::Tripped(_)
    ));
}

#[test]
fn a_secret_is_spent_once_retried_honestly_and_replays_trip() {
    let r = rules();
    let mut s = server();
    open_on(&mut s, "power on", &r, 10);
    admit(&mut s, &asker("10.0.0.7", MAC, 11), &[], 11);
    let g = grant(&s, SecretKind::ConfigToken, "10.0.0.7");
    let here: IpAddr = "10.0.0.8".parse().unwrap();
    assert_eq!(
        use_secret(&mut s, &g, "configdata", here, false, 12, &r),
        Verdict::First
    );
    assert_eq!(s.window.as_ref().unwrap().state(12), "used");
    assert_eq!(
        use_secret(&mut s, &g, "configdata", here, false, 13, &r),
        Verdict::Retry
    );
    assert_eq!(
        use_secret(&mut s, &g, "configdata", here, false, 14, &r),
        Verdict::Retry
    );
    assert!(matches!(
        use_secret(&mut s, &g, "configdata", here, false, 15, &r),
        Verdict::Refused("spent", _)
    ));
    let elsewhere: IpAddr = "10.0.0.66".parse().unwrap();
    assert!(matches!(
        use_secret(&mut s, &g, "configdata", elsewhere, false, 16, &r),
        Verdict::Tripped(a) if a.kind == AlarmKind::SecretReplayed
    ));
    assert!(matches!(
        use_secret(&mut s, &g, "configdata", here, false, 17, &r),
        Verdict::Refused("alarm", _)
    ));
}

#[test]
fn a_registration_secret_is_bound_to_its_claimant_and_its_window() {
    let r = rules();
    let mut s = server();
    open_on(&mut s, "armed", &r, 10);
    admit(&mut s, &asker("10.0.0.7", MAC, 11), &[], 11);
    let g = grant(&s, SecretKind::DiscoverSecret, "10.0.0.7");
    let mut stolen = s.clone();
    assert!(matches!(
        use_secret(
            &mut stolen,
            &g,
            "registration",
            "10.0.0.66".parse().unwrap(),
            true,
            12,
            &r
        ),
        Verdict::Tripped(_)
    ));
    let mut late = s.clone();
    assert!(matches!(
        use_secret(
            &mut late,
            &g,
            "registration",
            "10.0.0.7".parse().unwrap(),
            true,
            5000,
            &r
        ),
        Verdict::Refused("expired", _)
    ));
    // A newer window revokes the older one's secret.
    open_on(&mut s, "power cycle", &r, 20);
    assert!(matches!(
        use_secret(
            &mut s,
            &g,
            "registration",
            "10.0.0.7".parse().unwrap(),
            true,
            21,
            &r
        ),
        Verdict::Refused("revoked", _)
    ));
}
