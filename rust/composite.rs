//! Several limiters on one key, all or nothing.
//!
//! A [`Group`] checks its parts as one step: it locks the key's shard in every part
//! (in store-id order, so groups sharing parts cannot deadlock), lets every part
//! decide, and charges every part only if all admit — and only once every part that
//! must insert the key has room for it. A [`Composite`] is a group with counters and a
//! shadow mode of its own; a token budget ([`crate::budget`]) is another.

use crate::algorithms::{State, FRESH};
use crate::decision::{finish, fold, Checked, Decision};
use crate::error::{Error, Result};
use crate::key::{Fingerprint, FingerprintMap};
use crate::limiter::{fresh_at, Limiter, ShardQuotas, Stats};
use crate::quota::Quota;
use crate::report::{top_n, AtomicCounters, Counters, Inspection, TopRow};
use crate::store::{Reservation, Room, ShardGuard, Store};
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The most parts a [`Composite`] takes.
pub const MAX_PARTS: usize = 64;

/// In-process limiters decided together on one key. Every part reads the same clock,
/// read once per check.
pub struct Group {
    parts: Vec<Arc<Limiter>>,
    /// Part indexes sorted by store id: the order shards are locked in.
    order: Vec<usize>,
}

/// One part of a group's check, under its shard's lock.
struct Step<'a> {
    index: usize,
    guard: ShardGuard<'a, ShardQuotas>,
    tracked: bool,
    next: State,
    decision: Decision,
    room: Option<Reservation<'a>>,
}

impl Group {
    /// Checks the parts: at most [`MAX_PARTS`], in-process, none twice, one clock.
    pub fn new(parts: Vec<Arc<Limiter>>) -> Result<Group> {
        if parts.len() > MAX_PARTS {
            return Err(Error::InvalidArgument(format!("Composite takes at most {MAX_PARTS} limiters")));
        }
        let mut ids = Vec::with_capacity(parts.len());
        for p in &parts {
            let Some(store) = p.in_process_store() else {
                return Err(Error::InvalidArgument(
                    "Composite parts must keep their states in-process (not in a SharedMemoryStore)".into(),
                ));
            };
            if ids.contains(&store.id()) {
                return Err(Error::InvalidArgument("the same limiter appears twice in Composite".into()));
            }
            ids.push(store.id());
        }
        if !parts.iter().all(|p| p.clock().same(parts[0].clock())) {
            return Err(Error::InvalidArgument("all Composite parts must use the same clock".into()));
        }
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by_key(|&i| ids[i]);
        Ok(Group { parts, order })
    }

