//! Concurrency limits: at most `max` leases held at once per key.
//!
//! A lease ends when released, when its holder drops it, or when its `lease_ttl` runs
//! out, so a holder that crashed cannot leak capacity. A key exists in the map only
//! while it holds leases.

use crate::clock::Clock;
use crate::decision::{Checked, Decision};
use crate::error::{Error, Result};
use crate::key::{Fingerprint, FingerprintMap};
use crate::report::{top_n, Counters, Inspection, TopRow};
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

    /// Whether one more lease fits next to `leases` (the live ones) under `max`.
    fn decide(&self, leases: &[(u64, u64)], now: u64, max: u64) -> Decision {
        let held = leases.len() as u64 + 1;
        let allowed = held <= max;
        let last = leases.iter().map(|l| l.1).max().unwrap_or(now);
        let first = leases.iter().map(|l| l.1).min().unwrap_or(now);
        Decision {
            allowed,
            limit: max,
            remaining: max.saturating_sub(if allowed { held } else { leases.len() as u64 }),
            reset_after: if allowed { self.lease_ttl_ns } else { last.saturating_sub(now) },
            retry_after: Some(if allowed { 0 } else { first.saturating_sub(now) }),
            delay: 0,
        }
    }

    /// Under the key's lock: takes a lease if one is free and `also` agrees (see
    /// [`acquire_if`](Self::acquire_if)).
    fn take_if<R>(
        &self,
        shard: &mut LeaseShard,
        fp: &Fingerprint,
        now: u64,
        also: impl FnOnce() -> (bool, R),
    ) -> (Option<u64>, Decision, Option<R>) {
        shard.prune(fp, now);
        let max = shard.limits.get(fp).copied().unwrap_or_else(|| self.max());
        let leases = shard.leases.get(fp).map_or(&[][..], |v| &v[..]);
        let d = self.decide(leases, now, max);
        if !d.allowed {
            return (None, d, None);
        }
        let (ok, r) = also();
        if !ok {
            return (None, d, Some(r));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        shard.leases.entry(*fp).or_default().push((id, now.saturating_add(self.lease_ttl_ns)));
        (Some(id), d, Some(r))
    }

    /// Takes a lease if fewer than the key's limit are held; returns its id with the
    /// decision, counted. In shadow mode a call that would be denied is admitted with
    /// the id [`SHADOW_LEASE`], holding no place.
    pub fn acquire(&self, fp: &Fingerprint) -> (Option<u64>, Checked) {
        let now = self.clock.now();
        let mut shard = self.shard(fp).lock();
        let (id, d, _) = self.take_if(&mut shard, fp, now, || (true, ()));
        let checked = shard.counters.count_check(d, self.shadow());
        match (id, checked.shadowed) {
            (None, Some(_)) => (Some(SHADOW_LEASE), checked),
            _ => (id, checked),
        }
    }

    /// Takes a lease only if one is free *and* `also` agrees, both under this key's lock:
    /// `also` runs (and may charge other limiters) only when a lease is free, and the
    /// lease is taken only if it returns true. Returns the lease id, the concurrency
    /// decision and what `also` returned (None if it did not run). Not counted, and not
    /// in shadow mode: the caller (a token budget) counts its own.
    pub fn acquire_if<R>(
        &self,
        fp: &Fingerprint,
        also: impl FnOnce() -> (bool, R),
    ) -> (Option<u64>, Decision, Option<R>) {
        let now = self.clock.now();
        let mut shard = self.shard(fp).lock();
        self.take_if(&mut shard, fp, now, also)
    }

    /// What `acquire` would decide, taking nothing.
    pub fn peek(&self, fp: &Fingerprint) -> Decision {
        let now = self.clock.now();
        let shard = self.shard(fp).lock();
        let max = shard.limits.get(fp).copied().unwrap_or_else(|| self.max());
        let live: Vec<(u64, u64)> =
            shard.leases.get(fp).map(|v| v.iter().copied().filter(|l| l.1 > now).collect()).unwrap_or_default();
        self.decide(&live, now, max)
    }

    /// `(allowed, free)`: whether a lease is free now, and how many are.
    pub fn get_limit(&self, fp: &Fingerprint) -> (bool, u64) {
        let d = self.peek(fp);
        (d.allowed, if d.allowed { d.remaining + 1 } else { 0 })
    }

    /// `(limit, in flight)`: the key's limit and the leases it holds as the limit counts
    /// them (at most the limit).
    pub fn in_flight(&self, fp: &Fingerprint) -> (u64, u64) {
        let d = self.peek(fp);
        // The peek decides as if it took one more lease: when allowed, `remaining`
        // already counts that lease, which is not held.
        (d.limit, d.limit.saturating_sub(d.remaining).saturating_sub(d.allowed as u64))
    }

    /// The key's limit and leases now (`used`: leases held).
    pub fn inspect(&self, fp: &Fingerprint) -> Inspection {
        let (limit, own_quota) = self.quota_of(fp);
        let d = self.peek(fp);
        let held = self.held(fp);
        Inspection {
            algorithm: "concurrency",
            rate: None,
            limit,
            own_quota,
            used: held,
            remaining: limit.saturating_sub(held),
            allowed: d.allowed,
            retry_after: d.retry_after,
            reset_after: if held > 0 { d.reset_after } else { 0 },
            tracked: held > 0,
            shadow: self.shadow(),
        }
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
    pub fn top(&self, n: usize) -> Vec<TopRow> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, NANOS};
    use crate::key::{fingerprint, KeyKind};

    fn fp(s: &str) -> Fingerprint {
        fingerprint(KeyKind::Str, s.as_bytes())
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
    fn reports_a_key() {
        let clock = ManualClock::new(0);
        let c = Concurrency::new(2, 10.0, Clock::Manual(clock.clone())).unwrap();
        let k = fp("k");
        assert_eq!((c.get_limit(&k), c.in_flight(&k)), ((true, 2), (2, 0)));
        let i = c.inspect(&k);
        assert_eq!((i.algorithm, i.used, i.remaining, i.tracked, i.reset_after), ("concurrency", 0, 2, false, 0));
        let (a, _) = c.acquire(&k);
        clock.advance(4 * NANOS);
        c.acquire(&k);
        assert_eq!((c.get_limit(&k), c.in_flight(&k)), ((false, 0), (2, 2)));
        let i = c.inspect(&k);
        assert_eq!((i.used, i.remaining, i.allowed, i.retry_after), (2, 0, false, Some(6 * NANOS)));
        assert_eq!(i.reset_after, 10 * NANOS, "until the last lease runs out");
        c.set_max(1).unwrap();
        assert_eq!(c.in_flight(&k), (1, 1), "counted up to the limit");
        assert!(c.release(&k, a.unwrap()));
        assert_eq!(c.inspect(&k).used, 1);
    }
}
