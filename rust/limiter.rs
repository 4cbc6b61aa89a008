//! Limiters: an algorithm bound to a store and a clock, composites of them, and
//! concurrency leases.

use crate::algorithms::{Algorithm, Decision, State};
use crate::clock::{Clock, NANOS};
use crate::error::{Error, Result};
use crate::key::{Fingerprint, FingerprintMap};
use crate::store::{second_of, ShardGuard, Slot, Store, SHARDS};
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

    pub fn add(&mut self, o: &Counters) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.near_limit += o.near_limit;
        self.shadow_denied += o.shadow_denied;
    }

    /// Counts a decision and applies shadow mode: a denial of a limiter in shadow mode
    /// becomes an admission (charging nothing), and the denial is kept for the log.
    #[inline(always)]
    pub fn judge(&mut self, d: Decision, shadow: bool) -> Checked {
        self.count(&d);
        if !d.allowed && shadow {
            self.shadow_denied += 1;
            return Checked { decision: shadow_admitted(d), shadowed: Some(d) };
        }
        Checked { decision: d, shadowed: None }
    }
}

/// The outcome of a check: the decision given and, when a limiter in shadow mode admitted
/// a call it would have denied, the denial it would have given (for the log: its
/// `retry_after` is the one that matters, the admission's is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub shadowed: Option<Decision>,
}

/// What a limiter in shadow mode answers instead of the denial `d`.
#[inline]
pub fn shadow_admitted(d: Decision) -> Decision {
    Decision { allowed: true, retry_after: Some(0), ..d }
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
        let algo = algo.bound(clock.epoch_offset());
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
        let algo = algo.bound(self.clock.epoch_offset());
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
        let algo = algo.bound(self.clock.epoch_offset());
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
    /// would be denied is admitted (and not charged); `shadowed` tells when that happened.
    #[inline(always)]
    pub fn check(&self, fp: &Fingerprint, cost: u64) -> Checked {
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
        g.extra_mut().counters.judge(d, self.shadow.load(Ordering::Relaxed))
    }

    #[inline]
    pub fn hit(&self, fp: &Fingerprint, cost: u64) -> Decision {
        self.check(fp, cost).decision
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
    /// (fingerprint, units used, limit), most used first. Walks every shard, one at a
    /// time, collecting only keys with some usage.
    pub fn top(&self, n: usize) -> Vec<(Fingerprint, u64, u64)> {
        if n == 0 {
            return Vec::new();
        }
        let mut used = Vec::new();
        for index in 0..SHARDS {
            let now = self.clock.now();
            let g = self.store.lock_index(index);
            let q = g.extra();
            for slot in g.slots() {
                let d = q.algo_of(slot).step(slot.state, now, 0).1;
                let u = d.limit.saturating_sub(d.remaining);
                if u > 0 {
                    used.push((Fingerprint(slot.fp), u, d.limit));
                }
            }
            // Keep memory bounded by n, not by the number of keys.
            if used.len() > 4 * n + 1024 {
                used = top_n(used.into_iter(), n);
            }
        }
        top_n(used.into_iter(), n)
    }
}

/// Combines the decisions of a composite's parts: admitted only if every part admits;
/// `limit` and `remaining` from the part with the least remaining; the longest
/// `retry_after`, `reset_after` and `delay`.
pub fn combine(decisions: &[Decision]) -> Decision {
    let out = decisions[1..].iter().fold(decisions[0], combine_two);
    combined(out)
}

#[inline]
fn combine_two(mut out: Decision, d: &Decision) -> Decision {
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
    out
}

/// The last touch of [`combine`]: a denied call has nothing to wait for.
#[inline]
fn combined(mut out: Decision) -> Decision {
    if !out.allowed {
        out.delay = 0;
    }
    out
}

/// All-or-nothing check of several limiters for one key: every part's shard is locked
/// (in store-id order, so composites sharing parts cannot deadlock), every part decides,
/// and only if all admit is every part charged. `order` lists part indexes by store id.
/// Every part must read the same clock (read once per check).
pub fn composite_hit(
    parts: &[Arc<Limiter>],
    order: &[usize],
    fp: &Fingerprint,
    costs: &[u64],
    charge: bool,
) -> Decision {
    composite_run(parts, order, fp, costs, charge, None)
}

/// [`composite_hit`] that also returns each part's own Decision.
pub fn composite_check(
    parts: &[Arc<Limiter>],
    order: &[usize],
    fp: &Fingerprint,
    costs: &[u64],
    charge: bool,
) -> (Decision, Vec<Decision>) {
    let mut each = Vec::with_capacity(parts.len());
    let d = composite_run(parts, order, fp, costs, charge, Some(&mut each));
    (d, each)
}

/// One part of a composite check, under its shard's lock.
struct Step<'a> {
    index: usize,
    guard: ShardGuard<'a, Quotas>,
    tracked: bool,
    next: State,
    decision: Decision,
    reserved: bool,
}

