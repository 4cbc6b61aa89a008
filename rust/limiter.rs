//! Limiters: an algorithm bound to a store and a clock, composites of them, and
//! concurrency leases.

use crate::algorithms::{Algorithm, Decision, State};
use crate::clock::{Clock, NANOS};
use crate::error::{Error, Result};
use crate::key::{Fingerprint, FingerprintMap};
use crate::store::{second_of, Slot, Store, SHARDS};
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Checks a ttl in seconds and raises it to the time a key needs to become fresh again,
/// so that evicting an idle key can never change a decision.
pub fn effective_ttl(ttl_secs: f64, time_to_fresh_ns: u64) -> Result<u64> {
    if !ttl_secs.is_finite() || ttl_secs <= 0.0 {
        return Err(Error::InvalidArgument(format!("ttl must be a finite number of seconds above 0, got {ttl_secs}")));
    }
    let ns = crate::clock::secs_to_ns(ttl_secs).max(1);
    Ok(ns.max(time_to_fresh_ns))
}

/// Checks counted per shard (under the shard's lock, so counting costs no atomics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    /// Admitted checks that left at most 20% of the limit (at least 80% used).
    pub near_limit: u64,
    /// Checks a shadow-mode limiter would have denied (and admitted instead).
    pub shadow_denied: u64,
}

impl Counters {
    #[inline]
    pub fn count(&mut self, d: &Decision) {
        if d.allowed {
            self.allowed += 1;
            if d.remaining.saturating_mul(5) <= d.limit {
                self.near_limit += 1;
            }
        } else {
            self.denied += 1;
        }
    }

    fn add(&mut self, o: &Counters) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.near_limit += o.near_limit;
        self.shadow_denied += o.shadow_denied;
    }
}

/// What a limiter keeps in each shard of its store: the quota keys get by default, the
/// per-key quotas set at run time, and the counters.
pub struct Quotas {
    pub default: Algorithm,
    pub overrides: FingerprintMap<Algorithm>,
    pub counters: Counters,
}

impl Quotas {
    /// The quota in force for a key.
    #[inline]
    pub fn algo(&self, fp: &Fingerprint) -> &Algorithm {
        if self.overrides.is_empty() {
            &self.default
        } else {
            self.overrides.get(fp).unwrap_or(&self.default)
        }
    }

    #[inline]
    fn algo_of(&self, slot: &Slot) -> &Algorithm {
        self.algo(&Fingerprint(slot.fp))
    }
}

/// A snapshot of a limiter's counters and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub counters: Counters,
    pub keys: usize,
    pub evicted: u64,
    pub overrides: usize,
}

/// A window or bucket algorithm over a sharded store. The quota can be changed at run
/// time, for the whole limiter or for one key, without losing any key's usage (see
/// [`Algorithm::convert`]).
pub struct Limiter {
    pub store: Store<Quotas>,
    pub clock: Clock,
    /// The ttl asked for; the one in force is raised to every quota's time to fresh.
    ttl_ns: AtomicU64,
    /// In shadow mode a check decides and counts but never denies.
    shadow: AtomicBool,
}

impl Limiter {
    pub fn new(algo: Algorithm, clock: Clock, ttl_secs: f64, max_keys: Option<usize>) -> Result<Limiter> {
        if max_keys == Some(0) {
            return Err(Error::InvalidArgument("max_keys must be at least 1, got 0".into()));
        }
        let ttl_ns = effective_ttl(ttl_secs, algo.time_to_fresh())?;
        let store = Store::new(ttl_ns, max_keys, || Quotas {
            default: algo.clone(),
            overrides: FingerprintMap::default(),
            counters: Counters::default(),
        });
        Ok(Limiter { store, clock, ttl_ns: AtomicU64::new(ttl_ns), shadow: AtomicBool::new(false) })
    }

    /// The ttl in force (nanoseconds), after raising it to the time to fresh.
    pub fn ttl_ns(&self) -> u64 {
        self.ttl_ns.load(Ordering::Relaxed)
    }

    pub fn shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    pub fn set_shadow(&self, on: bool) {
        self.shadow.store(on, Ordering::Relaxed)
    }

    /// The default quota (what keys without their own quota get).
    pub fn algo(&self) -> Algorithm {
        self.store.lock_index(0).extra().default.clone()
    }

    /// The quota in force for a key, and whether it is the key's own.
    pub fn quota_of(&self, fp: &Fingerprint) -> (Algorithm, bool) {
        let g = self.store.lock(fp);
        let q = g.extra();
        match q.overrides.get(fp) {
            Some(a) => (a.clone(), true),
            None => (q.default.clone(), false),
        }
    }

