//! `faults`: a misbehaving boot policy for the host's tests. Its config key `mode` picks the
//! fault: `loop` (never returns), `memory` (allocates until it dies), `trap` (panics),
//! `huge` (a 10 MiB script), `error` (returns an error), `bad-env` (an environment name
//! that is not one), `log-flood` (logs 100 000 lines), `escape` (tries to read a host file
//! and to connect to the address in config key `connect`), anything else `pass`.

wit_bindgen::generate!({ path: "../../wit", world: "boot-policy" });

use std::hint::black_box;

use arges::plugin::config;
use arges::plugin::log::{Level, log};

struct Faults;

impl Guest for Faults {
    fn decide(_facts: MachineFacts) -> Result<BootAction, String> {
        match config::get("mode").as_deref() {
            Some("loop") => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            Some("memory") => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            Some("trap") => panic!("injected trap"),
            Some("huge") => Ok(BootAction::Script(
                "#!ipxe\n".to_string() + &"echo x\n".repeat(10 << 20 >> 3),
            )),
            Some("error") => Err("injected error".into()),
            Some("bad-env") => Ok(BootAction::Environment("../../etc".into())),
            Some("log-flood") => {
                for i in 0..100_000 {
                    log(Level::Info, &format!("line {i}"));
                }
                Ok(BootAction::Pass)
            }
            Some("escape") => {
                let file = std::fs::read_to_string("/etc/hostname").map(|s| s.len());
                let net = std::net::TcpStream::connect(config::get("connect").unwrap_or_default());
                match (file, net) {
                    (Err(f), Err(n)) => Err(format!("sandboxed: file: {f}; network: {n}")),
                    (f, n) => Ok(BootAction::Deny(format!(
                        "escaped: file {:?}, network {:?}",
                        f.is_ok(),
                        n.is_ok()
                    ))),
                }
            }
            _ => Ok(BootAction::Pass),
        }
    }
}

export!(Faults);
