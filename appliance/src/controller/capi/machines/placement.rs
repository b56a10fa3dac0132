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
//! bound then, so a rack that is down or whose view lagged costs a delay, never a
//! machine. When no rack has a free server, one rack (plain rendezvous over every rack)
//! says so on the machine. The resourceVersion preconditions on claim and bind still
//! decide any race that remains; placement only makes races rare.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::super::RETRY;
use crate::controller::Context;

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

/// This appliance's turn for machine `uid` of class `class`.
pub(super) fn turn(ctx: &Context, uid: &str, class: Option<&str>) -> Turn {
    let Some(fleet) = ctx.caches.free.borrow().clone() else {
        return Turn::After(VIEW_PENDING);
    };
    let me = ctx.identity.as_str();
    let free = class.and_then(|c| fleet.get(c)).filter(|f| !f.is_empty());
    let rank_of = |order: Vec<&str>| order.iter().position(|r| *r == me).unwrap_or(0) as u32;
    let rank = match free {
        Some(free) if free.contains_key(me) => rank_of(ranked(
            uid,
            free.iter().map(|(rack, n)| (rack.as_str(), *n)),
        )),
        Some(_) => return Turn::After(LOOK_AGAIN),
        // No rack has a free server (or the class is unknown): one rack says so.
        None => {
            let racks = ctx.caches.racks.borrow().clone().unwrap_or_default();
            let all = racks.keys().map(|r| (r.as_str(), 1));
            rank_of(ranked(uid, all.chain(std::iter::once((me, 1)))))
        }
    };
    if rank == 0 {
        return Turn::Now;
    }
    let due = STAGGER.saturating_mul(rank);
    match due.checked_sub(ctx.caches.first_seen.waited(uid)) {
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