    fn check_kind(&self, algo: &Algorithm) -> Result<()> {
        let current = self.algo();
        if std::mem::discriminant(&current) != std::mem::discriminant(algo) {
            return Err(Error::InvalidArgument(format!(
                "a {} limiter's quota must stay a {}, got a {}",
                current.name(),
                current.name(),
                algo.name()
            )));
        }
        Ok(())
    }

    fn raise_ttl(&self, algo: &Algorithm) {
        let ttl = self.ttl_ns.fetch_max(algo.time_to_fresh(), Ordering::Relaxed).max(algo.time_to_fresh());
        self.store.raise_ttl(ttl);
    }

    /// Gives one key its own quota, from its next check on. The key's usage so far is
    /// carried over (see [`Algorithm::convert`]).
    pub fn set_quota(&self, fp: &Fingerprint, algo: Algorithm) -> Result<()> {
        self.check_kind(&algo)?;
        self.raise_ttl(&algo);
        let now = self.clock.now();
        let mut g = self.store.lock(fp);
        let (slot, q) = g.slot_and_extra(fp);
        if let Some(slot) = slot {
            slot.state = q.algo(fp).convert(&algo, slot.state, now);
        }
        q.overrides.insert(*fp, algo);
        Ok(())
    }

    /// Puts a key back on the default quota, carrying its usage over. False when the key
    /// had no quota of its own.
    pub fn clear_quota(&self, fp: &Fingerprint) -> bool {
        let now = self.clock.now();
        let mut g = self.store.lock(fp);
        let (slot, q) = g.slot_and_extra(fp);
        let Some(own) = q.overrides.remove(fp) else {
            return false;
        };
        if let Some(slot) = slot {
            slot.state = own.convert(&q.default, slot.state, now);
        }
        true
    }

    /// Changes the default quota of every key without a quota of its own, carrying each
    /// key's usage over. Each shard is converted under its lock, one after the other.
    pub fn set_default(&self, algo: Algorithm) -> Result<()> {
        self.check_kind(&algo)?;
        self.raise_ttl(&algo);
        for index in 0..SHARDS {
            let now = self.clock.now();
            let mut g = self.store.lock_index(index);
            g.update_all(|q, slot| {
                if q.overrides.is_empty() || !q.overrides.contains_key(&Fingerprint(slot.fp)) {
                    slot.state = q.default.convert(&algo, slot.state, now);
                }
            });
            g.extra_mut().default = algo.clone();
        }
        Ok(())
    }

    /// The decision given to a new key that finds the store full.
    fn full(algo: &Algorithm) -> Decision {
        Decision {
            allowed: false,
            limit: algo.limit(),
            remaining: 0,
            reset_after: 0,
            retry_after: Some(algo.time_to_fresh()),
            delay: 0,
        }
    }

    /// Decides and, if admitted, charges `cost` for the key. In shadow mode a call that
    /// would be denied is admitted (and not charged); the flag tells when that happened.
    #[inline(always)]
    pub fn check(&self, fp: &Fingerprint, cost: u64) -> (Decision, bool) {
        let now = self.clock.now();
        let mut g = self.store.lock(fp);
        let (slot, q) = g.slot_and_extra(fp);
        let algo = q.algo(fp);
        let mut new_key = None;
        let mut d = match slot {
            Some(slot) => {
                let (state, d) = algo.step(slot.state, now, cost);
                if d.allowed {
                    slot.state = state;
                    slot.seen = second_of(now);
                }
                d
            }
            None => {
                let (state, d) = algo.step(0, now, cost);
                if d.allowed {
                    new_key = Some(state);
                }
                d
            }
        };
        if let Some(state) = new_key {
            if g.reserve(now, &|q, s| q.algo_of(s).is_fresh(s.state, now)) {
                g.insert_reserved(fp, state, now);
            } else {
                d = Self::full(g.extra().algo(fp));
            }
        }
        let counters = &mut g.extra_mut().counters;
        counters.count(&d);
        if !d.allowed && self.shadow.load(Ordering::Relaxed) {
            counters.shadow_denied += 1;
            return (Decision { allowed: true, retry_after: Some(0), ..d }, true);
        }
        (d, false)
    }

    #[inline]
    pub fn hit(&self, fp: &Fingerprint, cost: u64) -> Decision {
        self.check(fp, cost).0
    }

    /// The decision `hit` would give, charging nothing.
    pub fn peek(&self, fp: &Fingerprint, cost: u64) -> Decision {
        let now = self.clock.now();
        let g = self.store.lock(fp);
        let state = g.state(fp);
        g.extra().algo(fp).step(state, now, cost).1
    }

