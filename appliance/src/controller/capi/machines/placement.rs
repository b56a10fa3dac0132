//! Which rack claims a MetalMachine that names neither a server nor a failure domain.
//!
//! Every appliance reconciles every MetalMachine. Left to race, M racks would each claim
//! a server for every new machine and M-1 of them give it back: M times the writes, and
//! with many machines at once a livelock of conflicting writes on the same MetalMachines
//! (measured: 50 machines over 3 racks took minutes). Instead every appliance ranks the
//! racks the same way: those holding a free server of the machine's class (from the
//! fleet view every leader keeps, [`crate::controller::caches::FreeServers`]), by
//! weighted rendezvous hashing of the machine's uid, weighted by free servers, so load
//! spreads with capacity and each machine has one first choice. Only the first acts at
//! once; the one ranked `r` acts after `r` × [`STAGGER`] if the machine is still not
//! bound then (counted from when it could first be claimed), so a rack that is down or
//! whose view lagged costs a delay, never a machine. Whatever no rack can act on (no
//! free server anywhere, a machine still waiting for its Cluster or bootstrap data) is
//! said on the machine by one rack alone. The resourceVersion preconditions on claim
//! and bind still decide any race that remains; placement only makes races rare.
//!
//! Left for later: a rack's liveness (its Lease) is not read, so a rack that is down but
//! holds free servers keeps its share of first places, each costing a machine one
//! [`STAGGER`] until the next rack acts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::super::RETRY;
use crate::controller::Context;
use crate::controller::caches::Racks;

/// How much longer each next-ranked rack waits before it claims too.
pub(super) const STAGGER: Duration = Duration::from_secs(3);
/// How long a rack without a free server waits before it looks again (servers may be
/// freed or accepted meanwhile; nothing else wakes the machine here).
const LOOK_AGAIN: Duration = RETRY.saturating_mul(3);
/// How soon to look again while the fleet view has not been built (a new leader).
const VIEW_PENDING: Duration = Duration::from_secs(1);
/// Machines first seen longer ago than this are forgotten (they are bound, gone, or
/// start their wait again, which only delays a fallback rack).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Whether this appliance acts on a machine now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    Now,
    /// Not this rack's turn: look again after this long, writing nothing.
    After(Duration),
}

/// When each waiting machine was first seen here, so a rack's turn comes `rank` ×
/// [`STAGGER`] after that, whatever the requeues in between.
#[derive(Default)]
pub struct FirstSeen(Mutex<HashMap<String, Instant>>);

impl FirstSeen {
    /// How long ago machine `uid` was first seen (now, if never).
    fn waited(&self, uid: &str) -> Duration {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        now.duration_since(*seen.entry(uid.to_string()).or_insert(now))
    }
}

/// This appliance's turn for machine `uid` of class `class`; `claimable`: its Cluster
/// is provisioned and unpaused and its Machine has bootstrap data, so a server can be
/// claimed for it now (the racks' waits run only from then: a worker waits minutes for
/// its bootstrap data, and every rack would be past its wait when it comes).
pub(super) fn turn(ctx: &Context, uid: &str, class: Option<&str>, claimable: bool) -> Turn {
    let Some(fleet) = ctx.caches.free.borrow().clone() else {
        return Turn::After(VIEW_PENDING);
    };
    let racks = ctx.caches.racks.borrow().clone().unwrap_or_default();
    let free = class.and_then(|c| fleet.get(c));
    decide(&ctx.identity, uid, free, &racks, claimable, || {
        ctx.caches.first_seen.waited(uid)
    })
}

