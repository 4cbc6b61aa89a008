//! A limiter's states in this process: the sharded [`Store`], whose every shard also
//! keeps the quotas and the counters of the keys it holds (locked with them, so a
//! check takes one lock and no atomic operation beyond it).

use super::{effective_ttl, Stats};
use crate::algorithms::{State, FRESH};
use crate::clock::Clock;
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::key::{Fingerprint, FingerprintMap};
use crate::quota::Quota;
use crate::report::{top_n, Counters, TopRow};
use crate::store::{Room, ShardGuard, Slot, Store, Upserted, SHARDS};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a limiter keeps in each shard of its store besides the states: the quota keys
/// get by default, the quotas set for single keys at run time, and the counters.
pub struct ShardQuotas {
    pub default: Quota,
    pub overrides: FingerprintMap<Quota>,
    pub counters: Counters,
}

impl ShardQuotas {
    /// The quota in force for a key.
    #[inline(always)]
    pub fn for_key(&self, fp: &Fingerprint) -> &Quota {
        if self.overrides.is_empty() {
            &self.default
        } else {
            self.overrides.get(fp).unwrap_or(&self.default)
        }
    }
}

/// Tells the store which keys are back at their fresh state at `now`: evicting those
/// can change no decision.
#[inline]
pub fn fresh_at(now: u64) -> impl Fn(&ShardQuotas, &Slot) -> bool {
    move |q, s| q.for_key(&Fingerprint(s.fp)).is_fresh(s.state, now)
}

pub(super) struct InProcess {
    pub store: Store<ShardQuotas>,
    /// The ttl asked for, raised to every quota's time to fresh.
    ttl_ns: AtomicU64,
}

impl InProcess {
    pub fn new(quota: Quota, ttl_secs: f64, max_keys: Option<usize>) -> Result<InProcess> {
        if max_keys == Some(0) {
            return Err(Error::InvalidArgument("max_keys must be at least 1, got 0".into()));
        }
        let ttl_ns = effective_ttl(ttl_secs, quota.time_to_fresh())?;
        let store = Store::new(ttl_ns, max_keys, || ShardQuotas {
            default: quota.clone(),
            overrides: FingerprintMap::default(),
            counters: Counters::default(),
        });
        Ok(InProcess { store, ttl_ns: AtomicU64::new(ttl_ns) })
    }

    pub fn ttl_ns(&self) -> u64 {
        self.ttl_ns.load(Ordering::Relaxed)
    }

    /// Steps the key's quota and keeps the new state if admitted. None when the key is
    /// new, admitted, and the store has no room for it.
    #[inline(always)]
    pub fn step(g: &mut ShardGuard<'_, ShardQuotas>, fp: &Fingerprint, now: u64, cost: u64) -> Option<Decision> {
        Self::step_by(g, fp, now, |q, state| q.step(state, now, cost))
    }

    /// [`step`](Self::step) with a step function of the key's quota and state (e.g. one
    /// that keeps a priority class's floor free).
    #[inline(always)]
    pub fn step_by(
        g: &mut ShardGuard<'_, ShardQuotas>,
        fp: &Fingerprint,
        now: u64,
        step: impl FnOnce(&Quota, State) -> (State, Decision),
    ) -> Option<Decision> {
        let (d, done) = g.upsert(fp, now, &fresh_at(now), Room::Find, |q, state, _| {
            let (next, d) = step(q.for_key(fp), state);
            (d.allowed.then_some(next), d)
        });
        (done != Upserted::NoRoom).then_some(d)
    }

    pub fn peek(&self, fp: &Fingerprint, now: u64, cost: u64) -> Decision {
        self.peek_by(fp, |q, state| q.step(state, now, cost))
    }

    /// The decision of `step` on the key's quota and state, writing nothing.
    pub fn peek_by(&self, fp: &Fingerprint, step: impl FnOnce(&Quota, State) -> (State, Decision)) -> Decision {
        let g = self.store.lock(fp);
        step(g.extra().for_key(fp), g.lookup(fp).unwrap_or(FRESH)).1
    }

    pub fn quota_of(&self, fp: &Fingerprint) -> (Quota, bool) {
        let g = self.store.lock(fp);
        let q = g.extra();
        match q.overrides.get(fp) {
            Some(own) => (own.clone(), true),
            None => (q.default.clone(), false),
        }
    }

    /// (quota, own, peek of 0 units, peek of 1 unit, tracked), under one lock.
    pub fn inspect(&self, fp: &Fingerprint, now: u64) -> (Quota, bool, Decision, Decision, bool) {
        let g = self.store.lock(fp);
        let q = g.extra();
        let state = g.lookup(fp);
        let quota = q.for_key(fp);
        let (zero, one) = (quota.step(state.unwrap_or(FRESH), now, 0).1, quota.step(state.unwrap_or(FRESH), now, 1).1);
        (quota.clone(), q.overrides.contains_key(fp), zero, one, state.is_some())
    }

    /// Raises the ttl to what `quota` needs.
    fn raise_ttl_for(&self, quota: &Quota) {
        let need = quota.time_to_fresh();
        let ttl = self.ttl_ns.fetch_max(need, Ordering::Relaxed).max(need);
        self.store.raise_ttl(ttl);
    }

    fn check_kind(&self, quota: &Quota) -> Result<()> {
        self.store.lock_index(0).extra().default.check_same_kind(quota)
    }

    pub fn set_quota(&self, fp: &Fingerprint, quota: Quota, now: u64) -> Result<()> {
        self.check_kind(&quota)?;
        self.raise_ttl_for(&quota);
        let mut g = self.store.lock(fp);
        let (slot, q) = g.slot_and_extra(fp);
        if let Some(slot) = slot {
            slot.state = q.for_key(fp).convert(&quota, slot.state, now);
        }
        q.overrides.insert(*fp, quota);
        Ok(())
    }

    pub fn clear_quota(&self, fp: &Fingerprint, now: u64) -> bool {
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

    /// Each shard is converted under its lock, one after the other, so checks of other
    /// shards go on meanwhile.
    pub fn set_default(&self, quota: Quota, clock: &Clock) -> Result<()> {
        self.check_kind(&quota)?;
        self.raise_ttl_for(&quota);
        for index in 0..SHARDS {
            let now = clock.now();
            let mut g = self.store.lock_index(index);
            g.update_all(|q, slot| {
                if q.overrides.is_empty() || !q.overrides.contains_key(&Fingerprint(slot.fp)) {
                    slot.state = q.default.convert(&quota, slot.state, now);
                }
            });
            g.extra_mut().default = quota.clone();
        }
        Ok(())
    }

    /// Counters summed over the shards (one locked at a time), with the store's size.
    pub fn stats(&self) -> Stats {
        let mut out = Stats { keys: self.store.len(), evicted: self.store.evicted(), ..Stats::default() };
        for index in 0..SHARDS {
            let g = self.store.lock_index(index);
            out.counters.add(&g.extra().counters);
            out.overrides += g.extra().overrides.len();
        }
        out
    }

    /// Walks every shard, one at a time, collecting only keys with some usage.
    pub fn top(&self, n: usize, clock: &Clock) -> Vec<TopRow> {
        if n == 0 {
            return Vec::new();
        }
        let mut used = Vec::new();
        for index in 0..SHARDS {
            let now = clock.now();
            let g = self.store.lock_index(index);
            let q = g.extra();
            for slot in g.slots() {
                let d = q.for_key(&Fingerprint(slot.fp)).step(slot.state, now, 0).1;
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