    pub fn reset(&self, fp: &Fingerprint) {
        self.store.remove(fp);
    }

    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.store.sweep(now, &|q, s| q.algo_of(s).is_fresh(s.state, now))
    }

    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Counters summed over the shards, with the store's size.
    pub fn stats(&self) -> Stats {
        let mut out = Stats { keys: self.len(), evicted: self.store.evicted(), ..Stats::default() };
        for index in 0..SHARDS {
            let g = self.store.lock_index(index);
            out.counters.add(&g.extra().counters);
            out.overrides += g.extra().overrides.len();
        }
        out
    }

    /// The `n` tracked keys using the largest share of their limit now, as
    /// (fingerprint, units used, limit), most used first. Walks every shard.
    pub fn top(&self, n: usize) -> Vec<(Fingerprint, u64, u64)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        if n == 0 {
            return Vec::new();
        }
        // Min-heap on (used / limit) compared exactly as used * other_limit.
        #[derive(PartialEq, Eq)]
        struct Entry(u64, u64, [u32; 3]);
        impl Ord for Entry {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                ((self.0 as u128) * (o.1 as u128)).cmp(&((o.0 as u128) * (self.1 as u128))).then(self.2.cmp(&o.2))
            }
        }
        impl PartialOrd for Entry {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(n + 1);
        for index in 0..SHARDS {
            let now = self.clock.now();
            let g = self.store.lock_index(index);
            let q = g.extra();
            for slot in g.slots() {
                let algo = q.algo_of(slot);
                let d = algo.step(slot.state, now, 0).1;
                let used = d.limit.saturating_sub(d.remaining);
                if used == 0 {
                    continue;
                }
                heap.push(Reverse(Entry(used, d.limit.max(1), slot.fp)));
                if heap.len() > n {
                    heap.pop();
                }
            }
        }
        let mut out: Vec<_> = heap.into_iter().map(|Reverse(e)| (Fingerprint(e.2), e.0, e.1)).collect();
        out.sort_by_key(|e| Reverse(Entry(e.1, e.2, e.0 .0)));
        out
    }
}