/// [`turn`]'s rule, given the fleet view: `free` the class's free servers by rack,
/// `racks` every rack, `waited` how long the machine has been claimable here.
fn decide(
    me: &str,
    uid: &str,
    free: Option<&BTreeMap<String, u32>>,
    racks: &Racks,
    claimable: bool,
    waited: impl FnOnce() -> Duration,
) -> Turn {
    // The rack that speaks for a machine no rack can claim for: plain rendezvous over
    // every rack, so the others stay quiet (two racks writing different reasons would
    // wake each other for ever).
    let reporter = || {
        let all = racks.keys().map(|r| (r.as_str(), 1));
        ranked(uid, all.chain(std::iter::once((me, 1))))
            .first()
            .is_some_and(|r| *r == me)
    };
    let Some(free) = free.filter(|f| !f.is_empty()) else {
        return if reporter() {
            Turn::Now
        } else {
            Turn::After(LOOK_AGAIN)
        };
    };
    let order = ranked(uid, free.iter().map(|(rack, n)| (rack.as_str(), *n)));
    let rank = order.iter().position(|r| *r == me);
    if !claimable {
        // Waiting for its Cluster or bootstrap data: the first rack says so, alone.
        return if rank == Some(0) {
            Turn::Now
        } else {
            Turn::After(LOOK_AGAIN)
        };
    }
    if rank == Some(0) {
        return Turn::Now;
    }
    // The next ranks' turns come one STAGGER apart; a rack with no free server reports,
    // if it is the reporter, once every rack that has one had its turn (they may be down).
    let (due, mine) = match rank {
        Some(r) => (STAGGER.saturating_mul(r as u32), true),
        None => (
            STAGGER.saturating_mul(order.len() as u32) + LOOK_AGAIN,
            reporter(),
        ),
    };
    if !mine {
        return Turn::After(LOOK_AGAIN);
    }
    match due.checked_sub(waited()) {
        Some(left) if !left.is_zero() => Turn::After(left.min(LOOK_AGAIN)),
        _ => Turn::Now,
    }
}