    pub fn parts(&self) -> &[Arc<Limiter>] {
        &self.parts
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    fn store(&self, i: usize) -> &Store<ShardQuotas> {
        self.parts[i].in_process_store().expect("Group::new admits in-process limiters only")
    }

    /// Locks the shard of part `i`'s key `key(i)` in every part, in store-id order;
    /// returned in part order.
    fn lock(&self, key: &impl Fn(usize) -> Fingerprint) -> Vec<(usize, ShardGuard<'_, ShardQuotas>)> {
        let mut guards: Vec<_> = self.order.iter().map(|&i| (i, self.store(i).lock(&key(i)))).collect();
        guards.sort_unstable_by_key(|(i, _)| *i);
        guards
    }

    /// Decides a call costing `costs[i]` on part `i`, for every part, and with `charge`
    /// charges every part or none (counting each part's decision in its counters). A part
    /// in shadow mode never denies the whole. `each`, if given, gets every part's own
    /// decision. The group must have a part.
    #[inline]
    pub fn check(&self, fp: &Fingerprint, costs: &[u64], charge: bool, each: Option<&mut Vec<Decision>>) -> Decision {
        self.check_keys(|_| *fp, costs, charge, each)
    }

    /// [`check`](Self::check) with a key of its own for each part: part `i` decides the key
    /// `key(i)` (the nodes of a [`crate::hierarchy`] path, one per level). The shards are
    /// locked in store-id order as always, one per part. When a part's store has no room
    /// for its new key, `each` gets that part's answer for a full store in its place.
    #[inline]
    pub fn check_keys(
        &self,
        key: impl Fn(usize) -> Fingerprint,
        costs: &[u64],
        charge: bool,
        each: Option<&mut Vec<Decision>>,
    ) -> Decision {
        self.check_with(key, costs, charge, each, |q, state, now, cost| q.step(state, now, cost))
    }

    /// [`check_keys`](Self::check_keys) deciding each part with `step` (its quota, its
    /// key's state, now, its cost): a priority class's floor on every part, say.
    #[inline]
    pub fn check_with(
        &self,
        key: impl Fn(usize) -> Fingerprint,
        costs: &[u64],
        charge: bool,
        each: Option<&mut Vec<Decision>>,
        step: impl Fn(&Quota, State, u64, u64) -> (State, Decision),
    ) -> Decision {
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(self.parts.len());
        for &i in &self.order {
            let guard = self.store(i).lock(&key(i));
            let decision = Decision::never(0, 0, 0);
            steps.push(Step { index: i, guard, tracked: false, next: FRESH, decision, room: None });
        }
        steps.sort_unstable_by_key(|s| s.index);
        let now = self.parts[0].clock().now();
        let mut whole: Option<Decision> = None;
        for s in steps.iter_mut() {
            let fp = &key(s.index);
            let state = s.guard.lookup(fp);
            s.tracked = state.is_some();
            let q = s.guard.extra_mut();
            let (next, d) = step(q.for_key(fp), state.unwrap_or(FRESH), now, costs[s.index]);
            (s.next, s.decision) = (next, d);
            let shadowed = !d.allowed && self.parts[s.index].shadow();
            let effective = if shadowed { d.shadow_admitted() } else { d };
            whole = Some(match whole {
                None => effective,
                Some(w) => fold(w, &effective),
            });
            if charge {
                q.counters.count(&d);
                q.counters.shadow_denied += shadowed as u64;
            }
        }
        let decision = finish(whole.expect("a group checks at least one part"));
        if !decision.allowed || !charge {
            if let Some(each) = each {
                each.extend(steps.iter().map(|s| s.decision));
            }
            return decision;
        }
        let fresh = fresh_at(now);
        // Room for the parts that do not track the key yet, in every store before writing
        // to any: the rooms taken are given back (dropped) when one store is full.
        let mut full_part = None;
        for s in steps.iter_mut() {
            if !s.tracked && s.decision.allowed {
                match s.guard.reserve(now, &fresh) {
                    Some(room) => s.room = Some(room),
                    None => {
                        let full = self.parts[s.index].full(s.guard.extra().for_key(&key(s.index)));
                        full_part = Some((s.index, full));
                        break;
                    }
                }
            }
        }
        if let Some(each) = each {
            each.extend(steps.iter().map(|s| match full_part {
                Some((i, full)) if i == s.index => full,
                _ => s.decision,
            }));
        }
        if let Some((_, full)) = full_part {
            return Decision { limit: decision.limit, ..full };
        }
        for s in steps.iter_mut() {
            // A part in shadow mode that would have denied is not charged.
            if s.decision.allowed {
                let next = s.next;
                let room = s.room.take().map_or(Room::Find, Room::Reserved);
                s.guard.upsert(&key(s.index), now, &fresh, room, |_, _, _| (Some(next), ()));
            }
        }
        decision
    }

    /// Settles earlier charges of the key: part `i` is charged `deltas[i]` more units (or
    /// refunded, when negative) for a call made at `charged_at`. A charge is never lost:
    /// a key the store has no room for is tracked anyway.
    pub fn adjust(&self, fp: &Fingerprint, deltas: &[i64], charged_at: u64) {
        self.adjust_keys(|_| *fp, deltas, charged_at)
    }

    /// [`adjust`](Self::adjust) with a key of its own for each part (see
    /// [`check_keys`](Self::check_keys)).
    pub fn adjust_keys(&self, key: impl Fn(usize) -> Fingerprint, deltas: &[i64], charged_at: u64) {
        if self.parts.is_empty() {
            return;
        }
        let mut guards = self.lock(&key);
        let now = self.parts[0].clock().now();
        let fresh = fresh_at(now);
        for (i, g) in guards.iter_mut() {
            let delta = deltas[*i];
            if delta == 0 {
                continue;
            }
            let fp = &key(*i);
            g.upsert(fp, now, &fresh, Room::Force, |q, state, tracked| {
                let quota = q.for_key(fp);
                let next = quota.adjust(state, now, delta, charged_at);
                ((tracked || !quota.is_fresh(next, now)).then_some(next), ())
            });
        }
    }
}

/// Several limiters on one key, all or nothing (see [`Group::check`]), with its own
/// counters and shadow mode. Its parts keep theirs: a part in shadow mode never denies
/// the whole; a composite in shadow mode never denies at all.
pub struct Composite {
    group: Group,
    shadow: AtomicBool,
    counters: CachePadded<AtomicCounters>,
}

/// What a [`Composite`] counts, with its parts' sizes and each part's stats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompositeStats {
    pub counters: Counters,
    /// Keys tracked by the busiest part.
    pub keys: usize,
    /// Summed over the parts.
    pub evicted: u64,
    pub overrides: usize,
    pub parts: Vec<Stats>,
}

