//! The limiter: one [`Quota`] per key over a store of states, with shadow mode,
//! counters, and quotas changed at run time.
//!
//! The states live in one of two stores: in this process ([`crate::store::Store`], a
//! sharded map) or in shared memory for every process of the host
//! ([`crate::store::shm::ShmTable`]). What a check means — stepping the key's quota,
//! the answer when the store has no room for a new key, shadow mode, counting — is
//! written here once; `in_process` and `shared` only say how each store reads and
//! writes a key's state.

mod in_process;
mod shared;
#[cfg(test)]
mod tests;

pub use in_process::{fresh_at, ShardQuotas};
pub use shared::check_store_ttl;

use crate::clock::{Clock, NANOS};
use crate::decision::{Checked, Decision};
use crate::error::{Error, Result};
use crate::key::{Fingerprint, Fingerprinter, KeyKind};
use crate::priority::{step_share, Share};
use crate::quota::Quota;
use crate::report::{Counters, Inspection, TopRow};
use crate::store::shm::ShmTable;
use crate::store::Store;
use in_process::InProcess;
use shared::OnSharedMemory;
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

/// A snapshot of a limiter's counters and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub counters: Counters,
    /// Keys tracked (in shared memory: by every limiter of the store).
    pub keys: usize,
    pub evicted: u64,
    /// Keys with a quota of their own.
    pub overrides: usize,
    /// New keys denied because the store had no room for them.
    pub store_full: u64,
}

enum States {
    InProcess(InProcess),
    Shared(OnSharedMemory),
}

/// A window or bucket algorithm over a store of per-key states. In process, the quota
/// can be changed at run time, for the whole limiter or for one key, without losing
/// any key's usage (see [`Quota::convert`]).
pub struct Limiter {
    states: States,
    fingerprinter: Fingerprinter,
    clock: Clock,
    /// In shadow mode a check decides and counts but never denies.
    shadow: AtomicBool,
    store_full: AtomicU64,
}

impl Limiter {
    /// A limiter whose states live in this process. `ttl_secs`: idle time after which a
    /// key is evicted (raised to the quota's time to fresh); `max_keys`: the most keys
    /// tracked at once.
    pub fn new(quota: Quota, clock: Clock, ttl_secs: f64, max_keys: Option<usize>) -> Result<Limiter> {
        let quota = quota.bound(clock.epoch_offset());
        let states = States::InProcess(InProcess::new(quota, ttl_secs, max_keys)?);
        Ok(Limiter::over(states, Fingerprinter::process(), clock))
    }

    /// A limiter whose states live in a shared-memory store, for every process that
    /// builds the same limiter on it.
    pub fn on_shared_memory(quota: Quota, clock: Clock, table: Arc<ShmTable>) -> Result<Limiter> {
        let (states, fingerprinter) = OnSharedMemory::new(quota, &clock, table)?;
        Ok(Limiter::over(States::Shared(states), fingerprinter, clock))
    }

    fn over(states: States, fingerprinter: Fingerprinter, clock: Clock) -> Limiter {
        Limiter { states, fingerprinter, clock, shadow: AtomicBool::new(false), store_full: AtomicU64::new(0) }
    }

