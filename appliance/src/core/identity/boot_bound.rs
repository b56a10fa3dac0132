//! Boot-bound registration secrets: what a discover or wipe boot of a machine the
//! inventory does not know carries, bound to that boot (UUID, MAC, address), single-use
//! with bounded honest retries, in memory only.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::WindowsConfig;
use crate::registration::ValidRegistration;

/// A registration secret handed to a discover (or wipe) boot outside any window: it
/// proves only that the registering machine is the one that booted.
#[derive(Debug, Clone)]
struct BootBound {
    uuid: Option<String>,
    mac: Option<String>,
    source: IpAddr,
    expires: Instant,
    /// Uses so far and the first one's time.
    used: Option<(Instant, u32)>,
}

/// The boot-bound secrets handed out and not yet expired, by hash. In memory: an
/// appliance restart only makes a booting unknown machine boot again.
#[derive(Debug, Default)]
pub(in crate::core) struct BootSecrets {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_hash: HashMap<String, BootBound>,
    /// The hashes in the order they were minted. Every secret lives one window length,
    /// so the front is always the first to expire, and the first to give way when the
    /// bound is reached: minting stays O(1) however many are held.
    order: VecDeque<(Instant, String)>,
}

impl BootSecrets {
    /// Bound on secrets held (a rack is hundreds of machines; a flood is not).
    const MAX: usize = 16_384;

    /// A new secret for a boot of `uuid`/`mac` from `source`.
    pub(super) fn mint(
        &self,
        uuid: Option<&str>,
        mac: Option<&str>,
        source: IpAddr,
        ttl: Duration,
    ) -> String {
        let secret = crate::random_token();
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Held { by_hash, order } = &mut *held;
        while let Some((expires, hash)) = order.front()
            && (*expires <= now || by_hash.len() >= Self::MAX)
        {
            by_hash.remove(hash);
            order.pop_front();
        }
        let hash = crate::secret_hash(&secret);
        let expires = now + ttl;
        order.push_back((expires, hash.clone()));
        by_hash.insert(
            hash,
            BootBound {
                uuid: uuid.map(String::from),
                mac: mac.map(String::from),
                source,
                expires,
                used: None,
            },
        );
        secret
    }

    /// Whether `hash` is one of these secrets.
    pub(super) fn knows(&self, hash: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .contains_key(hash)
    }

    /// Checks a registration against the boot-bound secret with `hash`: `None` when it
    /// is not one of these, else whether the registration may go on (as a new machine).
    pub(super) fn check(
        &self,
        hash: &str,
        reg: &ValidRegistration,
        source: IpAddr,
        rules: &WindowsConfig,
    ) -> Option<std::result::Result<(), (&'static str, String)>> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let b = held.by_hash.get_mut(hash)?;
        let refuse = |label, why: String| Some(Err((label, why)));
        if b.source != source {
            return refuse(
                "forbidden",
                format!(
                    "this registration secret was handed to {}, not to {source}",
                    b.source
                ),
            );
        }
        if b.uuid.as_ref().is_some_and(|u| *u != reg.uuid) {
            return refuse(
                "forbidden",
                "this registration secret belongs to a boot of another UUID".into(),
            );
        }
        if let Some(mac) = &b.mac
            && !reg.macs.contains(mac)
        {
            return refuse(
                "forbidden",
                format!("the machine booted with MAC {mac} but does not report it"),
            );
        }
        match &mut b.used {
            None if now >= b.expires => {
                refuse("expired", "this registration secret expired".into())
            }
            None => {
                b.used = Some((now, 1));
                Some(Ok(()))
            }
            Some((first, n))
                if *n <= rules.retries && now.duration_since(*first) <= rules.retry_for =>
            {
                *n += 1;
                Some(Ok(()))
            }
            Some(_) => refuse("spent", "this registration secret was used already".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_bound_secrets_are_bounded_and_the_oldest_give_way() {
        let held = BootSecrets::default();
        let source: IpAddr = "10.0.0.7".parse().unwrap();
        let ttl = Duration::from_secs(900);
        let first = crate::secret_hash(&held.mint(None, None, source, ttl));
        for _ in 0..BootSecrets::MAX {
            held.mint(None, None, source, ttl);
        }
        let h = held.held.lock().unwrap();
        assert_eq!(h.by_hash.len(), BootSecrets::MAX);
        assert_eq!(h.order.len(), BootSecrets::MAX);
        drop(h);
        assert!(!held.knows(&first), "the oldest gave way");
        // Expired ones go at the next mint, whatever the count.
        let short = BootSecrets::default();
        let gone = crate::secret_hash(&short.mint(None, None, source, Duration::ZERO));
        short.mint(None, None, source, ttl);
        assert!(!short.knows(&gone));
    }
}