/// Combines the decisions of a composite's parts: admitted only if every part admits;
/// `limit` and `remaining` from the part with the least remaining; the longest
/// `retry_after`, `reset_after` and `delay`.
pub fn combine(decisions: &[Decision]) -> Decision {
    let mut out = decisions[0];
    for d in &decisions[1..] {
        out.allowed &= d.allowed;
        if d.remaining < out.remaining {
            out.limit = d.limit;
            out.remaining = d.remaining;
        }
        out.reset_after = out.reset_after.max(d.reset_after);
        out.delay = out.delay.max(d.delay);
        out.retry_after = match (out.retry_after, d.retry_after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    if !out.allowed {
        out.delay = 0;
    }
    out
}

/// All-or-nothing check of several limiters for one key: every part's shard is locked
/// (in store-id order, so composites sharing parts cannot deadlock), every part decides,
/// and only if all admit is every part charged. `order` lists part indexes by store id.
pub fn composite_hit(
    parts: &[Arc<Limiter>],
    order: &[usize],
    fp: &Fingerprint,
    costs: &[u64],
    charge: bool,
) -> Decision {
    composite_check(parts, order, fp, costs, charge).0
}

/// [`composite_hit`] that also returns each part's own Decision.
pub fn composite_check(
    parts: &[Arc<Limiter>],
    order: &[usize],
    fp: &Fingerprint,
    costs: &[u64],
    charge: bool,
) -> (Decision, Vec<Decision>) {
    let n = parts.len();
    let mut guards = Vec::with_capacity(n);
    for &i in order {
        guards.push((i, parts[i].store.lock(fp)));
    }
    guards.sort_unstable_by_key(|(i, _)| *i);
    let nows: Vec<u64> = parts.iter().map(|p| p.clock.now()).collect();
    let mut states: Vec<(Option<State>, State)> = Vec::with_capacity(n);
    let mut decisions = Vec::with_capacity(n);
    let mut effective = Vec::with_capacity(n);
    for (i, (_, g)) in guards.iter_mut().enumerate() {
        let (slot, q) = g.slot_and_extra(fp);
        let current = slot.map(|s| s.state);
        let (next, d) = q.algo(fp).step(current.unwrap_or(0), nows[i], costs[i]);
        states.push((current, next));
        decisions.push(d);
        // A part in shadow mode never denies the whole.
        let shadowed = !d.allowed && parts[i].shadow();
        effective.push(if shadowed { Decision { allowed: true, retry_after: Some(0), ..d } } else { d });
        if charge {
            q.counters.count(&d);
            q.counters.shadow_denied += shadowed as u64;
        }
    }
    let decision = combine(&effective);
    if !decision.allowed || !charge {
        return (decision, decisions);
    }
    // Room for the parts that do not track the key yet; all or none.
    let mut reserved: Vec<usize> = Vec::with_capacity(n);
    for (i, (_, g)) in guards.iter_mut().enumerate() {
        if states[i].0.is_none() && decisions[i].allowed {
            let now = nows[i];
            if !g.reserve(now, &|q, s| q.algo_of(s).is_fresh(s.state, now)) {
                for &j in &reserved {
                    parts[j].store.unreserve();
                }
                let mut full = Limiter::full(g.extra().algo(fp));
                full.limit = decision.limit;
                return (full, decisions);
            }
            reserved.push(i);
        }
    }
    for (i, (_, g)) in guards.iter_mut().enumerate() {
        if !decisions[i].allowed {
            continue; // a shadow-mode part that would have denied: not charged
        }
        let next = states[i].1;
        match g.slot(fp) {
            Some(slot) => {
                slot.state = next;
                slot.seen = second_of(nows[i]);
            }
            None => g.insert_reserved(fp, next, nows[i]),
        }
    }
    (decision, decisions)
}

/// Settles earlier charges of one key on several limiters at once: part `i` is charged
/// `deltas[i]` more units (or refunded, when negative) for a call made at `charged_at[i]`.
/// A charge is never lost: a key the store has no room for is tracked anyway.
pub fn composite_adjust(parts: &[Arc<Limiter>], order: &[usize], fp: &Fingerprint, deltas: &[i64], charged_at: &[u64]) {
    let mut guards = Vec::with_capacity(parts.len());
    for &i in order {
        guards.push((i, parts[i].store.lock(fp)));
    }
    guards.sort_unstable_by_key(|(i, _)| *i);
    for (i, (_, g)) in guards.iter_mut().enumerate() {
        if deltas[i] == 0 {
            continue;
        }
        let now = parts[i].clock.now();
        let (slot, q) = g.slot_and_extra(fp);
        let algo = q.algo(fp);
        match slot {
            Some(slot) => {
                slot.state = algo.adjust(slot.state, now, deltas[i], charged_at[i]);
                slot.seen = second_of(now);
            }
            None => {
                let next = algo.adjust(0, now, deltas[i], charged_at[i]);
                if !algo.is_fresh(next, now) {
                    if !g.reserve(now, &|q, s| q.algo_of(s).is_fresh(s.state, now)) {
                        g.force_reserve();
                    }
                    g.insert_reserved(fp, next, now);
                }
            }
        }
    }
}

/// One shard of lease lists: key -> [(lease id, expiry)].
type LeaseShard = CachePadded<Mutex<FingerprintMap<Vec<(u64, u64)>>>>;

/// At most `max` leases held at once per key. A lease ends when released or when its
/// `lease_ttl` runs out, so a holder that crashed cannot leak capacity. A key exists in
/// the map only while it holds leases.
pub struct Concurrency {
    max: AtomicU64,
    pub lease_ttl_ns: u64,
    pub clock: Clock,
    shards: Box<[LeaseShard]>,
    next_id: AtomicU64,
    /// Bumped on every release; blocking acquirers wait on it.
    released: Mutex<u64>,
    wake: Condvar,
}

impl Concurrency {
    pub fn new(max: u64, lease_ttl_secs: f64, clock: Clock) -> Result<Concurrency> {
        if max == 0 {
            return Err(Error::InvalidArgument("the concurrency limit must be at least 1, got 0".into()));
        }
        if !lease_ttl_secs.is_finite() || lease_ttl_secs <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "lease_ttl must be a finite number of seconds above 0, got {lease_ttl_secs}"
            )));
        }
        let shards =
            (0..crate::store::SHARDS).map(|_| CachePadded::new(Mutex::new(FingerprintMap::default()))).collect();
        Ok(Concurrency {
            max: AtomicU64::new(max),
            lease_ttl_ns: crate::clock::secs_to_ns(lease_ttl_secs).max(1),
            clock,
            shards,
            next_id: AtomicU64::new(1),
            released: Mutex::new(0),
            wake: Condvar::new(),
        })
    }

    /// The most leases a key may hold at once.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the limit at run time. Leases already held stay; with a lower limit a key
    /// holding more than it gets no new lease until enough are released.
    pub fn set_max(&self, max: u64) -> Result<()> {
        if max == 0 {
            return Err(Error::InvalidArgument("the concurrency limit must be at least 1, got 0".into()));
        }
        self.max.store(max, Ordering::Relaxed);
        self.wake.notify_all();
        Ok(())
    }

    fn shard(&self, fp: &Fingerprint) -> &Mutex<FingerprintMap<Vec<(u64, u64)>>> {
        &self.shards[fp.shard(self.shards.len())]
    }

    fn decide(&self, leases: &[(u64, u64)], now: u64, adding: bool) -> Decision {
        let held = leases.len() as u64 + adding as u64;
        let max = self.max();
        let allowed = held <= max;
        let last = leases.iter().map(|l| l.1).max().unwrap_or(now);
        let first = leases.iter().map(|l| l.1).min().unwrap_or(now);
        Decision {
            allowed,
            limit: max,
            remaining: max.saturating_sub(if allowed { held } else { leases.len() as u64 }),
            reset_after: if allowed && adding { self.lease_ttl_ns } else { last.saturating_sub(now) },
            retry_after: Some(if allowed { 0 } else { first.saturating_sub(now) }),
            delay: 0,
        }
    }

    /// Takes a lease if fewer than `max` are held; returns its id with the decision.
    pub fn acquire(&self, fp: &Fingerprint) -> (Option<u64>, Decision) {
        let now = self.clock.now();
        let mut map = self.shard(fp).lock();
        let leases = map.entry(*fp).or_default();
        leases.retain(|l| l.1 > now);
        let d = self.decide(leases, now, true);
        let id = if d.allowed {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            leases.push((id, now.saturating_add(self.lease_ttl_ns)));
            Some(id)
        } else {
            None
        };
        if leases.is_empty() {
            map.remove(fp);
        }
        (id, d)
    }

    /// Takes a lease only if one is free *and* `also` agrees, both under this key's lock:
    /// `also` runs (and may charge other limiters) only when a lease is free, and the
    /// lease is taken only if it returns true. Returns the lease id, the concurrency
    /// decision and what `also` returned (None if it did not run).
    pub fn acquire_if<R>(
        &self,
        fp: &Fingerprint,
        also: impl FnOnce() -> (bool, R),
    ) -> (Option<u64>, Decision, Option<R>) {
        let now = self.clock.now();
        let mut map = self.shard(fp).lock();
        let leases = map.entry(*fp).or_default();
        leases.retain(|l| l.1 > now);
        let d = self.decide(leases, now, true);
        let mut out = (None, d, None);
        if d.allowed {
            let (ok, r) = also();
            out.2 = Some(r);
            if ok {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                leases.push((id, now.saturating_add(self.lease_ttl_ns)));
                out.0 = Some(id);
            }
        }
        if leases.is_empty() {
            map.remove(fp);
        }
        out
    }

    /// What `acquire` would decide, taking nothing.
    pub fn peek(&self, fp: &Fingerprint) -> Decision {
        let now = self.clock.now();
        let map = self.shard(fp).lock();
        let live: Vec<(u64, u64)> =
            map.get(fp).map(|v| v.iter().copied().filter(|l| l.1 > now).collect()).unwrap_or_default();
        self.decide(&live, now, true)
    }

    /// Ends a lease. False when it had already ended (released, expired or reset).
    pub fn release(&self, fp: &Fingerprint, id: u64) -> bool {
        let now = self.clock.now();
        let found = {
            let mut map = self.shard(fp).lock();
            let Some(leases) = map.get_mut(fp) else {
                return false;
            };
            let found = leases.iter().any(|l| l.0 == id && l.1 > now);
            leases.retain(|l| l.0 != id);
            let live = leases.iter().any(|l| l.1 > now);
            if !live {
                map.remove(fp);
            }
            found
        };
        if found {
            *self.released.lock() += 1;
            self.wake.notify_all();
        }
        found
    }

    /// Ends every lease of the key.
    pub fn reset(&self, fp: &Fingerprint) {
        self.shard(fp).lock().remove(fp);
        *self.released.lock() += 1;
        self.wake.notify_all();
    }

    /// Keys currently holding leases (including leases expired but not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired leases and the keys left without any; returns the keys dropped.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, leases| {
                leases.retain(|l| l.1 > now);
                !leases.is_empty()
            });
            dropped += before - map.len();
        }
        dropped
    }

    /// Waits until some lease is released or `timeout_ns` passes (real time).
    pub fn wait_for_release(&self, timeout_ns: u64) {
        let mut seen = self.released.lock();
        let start = *seen;
        let deadline = std::time::Instant::now() + std::time::Duration::from_nanos(timeout_ns);
        while *seen == start {
            if self.wake.wait_until(&mut seen, deadline).timed_out() {
                break;
            }
        }
    }
}