    /// A key's fingerprint in this limiter's store: a shared-memory store keys with its
    /// own secret (the same in every process) and this limiter's quota.
    #[inline(always)]
    pub fn fingerprint(&self, kind: KeyKind, bytes: &[u8]) -> Fingerprint {
        self.fingerprinter.fingerprint(kind, bytes)
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    pub fn set_shadow(&self, on: bool) {
        self.shadow.store(on, Ordering::Relaxed)
    }

    /// True when the states live in shared memory.
    pub fn is_shared(&self) -> bool {
        matches!(self.states, States::Shared(_))
    }

    /// The in-process store, for composites (which take in-process limiters only).
    pub(crate) fn in_process_store(&self) -> Option<&Store<ShardQuotas>> {
        match &self.states {
            States::InProcess(s) => Some(&s.store),
            States::Shared(_) => None,
        }
    }

    /// Decides and, if admitted, charges `cost` for the key. In shadow mode a call that
    /// would be denied is admitted (and not charged); `shadowed` tells when that happened.
    #[inline(always)]
    pub fn check(&self, fp: &Fingerprint, cost: u64) -> Checked {
        let now = self.clock.now();
        let shadow = self.shadow();
        match &self.states {
            States::InProcess(s) => {
                let mut g = s.store.lock(fp);
                let d = match InProcess::step(&mut g, fp, now, cost) {
                    Some(d) => d,
                    None => self.full(g.extra().for_key(fp)),
                };
                g.extra_mut().counters.count_check(d, shadow)
            }
            States::Shared(s) => self.check_shared(s, fp, now, cost, shadow),
        }
    }

    /// The shared-memory arm of [`check`](Self::check), kept out of line so that the
    /// in-process arm stays small where it is inlined.
    #[inline(never)]
    fn check_shared(&self, s: &OnSharedMemory, fp: &Fingerprint, now: u64, cost: u64, shadow: bool) -> Checked {
        let d = match s.step(fp, now, cost) {
            Some(d) => d,
            None => self.full(&s.quota),
        };
        s.counters.count_check(d, shadow)
    }

    /// The answer to a new key that found no room in the store, counted.
    #[cold]
    pub(crate) fn full(&self, quota: &Quota) -> Decision {
        self.store_full.fetch_add(1, Ordering::Relaxed);
        quota.full()
    }

    /// [`check`](Self::check) for a priority class that may use only `share` of the
    /// key's quota (see [`crate::priority`]): admitted only if what the call leaves free
    /// is at least the rest. Counted and shadowed like any check.
    pub fn check_share(&self, fp: &Fingerprint, cost: u64, share: Share) -> Checked {
        let now = self.clock.now();
        let shadow = self.shadow();
        match &self.states {
            States::InProcess(s) => {
                let mut g = s.store.lock(fp);
                let d = match InProcess::step_by(&mut g, fp, now, |q, state| step_share(q, state, now, cost, share)) {
                    Some(d) => d,
                    None => self.full(g.extra().for_key(fp)),
                };
                g.extra_mut().counters.count_check(d, shadow)
            }
            States::Shared(s) => {
                let d = match s.step_share(fp, now, cost, share, true) {
                    Some(d) => d,
                    None => self.full(&s.quota),
                };
                s.counters.count_check(d, shadow)
            }
        }
    }

    /// The decision [`check_share`](Self::check_share) would give now, charging nothing.
    pub fn peek_share(&self, fp: &Fingerprint, cost: u64, share: Share) -> Decision {
        let now = self.clock.now();
        match &self.states {
            States::InProcess(s) => s.peek_by(fp, |q, state| step_share(q, state, now, cost, share)),
            States::Shared(s) => s.step_share(fp, now, cost, share, false).unwrap_or_else(|| s.quota.full()),
        }
    }

    #[inline]
    pub fn hit(&self, fp: &Fingerprint, cost: u64) -> Decision {
        self.check(fp, cost).decision
    }

    /// The decision `hit` would give, charging nothing (shadow mode aside).
    pub fn peek(&self, fp: &Fingerprint, cost: u64) -> Decision {
        let now = self.clock.now();
        match &self.states {
            States::InProcess(s) => s.peek(fp, now, cost),
            States::Shared(s) => s.peek(fp, now, cost),
        }
    }

    /// `(allowed, remaining)` for a call of one unit now, charging nothing.
    pub fn get_limit(&self, fp: &Fingerprint) -> (bool, u64) {
        let d = self.peek(fp, 0);
        (d.remaining >= 1, d.remaining)
    }

    /// Puts the key back to its fresh state.
    pub fn reset(&self, fp: &Fingerprint) {
        match &self.states {
            States::InProcess(s) => {
                s.store.remove(fp);
            }
            States::Shared(s) => {
                s.table.remove(fp);
            }
        }
    }

    /// Evicts the keys idle past the ttl (and fresh) now; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        match &self.states {
            States::InProcess(s) => s.store.sweep(now, &fresh_at(now)),
            States::Shared(s) => s.table.sweep(now),
        }
    }

    /// Keys tracked (in shared memory: by every limiter of the store).
    pub fn len(&self) -> usize {
        match &self.states {
            States::InProcess(s) => s.store.len(),
            States::Shared(s) => s.table.count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The idle time after which a key may be evicted (ns).
    pub fn ttl_ns(&self) -> u64 {
        match &self.states {
            States::InProcess(s) => s.ttl_ns(),
            States::Shared(s) => s.table.ttl_secs.saturating_mul(NANOS),
        }
    }

    /// The most keys tracked at once, if bounded (a shared-memory store is bounded by its
    /// capacity instead).
    pub fn max_keys(&self) -> Option<usize> {
        self.in_process_store().and_then(|s| s.max_keys())
    }

    /// The file of the shared-memory store, for one.
    pub fn store_path(&self) -> Option<&str> {
        match &self.states {
            States::InProcess(_) => None,
            States::Shared(s) => Some(&s.table.path),
        }
    }

    /// The default quota (what keys without their own quota get).
    pub fn quota(&self) -> Quota {
        match &self.states {
            States::InProcess(s) => s.store.lock_index(0).extra().default.clone(),
            States::Shared(s) => s.quota.clone(),
        }
    }

    /// The quota in force for a key, and whether it is the key's own.
    pub fn quota_of(&self, fp: &Fingerprint) -> (Quota, bool) {
        match &self.states {
            States::InProcess(s) => s.quota_of(fp),
            States::Shared(s) => (s.quota.clone(), false),
        }
    }

    fn changing(&self, what: &str, why: &str) -> Result<&InProcess> {
        match &self.states {
            States::InProcess(s) => Ok(s),
            States::Shared(_) => {
                Err(Error::InvalidArgument(format!("{what} is not available with a SharedMemoryStore: {why}")))
            }
        }
    }

    fn quotas_changing(&self, what: &str) -> Result<&InProcess> {
        self.changing(
            what,
            "the quota is part of the limiter's identity in the store; build the limiter with the new rate in \
             every process",
        )
    }

    /// Gives one key its own quota, from its next check on. The key's usage so far is
    /// carried over (see [`Quota::convert`]).
    pub fn set_quota(&self, fp: &Fingerprint, quota: Quota) -> Result<()> {
        let s = self.quotas_changing("set_quota")?;
        s.set_quota(fp, quota.bound(self.clock.epoch_offset()), self.clock.now())
    }

    /// Puts a key back on the default quota, carrying its usage over. False when the key
    /// had no quota of its own.
    pub fn clear_quota(&self, fp: &Fingerprint) -> Result<bool> {
        Ok(self.quotas_changing("clear_quota")?.clear_quota(fp, self.clock.now()))
    }

    /// Changes the default quota of every key without a quota of its own, carrying each
    /// key's usage over.
    pub fn set_default(&self, quota: Quota) -> Result<()> {
        let s = self.quotas_changing("set_default_quota")?;
        s.set_default(quota.bound(self.clock.epoch_offset()), &self.clock)
    }

    /// Counters and sizes.
    pub fn stats(&self) -> Stats {
        let store_full = self.store_full.load(Ordering::Relaxed);
        match &self.states {
            States::InProcess(s) => Stats { store_full, ..s.stats() },
            States::Shared(s) => {
                Stats { counters: s.counters.get(), keys: s.table.count(), store_full, ..Stats::default() }
            }
        }
    }

    /// The `n` tracked keys using the largest share of their limit now, most used first.
    pub fn top(&self, n: usize) -> Result<Vec<TopRow>> {
        let s = self.changing("top_keys", "its slots hold the keys of every limiter on the store")?;
        Ok(s.top(n, &self.clock))
    }

    /// The key's quota and usage now.
    pub fn inspect(&self, fp: &Fingerprint) -> Inspection {
        let now = self.clock.now();
        let (quota, own_quota, zero, one, tracked) = match &self.states {
            States::InProcess(s) => s.inspect(fp, now),
            States::Shared(s) => {
                let (zero, one) = (s.peek(fp, now, 0), s.peek(fp, now, 1));
                // The table cannot tell a fresh key from an untracked one (and need not).
                (s.quota.clone(), false, zero, one, zero.remaining < zero.limit)
            }
        };
        Inspection {
            algorithm: quota.kind().name(),
            rate: Some(quota.rate()),
            limit: quota.limit(),
            own_quota,
            tracked,
            shadow: self.shadow(),
            ..Inspection::from_peeks(&zero, &one)
        }
    }
}
