//! `kill -9` in the middle of a stream of writes: every acknowledged registration and
//! admin edit survives, and the store always opens and reads back whole.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use test_support::{ADMIN_TOKEN, Appliance, REG_TOKEN, Registration, raw_http};

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let mut a = Appliance::start("");
    let acknowledged: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let mut next = 0u32;
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = a.http;
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acknowledged));
                let base = next + w * 100_000;
                std::thread::spawn(move || {
                    let mut i = base;
                    // Bounded: at most 2000 writes per worker per round.
                    while !stop.load(Ordering::Relaxed) && i < base + 2000 {
                        let machine = Registration::numbered(i);
                        let uuid = machine.uuid().to_string();
                        match raw_http(
                            addr,
                            "POST",
                            "/api/v1/register",
                            Some(REG_TOKEN),
                            &machine.body(),
                        ) {
                            Ok((200, _)) => {}
                            _ => break, // the appliance is gone
                        }
                        // Every other machine is also accepted through the admin API.
                        let accepted = i.is_multiple_of(2)
                            && matches!(
                                raw_http(
                                    addr,
                                    "POST",
                                    &format!("/api/v1/servers/{uuid}/accept"),
                                    Some(ADMIN_TOKEN),
                                    b""
                                ),
                                Ok((200, _))
                            );
                        acked.lock().unwrap().push((uuid, accepted));
                        i += 1;
                    }
                })
            })
            .collect();
        next += 1_000_000;
        std::thread::sleep(Duration::from_millis(300 + round * 250));
        a.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        a.restart_after_kill9();
        let (status, body) = a.request("GET", "/api/v1/servers", Some(ADMIN_TOKEN), b"");
        assert_eq!(
            status,
            200,
            "the store reopens after kill -9 in round {round}:\n{}",
            a.log()
        );
        let servers: Vec<serde_json::Value> =
            serde_json::from_slice(&body).expect("every record reads back whole");
        let acked = acknowledged.lock().unwrap();
        assert!(
            acked.len() > 20,
            "round {round}: too few writes to mean anything ({})",
            acked.len()
        );
        for (uuid, accepted) in acked.iter() {
            let s = servers
                .iter()
                .find(|s| s["id"] == uuid.as_str())
                .unwrap_or_else(|| panic!("acknowledged {uuid} lost in round {round}"));
            if *accepted {
                assert_eq!(
                    s["accepted"], true,
                    "acknowledged accept of {uuid} lost in round {round}"
                );
            }
        }
        // Anything beyond the acknowledged ones was in flight: present whole or absent.
        assert!(servers.len() >= acked.len());
        assert!(
            servers.len() <= acked.len() + 4,
            "more servers than writes in flight"
        );
    }
}