/// Seconds in a nanosecond count, for messages.
pub fn secs(ns: u64) -> f64 {
    ns as f64 / NANOS as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::{FixedWindow, Gcra};
    use crate::clock::ManualClock;
    use crate::key::{fingerprint, KeyKind};
    use crate::rate::Rate;

    fn fp(s: &str) -> Fingerprint {
        fingerprint(KeyKind::Str, s.as_bytes())
    }

    fn token_bucket(rate: &str, burst: u64, clock: &ManualClock) -> Limiter {
        let algo = Algorithm::TokenBucket(Gcra::new(Rate::parse(rate).unwrap(), burst).unwrap());
        Limiter::new(algo, Clock::Manual(clock.clone()), 3600.0, None).unwrap()
    }

    #[test]
    fn keys_are_isolated_and_denials_do_not_charge() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("2/s", 2, &clock);
        assert!(tb.hit(&fp("a"), 2).allowed);
        assert!(!tb.hit(&fp("a"), 1).allowed);
        assert!(tb.hit(&fp("b"), 2).allowed);
        assert_eq!(tb.len(), 2);
        clock.advance(NANOS / 2);
        assert!(tb.hit(&fp("a"), 1).allowed);
        assert!(!tb.peek(&fp("a"), 1).allowed);
        tb.reset(&fp("a"));
        assert_eq!(tb.peek(&fp("a"), 1).remaining, 1);
        assert_eq!(tb.len(), 1);
    }

    #[test]
    fn ttl_is_raised_to_time_to_fresh() {
        let clock = ManualClock::new(0);
        let algo = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("5/day").unwrap()).unwrap());
        let l = Limiter::new(algo, Clock::Manual(clock), 60.0, None).unwrap();
        assert_eq!(l.ttl_ns(), 86_400 * NANOS);
        assert!(effective_ttl(0.0, 1).is_err());
        assert!(effective_ttl(f64::NAN, 1).is_err());
        assert!(effective_ttl(-1.0, 1).is_err());
    }

    #[test]
    fn sweep_never_changes_a_decision() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("1/s", 10, &clock);
        tb.hit(&fp("busy"), 10);
        tb.hit(&fp("idle"), 1);
        clock.advance(3601 * NANOS);
        assert_eq!(tb.sweep(), 2);
        assert_eq!(tb.len(), 0);
    }

    #[test]
    fn max_keys_denies_new_keys_only() {
        let clock = ManualClock::new(0);
        let algo = Algorithm::TokenBucket(Gcra::new(Rate::parse("1/minute").unwrap(), 5).unwrap());
        let l = Limiter::new(algo, Clock::Manual(clock.clone()), 3600.0, Some(3)).unwrap();
        for k in ["a", "b", "c"] {
            assert!(l.hit(&fp(k), 5).allowed);
        }
        let d = l.hit(&fp("d"), 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(300 * NANOS));
        // Denied and peeked calls of new keys take no room.
        assert!(!l.hit(&fp("e"), 6).allowed);
        assert_eq!(l.len(), 3);
        // Once the tracked keys are fresh again they make room.
        clock.advance(300 * NANOS);
        assert!(l.hit(&fp("d"), 1).allowed);
        assert!(l.len() <= 3);
    }

    #[test]
    fn composite_is_all_or_nothing() {
        let clock = ManualClock::new(0);
        let a = token_bucket("10/s", 10, &clock);
        let b = Limiter::new(
            Algorithm::FixedWindow(FixedWindow::new(Rate::parse("3/minute").unwrap()).unwrap()),
            Clock::Manual(clock.clone()),
            3600.0,
            None,
        )
        .unwrap();
        let (a, b) = (Arc::new(a), Arc::new(b));
        let parts = [Arc::clone(&a), Arc::clone(&b)];
        let k = fp("k");
        for _ in 0..3 {
            assert!(composite_hit(&parts, &[0, 1], &k, &[1, 1], true).allowed);
        }
        let d = composite_hit(&parts, &[0, 1], &k, &[1, 1], true);
        assert!(!d.allowed);
        assert_eq!(d.limit, 3);
        assert_eq!(d.retry_after, Some(60 * NANOS));
        // The token bucket was not charged by the denied composite call.
        assert_eq!(a.peek(&k, 1).remaining, 6);
    }

    #[test]
    fn composite_adjust_settles_every_part() {
        let clock = ManualClock::new(0);
        let tokens = Arc::new(token_bucket("100/minute", 100, &clock));
        let daily = Arc::new(
            Limiter::new(
                Algorithm::FixedWindow(FixedWindow::new(Rate::parse("1000/day").unwrap()).unwrap()),
                Clock::Manual(clock.clone()),
                3600.0,
                None,
            )
            .unwrap(),
        );
        let parts = [Arc::clone(&tokens), Arc::clone(&daily)];
        let k = fp("k");
        let (d, each) = composite_check(&parts, &[0, 1], &k, &[60, 60], true);
        assert!(d.allowed && each.len() == 2);
        composite_adjust(&parts, &[0, 1], &k, &[-50, -50], &[0, 0]);
        assert_eq!(tokens.peek(&k, 0).remaining, 90);
        assert_eq!(daily.peek(&k, 0).remaining, 990);
        composite_adjust(&parts, &[0, 1], &k, &[200, 200], &[0, 0]);
        assert!(!tokens.peek(&k, 1).allowed, "an actual cost above the estimate puts the key in debt");
        assert_eq!(daily.peek(&k, 0).remaining, 790);
        // A charge for a key nobody tracks yet is kept.
        composite_adjust(&parts, &[0, 1], &fp("new"), &[0, 5], &[0, 0]);
        assert_eq!(daily.peek(&fp("new"), 0).remaining, 995);
    }

    #[test]
    fn acquire_if_is_all_or_nothing() {
        let clock = ManualClock::new(0);
        let c = Concurrency::new(1, 10.0, Clock::Manual(clock)).unwrap();
        let k = fp("k");
        let (id, d, ran) = c.acquire_if(&k, || (false, 7));
        assert!(id.is_none() && d.allowed && ran == Some(7));
        assert!(c.is_empty(), "refused by the other limits: no lease taken");
        let (id, _, _) = c.acquire_if(&k, || (true, ()));
        assert!(id.is_some());
        let (id, d, ran) = c.acquire_if(&k, || (true, ()));
        assert!(id.is_none() && !d.allowed && ran.is_none());
    }

    #[test]
    fn concurrency_leases() {
        let clock = ManualClock::new(0);
        let c = Concurrency::new(2, 10.0, Clock::Manual(clock.clone())).unwrap();
        let k = fp("k");
        let (a, d) = c.acquire(&k);
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
        let (b, _) = c.acquire(&k);
        let (none, d) = c.acquire(&k);
        assert!(none.is_none());
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(10 * NANOS));
        assert!(c.release(&k, a.unwrap()));
        assert!(!c.release(&k, a.unwrap()));
        assert!(c.acquire(&k).0.is_some());
        // Expired leases free their places.
        clock.advance(10 * NANOS);
        assert!(c.peek(&k).allowed);
        assert_eq!(c.peek(&k).remaining, 1);
        assert_eq!(c.sweep(), 1);
        assert!(!c.release(&k, b.unwrap()), "an expired lease is already gone");
        assert!(c.is_empty());
    }

    #[test]
    fn threads_admit_exactly_the_quota() {
        let clock = ManualClock::new(0);
        let tb = Arc::new(token_bucket("1000/hour", 1000, &clock));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let tb = Arc::clone(&tb);
                std::thread::spawn(move || (0..1000).filter(|_| tb.hit(&fp("hot"), 1).allowed).count())
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn set_quota_keeps_usage_and_is_per_key() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("10/s", 10, &clock);
        assert!(tb.hit(&fp("a"), 8).allowed);
        assert!(tb.hit(&fp("b"), 8).allowed);
        // Shrinking: "a" has used 8 units, the new burst is 5: denied until 3 refilled+.
        let small = Algorithm::TokenBucket(Gcra::new(Rate::parse("1/s").unwrap(), 5).unwrap());
        tb.set_quota(&fp("a"), small.clone()).unwrap();
        let d = tb.peek(&fp("a"), 1);
        assert!(!d.allowed);
        assert_eq!(d.limit, 5);
        assert_eq!(d.retry_after, Some(4 * NANOS), "8 used of 5: 4 units must drain at 1/s");
        // "b" is untouched.
        assert_eq!(tb.peek(&fp("b"), 0).remaining, 2);
        let (own, is_own) = tb.quota_of(&fp("a"));
        assert_eq!((own.limit(), own.rate(), is_own), (small.limit(), small.rate(), true));
        // Growing back: 8 used of 10 again.
        assert!(tb.clear_quota(&fp("a")));
        assert!(!tb.clear_quota(&fp("a")));
        assert_eq!(tb.peek(&fp("a"), 0).remaining, 2);
        // A key with its own quota before its first call starts fresh under it.
        let big = Algorithm::TokenBucket(Gcra::new(Rate::parse("100/s").unwrap(), 100).unwrap());
        tb.set_quota(&fp("new"), big).unwrap();
        assert_eq!(tb.hit(&fp("new"), 50).remaining, 50);
        assert_eq!(tb.stats().overrides, 1);
        // Another algorithm is refused.
        let fixed = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("5/s").unwrap()).unwrap());
        assert!(tb.set_quota(&fp("a"), fixed.clone()).is_err());
        assert!(tb.set_default(fixed).is_err());
    }

    #[test]
    fn set_default_converts_every_key_without_its_own_quota() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("10/minute", 10, &clock);
        for i in 0..1000 {
            tb.hit(&fp(&i.to_string()), 4);
        }
        let own = Algorithm::TokenBucket(Gcra::new(Rate::parse("1/minute").unwrap(), 100).unwrap());
        tb.set_quota(&fp("7"), own).unwrap();
        tb.set_default(Algorithm::TokenBucket(Gcra::new(Rate::parse("20/minute").unwrap(), 20).unwrap())).unwrap();
        for i in 0..1000 {
            let d = tb.peek(&fp(&i.to_string()), 0);
            if i == 7 {
                assert_eq!((d.limit, d.remaining), (100, 96));
            } else {
                assert_eq!((d.limit, d.remaining), (20, 16), "key {i}");
            }
        }
        // Fresh keys get the new default.
        assert_eq!(tb.hit(&fp("fresh"), 1).remaining, 19);
        // The ttl grows with a quota that takes longer to refill.
        tb.set_default(Algorithm::TokenBucket(Gcra::new(Rate::parse("1/day").unwrap(), 1).unwrap())).unwrap();
        assert_eq!(tb.ttl_ns(), 86_400 * NANOS);
    }

    #[test]
    fn window_quotas_carry_the_current_count() {
        let clock = ManualClock::new(0);
        let algo = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("10/minute").unwrap()).unwrap());
        let l = Limiter::new(algo, Clock::Manual(clock.clone()), 3600.0, None).unwrap();
        clock.advance(10 * NANOS);
        assert!(l.hit(&fp("k"), 6).allowed);
        let same_period = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("5/minute").unwrap()).unwrap());
        l.set_quota(&fp("k"), same_period).unwrap();
        assert!(!l.peek(&fp("k"), 1).allowed, "6 used of 5");
        let hourly = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("100/hour").unwrap()).unwrap());
        l.set_quota(&fp("k"), hourly).unwrap();
        assert_eq!(l.peek(&fp("k"), 0).remaining, 94);
        let sliding =
            |r: &str| Algorithm::SlidingWindow(crate::algorithms::SlidingWindow::new(Rate::parse(r).unwrap()).unwrap());
        let sw = Limiter::new(sliding("10/minute"), Clock::Manual(clock.clone()), 3600.0, None).unwrap();
        assert!(sw.hit(&fp("k"), 6).allowed);
        clock.advance(60 * NANOS); // 6 now in the previous window, weighted by 5/6 (50 s left of 60)
        sw.set_quota(&fp("k"), sliding("10/hour")).unwrap();
        assert_eq!(sw.peek(&fp("k"), 0).remaining, 5, "ceil(6 * 50/60) = 5 used");
    }

    #[test]
    fn shadow_mode_admits_and_counts() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("2/minute", 2, &clock);
        tb.set_shadow(true);
        let mut shadowed = 0;
        for _ in 0..5 {
            let (d, s) = tb.check(&fp("a"), 1);
            assert!(d.allowed);
            shadowed += s as u32;
        }
        assert_eq!(shadowed, 3);
        let st = tb.stats();
        assert_eq!((st.counters.allowed, st.counters.denied, st.counters.shadow_denied), (2, 3, 3));
        assert_eq!(st.counters.near_limit, 1, "0 of 2 left is near the limit, 1 of 2 is not");
        tb.set_shadow(false);
        assert!(!tb.hit(&fp("a"), 1).allowed);
    }

    #[test]
    fn top_lists_the_most_used_keys() {
        let clock = ManualClock::new(0);
        let tb = token_bucket("100/day", 100, &clock);
        for i in 1..=50u64 {
            tb.hit(&fp(&i.to_string()), i);
        }
        let top = tb.top(3);
        assert_eq!(top.iter().map(|t| t.1).collect::<Vec<_>>(), vec![50, 49, 48]);
        assert_eq!(top[0].0, fp("50"));
        assert!(tb.top(0).is_empty());
        assert_eq!(tb.top(100).len(), 50);
    }
}