impl Composite {
    /// Checks the parts: at least one, and see [`Group::new`].
    pub fn new(parts: Vec<Arc<Limiter>>) -> Result<Composite> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument("Composite needs at least one limiter".into()));
        }
        Ok(Composite { group: Group::new(parts)?, shadow: AtomicBool::new(false), counters: Default::default() })
    }

    pub fn parts(&self) -> &[Arc<Limiter>] {
        self.group.parts()
    }

    /// Decides (and with `charge`, charges every part or none) a call of `cost` units on
    /// every part. Only a charging check counts and applies shadow mode, like `peek`.
    #[inline]
    pub fn check(&self, fp: &Fingerprint, cost: u64, charge: bool) -> Checked {
        let costs = [cost; MAX_PARTS];
        let d = self.group.check(fp, &costs[..self.parts().len()], charge, None);
        if !charge {
            return Checked::plain(d);
        }
        self.counters.count_check(d, self.shadow())
    }

    /// [`check`](Self::check) charging, also returning each part's own Decision.
    pub fn check_each(&self, fp: &Fingerprint, cost: u64) -> (Checked, Vec<Decision>) {
        let costs = [cost; MAX_PARTS];
        let mut each = Vec::with_capacity(self.parts().len());
        let d = self.group.check(fp, &costs[..self.parts().len()], true, Some(&mut each));
        (self.counters.count_check(d, self.shadow()), each)
    }

    /// `(allowed, remaining)` for a call of one unit now, charging nothing.
    pub fn get_limit(&self, fp: &Fingerprint) -> (bool, u64) {
        let d = self.check(fp, 0, false).decision;
        (d.remaining >= 1, d.remaining)
    }

    pub fn reset(&self, fp: &Fingerprint) {
        for p in self.parts() {
            p.reset(fp);
        }
    }

    pub fn sweep(&self) -> usize {
        self.parts().iter().map(|p| p.sweep()).sum()
    }

    /// Keys tracked by the busiest part.
    pub fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest default capacity of the parts.
    pub fn limit(&self) -> u64 {
        self.parts().iter().map(|p| p.quota().limit()).min().unwrap_or(0)
    }

    pub fn shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    pub fn set_shadow(&self, on: bool) {
        self.shadow.store(on, Ordering::Relaxed)
    }

    /// The composite's own counters (each part counts its own decisions too).
    pub fn counters(&self) -> Counters {
        self.counters.get()
    }

    /// The composite's counters, the parts' sizes, and each part's stats.
    pub fn stats(&self) -> CompositeStats {
        let parts: Vec<Stats> = self.parts().iter().map(|p| p.stats()).collect();
        CompositeStats {
            counters: self.counters(),
            keys: parts.iter().map(|s| s.keys).max().unwrap_or(0),
            evicted: parts.iter().map(|s| s.evicted).sum(),
            overrides: parts.iter().map(|s| s.overrides).sum(),
            parts,
        }
    }

    /// The key across the parts now (the combined answer for a call of one unit), and
    /// each part's own inspection.
    pub fn inspect(&self, fp: &Fingerprint) -> (Inspection, Vec<Inspection>) {
        let (zero, one) = (self.check(fp, 0, false).decision, self.check(fp, 1, false).decision);
        let parts: Vec<Inspection> = self.parts().iter().map(|p| p.inspect(fp)).collect();
        let whole = Inspection {
            algorithm: "composite",
            tracked: parts.iter().any(|p| p.tracked),
            shadow: self.shadow(),
            ..Inspection::from_peeks(&zero, &one)
        };
        (whole, parts)
    }

    /// The `n` keys using the largest share of their limit in any part, as (fingerprint,
    /// units used, limit) of the part where the share is largest. A key in the top `n` of
    /// none of the parts cannot be in the top `n` of the whole.
    pub fn top(&self, n: usize) -> Vec<TopRow> {
        let mut best: FingerprintMap<(u64, u64)> = FingerprintMap::default();
        for p in self.parts() {
            for (fp, used, limit) in p.top(n).expect("composite parts are in-process") {
                let e = best.entry(fp).or_insert((used, limit));
                if (used as u128) * (e.1 as u128) > (e.0 as u128) * (limit as u128) {
                    *e = (used, limit);
                }
            }
        }
        top_n(best.into_iter().map(|(fp, (u, l))| (fp, u, l)), n)
    }

    /// A composite has no quota of its own: quotas belong to its parts.
    pub fn no_quota(what: &str) -> Error {
        Error::Unsupported(format!(
            "a Composite has no quota of its own: call {what} on its parts (composite.parts[i].{what}(...)), \
             each keeps its quota and usage"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock, NANOS};
    use crate::key::{fingerprint, KeyKind};
    use crate::quota::{Kind, Quota};
    use crate::rate::Rate;

    fn fp(s: &str) -> Fingerprint {
        fingerprint(KeyKind::Str, s.as_bytes())
    }

    fn limiter(kind: Kind, rate: &str, clock: &ManualClock, max_keys: Option<usize>) -> Arc<Limiter> {
        let quota = Quota::new(kind, Rate::parse(rate).unwrap(), None, 0).unwrap();
        Arc::new(Limiter::new(quota, Clock::Manual(clock.clone()), 3600.0, max_keys).unwrap())
    }

    #[test]
    fn all_or_nothing() {
        let clock = ManualClock::new(0);
        let a = limiter(Kind::TokenBucket, "10/s", &clock, None);
        let b = limiter(Kind::FixedWindow, "3/minute", &clock, None);
        let both = Group::new(vec![Arc::clone(&a), Arc::clone(&b)]).unwrap();
        let k = fp("k");
        for _ in 0..3 {
            assert!(both.check(&k, &[1, 1], true, None).allowed);
        }
        let d = both.check(&k, &[1, 1], true, None);
        assert!(!d.allowed);
        assert_eq!((d.limit, d.retry_after), (3, Some(60 * NANOS)));
        assert_eq!(a.peek(&k, 1).remaining, 6, "the token bucket was not charged by the denied call");
    }

    #[test]
    fn a_full_part_writes_nothing_and_gives_the_rooms_back() {
        let clock = ManualClock::new(0);
        let roomy = limiter(Kind::TokenBucket, "10/minute", &clock, None);
        let small = limiter(Kind::TokenBucket, "10/minute", &clock, Some(1));
        let both = Composite::new(vec![Arc::clone(&roomy), Arc::clone(&small)]).unwrap();
        assert!(both.check(&fp("first"), 1, true).decision.allowed);
        let d = both.check(&fp("second"), 1, true).decision;
        assert!(!d.allowed && d.retry_after == Some(60 * NANOS), "{d:?}");
        assert_eq!((roomy.len(), small.len()), (1, 1), "the roomy part took no room for the refused key");
        assert_eq!(roomy.peek(&fp("second"), 0).remaining, 10);
        assert_eq!(small.stats().store_full, 1);
    }

    #[test]
    fn adjust_settles_every_part() {
        let clock = ManualClock::new(0);
        let tokens = limiter(Kind::TokenBucket, "100/minute", &clock, None);
        let daily = limiter(Kind::FixedWindow, "1000/day", &clock, Some(1));
        let both = Group::new(vec![Arc::clone(&tokens), Arc::clone(&daily)]).unwrap();
        let k = fp("k");
        let mut each = Vec::new();
        assert!(both.check(&k, &[60, 60], true, Some(&mut each)).allowed && each.len() == 2);
        both.adjust(&k, &[-50, -50], 0);
        assert_eq!(tokens.peek(&k, 0).remaining, 90);
        assert_eq!(daily.peek(&k, 0).remaining, 990);
        both.adjust(&k, &[200, 200], 0);
        assert!(!tokens.peek(&k, 1).allowed, "an actual cost above the estimate puts the key in debt");
        assert_eq!(daily.peek(&k, 0).remaining, 790);
        // A charge for a key nobody tracks yet is kept, even past max_keys.
        both.adjust(&fp("new"), &[0, 5], 0);
        assert_eq!(daily.peek(&fp("new"), 0).remaining, 995);
        assert_eq!(daily.len(), 2);
        // A refund that leaves a new key fresh takes no room.
        both.adjust(&fp("newer"), &[-5, 0], 0);
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn counts_and_shadows_as_a_whole() {
        let clock = ManualClock::new(0);
        let a = limiter(Kind::TokenBucket, "2/minute", &clock, None);
        let b = limiter(Kind::TokenBucket, "10/minute", &clock, None);
        let c = Composite::new(vec![Arc::clone(&a), Arc::clone(&b)]).unwrap();
        let k = fp("k");
        assert!(c.check(&k, 2, true).decision.allowed);
        let denied = c.check(&k, 1, true);
        assert!(!denied.decision.allowed && denied.shadowed.is_none());
        c.set_shadow(true);
        let shadowed = c.check(&k, 1, true);
        assert!(shadowed.decision.allowed);
        assert_eq!(shadowed.shadowed.unwrap().retry_after, Some(30 * NANOS));
        assert_eq!(b.peek(&k, 0).remaining, 8, "a shadow admission charges no part");
        assert!(!c.check(&k, 1, false).decision.allowed, "peek ignores shadow mode");
        let n = c.counters();
        assert_eq!((n.allowed, n.denied, n.shadow_denied, n.near_limit), (1, 2, 1, 1));
        assert_eq!(c.limit(), 2);
        assert_eq!(c.get_limit(&k), (false, 0));
        let (whole, parts) = c.inspect(&k);
        assert_eq!((whole.algorithm, whole.used, whole.tracked, whole.shadow), ("composite", 2, true, true));
        assert_eq!(parts.len(), 2);
        let stats = c.stats();
        assert_eq!((stats.keys, stats.parts.len(), stats.parts[0].counters.allowed), (1, 2, 1));
        assert_eq!(c.top(5), vec![(k, 2, 2)]);
        assert!(Composite::new(vec![]).is_err());
        assert!(Composite::new(vec![Arc::clone(&a), Arc::clone(&a)]).is_err());
        let other = limiter(Kind::TokenBucket, "1/s", &ManualClock::new(0), None);
        assert!(Composite::new(vec![a, other]).err().unwrap().to_string().contains("same clock"));
        assert!(matches!(Composite::no_quota("set_quota"), Error::Unsupported(_)));
    }

    #[test]
    fn a_shadow_part_never_denies_the_whole() {
        let clock = ManualClock::new(0);
        let strict = limiter(Kind::TokenBucket, "1/minute", &clock, None);
        let loose = limiter(Kind::TokenBucket, "10/minute", &clock, None);
        strict.set_shadow(true);
        let c = Composite::new(vec![Arc::clone(&strict), Arc::clone(&loose)]).unwrap();
        let k = fp("k");
        assert!((0..3).all(|_| c.check(&k, 1, true).decision.allowed));
        assert_eq!(loose.peek(&k, 0).remaining, 7);
        assert_eq!(strict.stats().counters.shadow_denied, 2);
    }
}