/// The racks in their order for machine `uid`: weighted rendezvous hashing, each rack's
/// score `weight / -ln(u)` with `u` uniform in (0, 1) from sha256(uid, rack), so a rack
/// is first with probability proportional to its weight, every appliance computes the
/// same order, and a rack coming or going moves only the machines it gains or loses.
fn ranked<'a>(uid: &str, racks: impl Iterator<Item = (&'a str, u32)>) -> Vec<&'a str> {
    let mut scored: Vec<(f64, &str)> = racks
        .filter(|(_, weight)| *weight > 0)
        .map(|(rack, weight)| {
            let digest = Sha256::new()
                .chain_update(uid.as_bytes())
                .chain_update([0])
                .chain_update(rack.as_bytes())
                .finalize();
            let mut bits = [0u8; 8];
            bits.copy_from_slice(&digest[..8]);
            let u = (u64::from_be_bytes(bits) as f64 + 0.5) / 18_446_744_073_709_551_616.0;
            (f64::from(weight) / -u.ln(), rack)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, rack)| rack).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_appliance_ranks_the_racks_alike_whatever_order_it_lists_them() {
        let racks = [("a", 3), ("b", 3), ("c", 3)];
        let forward = ranked("uid-1", racks.iter().copied());
        let backward = ranked("uid-1", racks.iter().rev().copied());
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), 3);
    }

    #[test]
    fn first_choices_follow_free_servers() {
        // Rack b has three times a's free servers: it is first for about 3/4 of machines.
        let firsts = (0..4000)
            .filter(|i| ranked(&format!("uid-{i}"), [("a", 1), ("b", 3)].into_iter())[0] == "b")
            .count();
        assert!((2800..3200).contains(&firsts), "{firsts} of 4000");
        // A rack with nothing free is never ranked.
        assert_eq!(ranked("uid", [("a", 0), ("b", 2)].into_iter()), vec!["b"]);
    }

    #[test]
    fn a_rack_joining_takes_machines_only_from_the_others_never_reshuffles_them() {
        let before: Vec<String> = (0..500)
            .map(|i| ranked(&format!("m{i}"), [("a", 2), ("b", 2)].into_iter())[0].to_string())
            .collect();
        for (i, was) in before.iter().enumerate() {
            let now = ranked(&format!("m{i}"), [("a", 2), ("b", 2), ("c", 2)].into_iter())[0];
            assert!(
                now == was || now == "c",
                "machine {i} moved from {was} to {now}"
            );
        }
    }

    /// A uid whose rack order over `free` is `want`.
    fn uid_ordering(free: &[(&str, u32)], want: &[&str]) -> String {
        (0..10_000)
            .map(|i| format!("uid-{i}"))
            .find(|uid| ranked(uid, free.iter().copied()) == want)
            .expect("some uid orders the racks so")
    }

    fn decided(me: &str, uid: &str, free: &[(&str, u32)], claimable: bool, waited: u64) -> Turn {
        let free: BTreeMap<String, u32> = free.iter().map(|(r, n)| (r.to_string(), *n)).collect();
        let racks: Racks = ["a", "b", "c"]
            .iter()
            .map(|r| (r.to_string(), true))
            .collect();
        decide(me, uid, Some(&free), &racks, claimable, || {
            Duration::from_secs(waited)
        })
    }

    #[test]
    fn the_first_rack_claims_at_once_and_each_next_one_a_stagger_later() {
        let free = [("a", 2), ("b", 2), ("c", 2)];
        let uid = uid_ordering(&free, &["b", "c", "a"]);
        assert_eq!(decided("b", &uid, &free, true, 0), Turn::Now);
        assert_eq!(decided("c", &uid, &free, true, 0), Turn::After(STAGGER));
        assert_eq!(decided("c", &uid, &free, true, 3), Turn::Now);
        assert_eq!(
            decided("a", &uid, &free, true, 4),
            Turn::After(Duration::from_secs(2))
        );
        assert_eq!(decided("a", &uid, &free, true, 6), Turn::Now);
    }

    #[test]
    fn a_machine_not_claimable_yet_is_spoken_for_by_its_first_rack_and_starts_no_clock() {
        let free = [("a", 2), ("b", 2)];
        let uid = uid_ordering(&free, &["a", "b"]);
        let never = |me: &str| {
            let free: BTreeMap<String, u32> =
                free.iter().map(|(r, n)| (r.to_string(), *n)).collect();
            decide(me, &uid, Some(&free), &Racks::new(), false, || {
                panic!("the wait starts only once the machine can be claimed")
            })
        };
        assert_eq!(never("a"), Turn::Now, "says what it waits for");
        assert_eq!(never("b"), Turn::After(LOOK_AGAIN));
        assert_eq!(never("c"), Turn::After(LOOK_AGAIN));
    }

    #[test]
    fn with_no_free_server_anywhere_one_rack_alone_says_so() {
        let racks: Racks = ["a", "b", "c"]
            .iter()
            .map(|r| (r.to_string(), true))
            .collect();
        for uid in ["m1", "m2", "m3", "m4"] {
            let speaking: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|me| decide(me, uid, None, &racks, true, || Duration::ZERO) == Turn::Now)
                .collect();
            assert_eq!(speaking.len(), 1, "{uid}: {speaking:?}");
        }
    }

    #[test]
    fn a_rack_without_free_servers_reports_only_after_every_other_had_its_turn() {
        // Only rack c has free servers (it may be down); a and b have none.
        let free = [("c", 5)];
        let uid = (0..1000)
            .map(|i| format!("uid-{i}"))
            .find(|uid| decided("a", uid, &free, true, 3600) == Turn::Now)
            .expect("a is the reporter for some machine");
        let all_turns = STAGGER + LOOK_AGAIN;
        assert_eq!(
            decided("a", &uid, &free, true, all_turns.as_secs() - 1),
            Turn::After(Duration::from_secs(1))
        );
        assert_eq!(
            decided("a", &uid, &free, true, all_turns.as_secs()),
            Turn::Now
        );
        assert_eq!(
            decided("b", &uid, &free, true, 3600),
            Turn::After(LOOK_AGAIN),
            "and only the reporter"
        );
    }

    #[test]
    fn a_machine_waits_its_rank_from_when_it_was_first_seen() {
        let seen = FirstSeen::default();
        seen.waited("m");
        std::thread::sleep(Duration::from_millis(30));
        let m = seen.waited("m");
        assert!(m >= Duration::from_millis(30));
        assert!(
            seen.waited("other") < m,
            "a new machine starts its own wait"
        );
    }
}