/// The composite check itself, with one allocation (the parts' steps).
#[inline]
fn composite_run(
    parts: &[Arc<Limiter>],
    order: &[usize],
    fp: &Fingerprint,
    costs: &[u64],
    charge: bool,
    each: Option<&mut Vec<Decision>>,
) -> Decision {
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(parts.len());
    for &i in order {
        let guard = parts[i].store.lock(fp);
        let decision = Decision::never(0, 0, 0);
        steps.push(Step { index: i, guard, tracked: false, next: 0, decision, reserved: false });
    }
    steps.sort_unstable_by_key(|s| s.index);
    let now = parts[0].clock.now();
    let mut whole: Option<Decision> = None;
    for s in steps.iter_mut() {
        let (slot, q) = s.guard.slot_and_extra(fp);
        s.tracked = slot.is_some();
        let (next, d) = q.algo(fp).step(slot.map_or(0, |x| x.state), now, costs[s.index]);
        s.next = next;
        s.decision = d;
        // A part in shadow mode never denies the whole.
        let shadowed = !d.allowed && parts[s.index].shadow();
        let effective = if shadowed { shadow_admitted(d) } else { d };
        whole = Some(match whole {
            None => effective,
            Some(w) => combine_two(w, &effective),
        });
        if charge {
            q.counters.count(&d);
            q.counters.shadow_denied += shadowed as u64;
        }
    }
    if let Some(each) = each {
        each.extend(steps.iter().map(|s| s.decision));
    }
    let decision = combined(whole.expect("a composite has at least one part"));
    if !decision.allowed || !charge {
        return decision;
    }
    // Room for the parts that do not track the key yet; all or none.
    for i in 0..steps.len() {
        let s = &mut steps[i];
        if !s.tracked && s.decision.allowed {
            if !s.guard.reserve(now, &|q, x| q.algo_of(x).is_fresh(x.state, now)) {
                let mut full = Limiter::full(s.guard.extra().algo(fp));
                full.limit = decision.limit;
                for r in steps.iter().filter(|r| r.reserved) {
                    parts[r.index].store.unreserve();
                }
                return full;
            }
            s.reserved = true;
        }
    }
    for s in steps.iter_mut() {
        if !s.decision.allowed {
            continue; // a shadow-mode part that would have denied: not charged
        }
        match s.guard.slot(fp) {
            Some(slot) => {
                slot.state = s.next;
                slot.seen = second_of(now);
            }
            None => s.guard.insert_reserved(fp, s.next, now),
        }
    }
    decision
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

/// The most parts a [`Composite`] takes.
pub const MAX_PARTS: usize = 64;

/// Counters kept with atomics, for limiters whose checks hold no lock of their own.
#[derive(Default)]
struct AtomicCounters {
    allowed: AtomicU64,
    denied: AtomicU64,
    near_limit: AtomicU64,
    shadow_denied: AtomicU64,
}

impl AtomicCounters {
    #[inline]
    fn judge(&self, d: Decision, shadow: bool) -> Checked {
        let mut c = Counters::default();
        let out = c.judge(d, shadow);
        for (n, a) in [
            (c.allowed, &self.allowed),
            (c.denied, &self.denied),
            (c.near_limit, &self.near_limit),
            (c.shadow_denied, &self.shadow_denied),
        ] {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        out
    }

    fn get(&self) -> Counters {
        Counters {
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            near_limit: self.near_limit.load(Ordering::Relaxed),
            shadow_denied: self.shadow_denied.load(Ordering::Relaxed),
        }
    }
}

/// Several limiters on one key, all or nothing (see [`composite_check`]), with its own
/// counters and shadow mode. Its parts keep theirs: a part in shadow mode never denies
/// the whole; a composite in shadow mode never denies at all.
pub struct Composite {
    parts: Vec<Arc<Limiter>>,
    /// Part indexes sorted by store id: the order shards are locked in.
    order: Vec<usize>,
    shadow: AtomicBool,
    counters: CachePadded<AtomicCounters>,
}

impl Composite {
    /// Checks the parts: at least one, at most [`MAX_PARTS`], none twice, one clock.
    pub fn new(parts: Vec<Arc<Limiter>>) -> Result<Composite> {
        if parts.is_empty() {
            return Err(Error::InvalidArgument("Composite needs at least one limiter".into()));
        }
        if parts.len() > MAX_PARTS {
            return Err(Error::InvalidArgument(format!("Composite takes at most {MAX_PARTS} limiters")));
        }
        for (i, p) in parts.iter().enumerate() {
            if parts[..i].iter().any(|q| q.store.id() == p.store.id()) {
                return Err(Error::InvalidArgument("the same limiter appears twice in Composite".into()));
            }
        }
        if !parts.iter().all(|p| p.clock.same(&parts[0].clock)) {
            return Err(Error::InvalidArgument("all Composite parts must use the same clock".into()));
        }
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by_key(|&i| parts[i].store.id());
        Ok(Composite { parts, order, shadow: AtomicBool::new(false), counters: Default::default() })
    }

    pub fn parts(&self) -> &[Arc<Limiter>] {
        &self.parts
    }

    /// Decides (and with `charge`, charges every part or none) a call of `cost` units on
    /// every part. Only a charging check counts and applies shadow mode, like `peek`.
    #[inline]
    pub fn check(&self, fp: &Fingerprint, cost: u64, charge: bool) -> Checked {
        let costs = [cost; MAX_PARTS];
        let d = composite_hit(&self.parts, &self.order, fp, &costs[..self.parts.len()], charge);
        if !charge {
            return Checked { decision: d, shadowed: None };
        }
        self.counters.judge(d, self.shadow())
    }

    /// [`check`](Self::check) charging, also returning each part's own Decision.
    pub fn check_each(&self, fp: &Fingerprint, cost: u64) -> (Checked, Vec<Decision>) {
        let costs = [cost; MAX_PARTS];
        let (d, each) = composite_check(&self.parts, &self.order, fp, &costs[..self.parts.len()], true);
        (self.counters.judge(d, self.shadow()), each)
    }

    pub fn reset(&self, fp: &Fingerprint) {
        for p in &self.parts {
            p.reset(fp);
        }
    }

    pub fn sweep(&self) -> usize {
        self.parts.iter().map(|p| p.sweep()).sum()
    }

    /// Keys tracked by the busiest part.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest default capacity of the parts.
    pub fn limit(&self) -> u64 {
        self.parts.iter().map(|p| p.algo().limit()).min().unwrap_or(0)
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

    /// The `n` keys using the largest share of their limit in any of `parts`, as
    /// (fingerprint, units used, limit) of the part where the share is largest. A key in
    /// the top `n` of none of the parts cannot be in the top `n` of the whole.
    pub fn top_of(parts: &[Arc<Limiter>], n: usize) -> Vec<(Fingerprint, u64, u64)> {
        let mut best: FingerprintMap<(u64, u64)> = FingerprintMap::default();
        for p in parts {
            for (fp, used, limit) in p.top(n) {
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

/// The `n` entries using the largest share of their limit, most used first, from
/// (fingerprint, units used, limit) triples (`limit` at least 1, `used` above 0).
fn top_n(entries: impl Iterator<Item = (Fingerprint, u64, u64)>, n: usize) -> Vec<(Fingerprint, u64, u64)> {
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
    for (fp, used, limit) in entries {
        heap.push(Reverse(Entry(used, limit.max(1), fp.0)));
        if heap.len() > n {
            heap.pop();
        }
    }
    let mut out: Vec<_> = heap.into_iter().map(|Reverse(e)| e).collect();
    out.sort_by(|a, b| b.cmp(a));
    out.into_iter().map(|e| (Fingerprint(e.2), e.0, e.1)).collect()
}

/// One shard of a [`Concurrency`]: the leases of its keys and what is counted about them.
#[derive(Default)]
struct LeaseShard {
    /// key -> [(lease id, expiry)]; a key is here only while it holds leases.
    leases: FingerprintMap<Vec<(u64, u64)>>,
    /// Keys with a limit of their own.
    limits: FingerprintMap<u64>,
    counters: Counters,
    /// Leases that ended by running out their `lease_ttl`.
    expired: u64,
    /// Leases ended because their holder dropped the handle without releasing it.
    dropped: u64,
}

impl LeaseShard {
    /// Drops the key's expired leases; true if it holds none left.
    fn prune(&mut self, fp: &Fingerprint, now: u64) -> bool {
        let Some(leases) = self.leases.get_mut(fp) else { return true };
        let before = leases.len();
        leases.retain(|l| l.1 > now);
        self.expired += (before - leases.len()) as u64;
        if leases.is_empty() {
            self.leases.remove(fp);
            return true;
        }
        false
    }
}

/// The lease id a [`Concurrency`] in shadow mode gives for a call it would have denied:
/// no place is held for it, and releasing it does nothing.
pub const SHADOW_LEASE: u64 = 0;

/// What a [`Concurrency`] counts, with its size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConcurrencyStats {
    pub counters: Counters,
    /// Keys holding leases now (including leases expired but not yet swept).
    pub keys: usize,
    /// Leases held now (live ones only).
    pub held: u64,
    pub expired: u64,
    pub dropped: u64,
    pub overrides: usize,
}

/// At most `max` leases held at once per key (or the key's own limit). A lease ends when
/// released or when its `lease_ttl` runs out, so a holder that crashed cannot leak
/// capacity. A key exists in the map only while it holds leases.
pub struct Concurrency {
    max: AtomicU64,
    pub lease_ttl_ns: u64,
    pub clock: Clock,
    shards: Box<[CachePadded<Mutex<LeaseShard>>]>,
    next_id: AtomicU64,
    shadow: AtomicBool,
    /// Bumped on every release; blocking acquirers wait on it.
    released: Mutex<u64>,
    wake: Condvar,
}

fn check_limit(max: u64) -> Result<u64> {
    if max == 0 {
        return Err(Error::InvalidArgument("the concurrency limit must be at least 1, got 0".into()));
    }
    Ok(max)
}

impl Concurrency {
    pub fn new(max: u64, lease_ttl_secs: f64, clock: Clock) -> Result<Concurrency> {
        check_limit(max)?;
        if !lease_ttl_secs.is_finite() || lease_ttl_secs <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "lease_ttl must be a finite number of seconds above 0, got {lease_ttl_secs}"
            )));
        }
        let shards = (0..crate::store::SHARDS).map(|_| CachePadded::new(Mutex::new(LeaseShard::default()))).collect();
        Ok(Concurrency {
            max: AtomicU64::new(max),
            lease_ttl_ns: crate::clock::secs_to_ns(lease_ttl_secs).max(1),
            clock,
            shards,
            // Ids start at 1: SHADOW_LEASE (0) is never a held lease.
            next_id: AtomicU64::new(1),
            shadow: AtomicBool::new(false),
            released: Mutex::new(0),
            wake: Condvar::new(),
        })
    }

    /// The most leases a key without a limit of its own may hold at once.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the default limit at run time. Leases already held stay; with a lower
    /// limit a key holding more than it gets no new lease until enough are released.
    pub fn set_max(&self, max: u64) -> Result<()> {
        self.max.store(check_limit(max)?, Ordering::Relaxed);
        self.wake_waiters();
        Ok(())
    }

    /// Gives one key a limit of its own, from its next acquire on (leases held stay).
    pub fn set_quota(&self, fp: &Fingerprint, max: u64) -> Result<()> {
        check_limit(max)?;
        self.shard(fp).lock().limits.insert(*fp, max);
        self.wake_waiters();
        Ok(())
    }

    /// Puts a key back on the default limit. False when it had none of its own.
    pub fn clear_quota(&self, fp: &Fingerprint) -> bool {
        let had = self.shard(fp).lock().limits.remove(fp).is_some();
        if had {
            self.wake_waiters();
        }
        had
    }

    /// The limit in force for a key, and whether it is the key's own.
    pub fn quota_of(&self, fp: &Fingerprint) -> (u64, bool) {
        match self.shard(fp).lock().limits.get(fp) {
            Some(&n) => (n, true),
            None => (self.max(), false),
        }
    }

    pub fn shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    pub fn set_shadow(&self, on: bool) {
        self.shadow.store(on, Ordering::Relaxed)
    }

    fn shard(&self, fp: &Fingerprint) -> &Mutex<LeaseShard> {
        &self.shards[fp.shard(self.shards.len())]
    }

    fn wake_waiters(&self) {
        *self.released.lock() += 1;
        self.wake.notify_all();
    }

    fn decide(&self, leases: &[(u64, u64)], now: u64, adding: bool, max: u64) -> Decision {
        let held = leases.len() as u64 + adding as u64;
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

    /// Takes a lease if fewer than the key's limit are held; returns its id with the
    /// decision, counted. In shadow mode a call that would be denied is admitted with
    /// the id [`SHADOW_LEASE`], holding no place.
    pub fn acquire(&self, fp: &Fingerprint) -> (Option<u64>, Checked) {
        let now = self.clock.now();
        let mut shard = self.shard(fp).lock();
        shard.prune(fp, now);
        let max = shard.limits.get(fp).copied().unwrap_or_else(|| self.max());
        let leases = shard.leases.get(fp).map_or(&[][..], |v| &v[..]);
        let d = self.decide(leases, now, true, max);
        let id = if d.allowed {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            shard.leases.entry(*fp).or_default().push((id, now.saturating_add(self.lease_ttl_ns)));
            Some(id)
        } else {
            None
        };
        let checked = shard.counters.judge(d, self.shadow());
        match (id, checked.shadowed) {
            (None, Some(_)) => (Some(SHADOW_LEASE), checked),
            _ => (id, checked),
        }
    }

    /// Takes a lease only if one is free *and* `also` agrees, both under this key's lock:
    /// `also` runs (and may charge other limiters) only when a lease is free, and the
    /// lease is taken only if it returns true. Returns the lease id, the concurrency
    /// decision and what `also` returned (None if it did not run). Not counted, and not
    /// in shadow mode: the caller (a `TokenLimiter`) counts its own.
    pub fn acquire_if<R>(
        &self,
        fp: &Fingerprint,
        also: impl FnOnce() -> (bool, R),
    ) -> (Option<u64>, Decision, Option<R>) {
        let now = self.clock.now();
        let mut shard = self.shard(fp).lock();
        shard.prune(fp, now);
        let max = shard.limits.get(fp).copied().unwrap_or_else(|| self.max());
        let leases = shard.leases.get(fp).map_or(&[][..], |v| &v[..]);
        let d = self.decide(leases, now, true, max);
        let mut out = (None, d, None);
        if d.allowed {
            let (ok, r) = also();
            out.2 = Some(r);
            if ok {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                shard.leases.entry(*fp).or_default().push((id, now.saturating_add(self.lease_ttl_ns)));
                out.0 = Some(id);
            }
        }
        out
    }

    /// What `acquire` would decide, taking nothing.
    pub fn peek(&self, fp: &Fingerprint) -> Decision {
        let now = self.clock.now();
        let shard = self.shard(fp).lock();
        let max = shard.limits.get(fp).copied().unwrap_or_else(|| self.max());
        let live: Vec<(u64, u64)> =
            shard.leases.get(fp).map(|v| v.iter().copied().filter(|l| l.1 > now).collect()).unwrap_or_default();
        self.decide(&live, now, true, max)
    }

    /// Leases the key holds now (live ones).
    pub fn held(&self, fp: &Fingerprint) -> u64 {
        let now = self.clock.now();
        let shard = self.shard(fp).lock();
        shard.leases.get(fp).map_or(0, |v| v.iter().filter(|l| l.1 > now).count() as u64)
    }

    /// Ends a lease. False when it had already ended (released, expired or reset), or
    /// was a [`SHADOW_LEASE`].
    pub fn release(&self, fp: &Fingerprint, id: u64) -> bool {
        self.end(fp, id, false)
    }

    /// Ends a lease whose holder dropped it without releasing it (counted apart).
    pub fn release_dropped(&self, fp: &Fingerprint, id: u64) -> bool {
        self.end(fp, id, true)
    }

    fn end(&self, fp: &Fingerprint, id: u64, dropped: bool) -> bool {
        if id == SHADOW_LEASE {
            return false;
        }
        let now = self.clock.now();
        let found = {
            let mut shard = self.shard(fp).lock();
            let Some(leases) = shard.leases.get_mut(fp) else {
                return false;
            };
            let found = leases.iter().any(|l| l.0 == id && l.1 > now);
            leases.retain(|l| l.0 != id);
            shard.dropped += (found && dropped) as u64;
            shard.prune(fp, now);
            found
        };
        if found {
            self.wake_waiters();
        }
        found
    }

    /// Ends every lease of the key.
    pub fn reset(&self, fp: &Fingerprint) {
        self.shard(fp).lock().leases.remove(fp);
        self.wake_waiters();
    }

    /// Keys currently holding leases (including leases expired but not yet swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().leases.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired leases and the keys left without any; returns the keys dropped.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let shard = &mut *shard;
            let before = shard.leases.len();
            let mut expired = 0;
            shard.leases.retain(|_, leases| {
                let n = leases.len();
                leases.retain(|l| l.1 > now);
                expired += (n - leases.len()) as u64;
                !leases.is_empty()
            });
            shard.expired += expired;
            dropped += before - shard.leases.len();
        }
        dropped
    }

    /// Counters and sizes, summed over the shards (one locked at a time).
    pub fn stats(&self) -> ConcurrencyStats {
        let now = self.clock.now();
        let mut out = ConcurrencyStats::default();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            out.counters.add(&shard.counters);
            out.keys += shard.leases.len();
            out.held += shard.leases.values().map(|v| v.iter().filter(|l| l.1 > now).count() as u64).sum::<u64>();
            out.expired += shard.expired;
            out.dropped += shard.dropped;
            out.overrides += shard.limits.len();
        }
        out
    }

    /// The `n` keys holding the largest share of their limit now, as (fingerprint, leases
    /// held, limit), most used first.
    pub fn top(&self, n: usize) -> Vec<(Fingerprint, u64, u64)> {
        let now = self.clock.now();
        let max = self.max();
        let mut held = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (fp, leases) in shard.leases.iter() {
                let live = leases.iter().filter(|l| l.1 > now).count() as u64;
                if live > 0 {
                    held.push((*fp, live, shard.limits.get(fp).copied().unwrap_or(max)));
                }
            }
        }
        top_n(held.into_iter(), n)
    }

    /// Waits until some lease is released (or a limit raised) or `timeout_ns` passes
    /// (real time).
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
        assert!(d.decision.allowed);
        assert_eq!(d.decision.remaining, 1);
        let (b, _) = c.acquire(&k);
        let (none, d) = c.acquire(&k);
        assert!(none.is_none());
        assert!(!d.decision.allowed);
        assert_eq!(d.decision.retry_after, Some(10 * NANOS));
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
        let st = c.stats();
        assert_eq!((st.counters.allowed, st.counters.denied, st.expired, st.held), (3, 1, 2, 0));
    }

    #[test]
    fn concurrency_quotas_shadow_and_dropped_leases() {
        let clock = ManualClock::new(0);
        let c = Concurrency::new(1, 10.0, Clock::Manual(clock.clone())).unwrap();
        let (vip, k) = (fp("vip"), fp("k"));
        c.set_quota(&vip, 3).unwrap();
        assert!(c.set_quota(&vip, 0).is_err());
        assert_eq!(c.quota_of(&vip), (3, true));
        assert_eq!(c.quota_of(&k), (1, false));
        let ids: Vec<_> = (0..4).map(|_| c.acquire(&vip).0).collect();
        assert!(ids[..3].iter().all(|i| i.is_some()) && ids[3].is_none(), "{ids:?}");
        assert_eq!(c.peek(&vip).limit, 3);
        assert_eq!(c.top(5), vec![(vip, 3, 3)]);
        assert!(c.clear_quota(&vip));
        assert!(!c.clear_quota(&vip));
        assert!(!c.peek(&vip).allowed, "3 held, the default limit is 1");
        // Shadow mode: the call that would be denied is admitted with a lease holding nothing.
        assert!(c.acquire(&k).0.is_some());
        c.set_shadow(true);
        let (id, checked) = c.acquire(&k);
        assert_eq!(id, Some(SHADOW_LEASE));
        assert!(checked.decision.allowed);
        assert_eq!(checked.shadowed.unwrap().retry_after, Some(10 * NANOS));
        assert!(!c.release(&k, SHADOW_LEASE));
        assert_eq!(c.held(&k), 1, "the shadow lease holds no place");
        c.set_shadow(false);
        // A lease dropped by its holder is released and counted apart.
        assert!(c.release_dropped(&vip, ids[0].unwrap()));
        assert!(!c.release_dropped(&vip, ids[0].unwrap()));
        let st = c.stats();
        assert_eq!((st.dropped, st.overrides, st.counters.shadow_denied, st.held), (1, 0, 1, 3));
        c.set_max(2).unwrap();
        assert!(c.set_max(0).is_err());
        assert_eq!(c.max(), 2);
    }

    #[test]
    fn composite_counts_and_shadows_as_a_whole() {
        let clock = ManualClock::new(0);
        let a = Arc::new(token_bucket("2/minute", 2, &clock));
        let b = Arc::new(token_bucket("10/minute", 10, &clock));
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
        assert!(Composite::new(vec![]).is_err());
        assert!(Composite::new(vec![Arc::clone(&a), Arc::clone(&a)]).is_err());
        let other = Arc::new(token_bucket("1/s", 1, &ManualClock::new(0)));
        assert!(Composite::new(vec![a, other]).err().unwrap().to_string().contains("same clock"));
        assert!(matches!(Composite::no_quota("set_quota"), Error::Unsupported(_)));
    }

    #[test]
    fn windows_start_on_unix_time_boundaries() {
        use crate::algorithms::SlidingWindow;
        let day = Rate::parse("3/day").unwrap();
        // A manual clock reads Unix time: 2026-01-01T12:00:00Z.
        let noon = 1_767_268_800 * NANOS;
        let clock = ManualClock::new(noon);
        let fw = Limiter::new(
            Algorithm::FixedWindow(FixedWindow::new(day).unwrap()),
            Clock::Manual(clock.clone()),
            60.0,
            None,
        )
        .unwrap();
        let d = fw.hit(&fp("k"), 1);
        assert_eq!(d.reset_after, 12 * 3600 * NANOS, "the window ends at UTC midnight");
        // Aligned 5 hours later (midnight at UTC-5): the window ends at 05:00 UTC.
        let est = Algorithm::FixedWindow(FixedWindow::aligned(day, 5 * 3600 * NANOS as i64).unwrap());
        let fw5 = Limiter::new(est.clone(), Clock::Manual(clock.clone()), 60.0, None).unwrap();
        assert_eq!(fw5.hit(&fp("k"), 1).reset_after, 17 * 3600 * NANOS);
        let est_neg = FixedWindow::aligned(day, -19 * 3600 * NANOS as i64).unwrap();
        let fw5n = Limiter::new(Algorithm::FixedWindow(est_neg), Clock::Manual(clock.clone()), 60.0, None).unwrap();
        assert_eq!(fw5n.hit(&fp("k"), 1).reset_after, 17 * 3600 * NANOS, "-19 h is +5 h modulo a day");
        let sw = Limiter::new(
            Algorithm::SlidingWindow(SlidingWindow::aligned(day, 5 * 3600 * NANOS as i64).unwrap()),
            Clock::Manual(clock.clone()),
            60.0,
            None,
        )
        .unwrap();
        assert_eq!(sw.hit(&fp("k"), 3).retry_after, Some(0));
        assert_eq!(sw.hit(&fp("k"), 1).retry_after, Some(17 * 3600 * NANOS + 86_400 * NANOS / 3));
        // A quota set at run time keeps the limiter's clock and alignment.
        fw5.set_quota(&fp("q"), est).unwrap();
        assert_eq!(fw5.hit(&fp("q"), 1).reset_after, 17 * 3600 * NANOS);
        assert!(FixedWindow::aligned(day, i64::MAX).is_err());
        // On the monotonic clock, windows end where Unix time says.
        let real = Limiter::new(
            Algorithm::FixedWindow(FixedWindow::new(Rate::parse("1/minute").unwrap()).unwrap()),
            Clock::Monotonic,
            60.0,
            None,
        )
        .unwrap();
        let left = real.hit(&fp("k"), 1).reset_after;
        let want = 60 * NANOS - crate::clock::realtime_ns() % (60 * NANOS);
        assert!(left.abs_diff(want) < NANOS / 10, "{left} vs {want}");
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
        for i in 0..5 {
            let c = tb.check(&fp("a"), 1);
            assert!(c.decision.allowed);
            if let Some(denied) = c.shadowed {
                shadowed += 1;
                assert!(!denied.allowed);
                assert_eq!(c.decision.retry_after, Some(0));
                // 2/minute: the third call would wait 30 s, the next ones too.
                assert_eq!(denied.retry_after, Some(30 * NANOS), "call {i}");
            }
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
