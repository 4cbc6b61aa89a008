//! Token budgets for LLM calls: requests, tokens and daily tokens (token buckets whose
//! burst is their rate's count) and an optional concurrency limit, reserved together in
//! one step before a call and settled with the actual token count after it.
//!
//! A reservation charges one request and the estimated tokens to every limit and takes a
//! concurrency lease, or does nothing. Settling charges the difference between the
//! actual and the estimated tokens (a refund when the estimate was high; the key may go
//! into debt when it was low) and ends the lease; cancelling refunds the request and the
//! estimate. A reservation not settled within `lease_ttl` stands at its estimate: a late
//! settle or cancel changes nothing.
//!
//! A [`Budget`] keeps its state in this process ([`in_process`]) or in a shared-memory
//! store for every process of the host ([`shared`]: a one-level
//! [`crate::hierarchy::Hierarchy`], each step one transaction of the store, the lease
//! included).

mod in_process;
mod shared;

use crate::clock::Clock;
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::hierarchy::Path;
use crate::key::{fingerprint, Fingerprint, KeyKind};
use crate::limiter::Stats;
use crate::rate::Rate;
use crate::report::{Inspection, TopRow};
use crate::store::shm::ShmTable;
pub use in_process::InProcessBudget;
pub use shared::SharedBudget;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The rate limits of a budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Requests = 0,
    Tokens = 1,
    DailyTokens = 2,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::Requests, Limit::Tokens, Limit::DailyTokens];

    /// `"requests"`, `"tokens"` or `"daily_tokens"`.
    pub fn name(self) -> &'static str {
        ["requests", "tokens", "daily_tokens"][self as usize]
    }

    pub fn parse(name: &str) -> Result<Limit> {
        Limit::ALL.into_iter().find(|l| l.name() == name).ok_or_else(|| {
            Error::InvalidArgument(format!("limit must be 'requests', 'tokens' or 'daily_tokens', got {name:?}"))
        })
    }

    /// What one call costs on this limit.
    fn cost(self, tokens: u64) -> u64 {
        match self {
            Limit::Requests => 1,
            Limit::Tokens | Limit::DailyTokens => tokens,
        }
    }
}

/// A rate per limit (requests, tokens, daily tokens), any of them absent.
pub type Rates = [Option<Rate>; 3];

/// The answer to [`Budget::reserve`] (or [`Budget::peek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// Every limit admitted (or, in shadow mode, would not deny).
    pub allowed: bool,
    /// The limits' decisions combined (see [`crate::decision::combine`]).
    pub decision: Decision,
    /// Admitted although a limit in shadow mode would have denied.
    pub shadow: bool,
    /// Each rate limit's own decision, by [`Limit`] (None for a limit that is not set).
    pub limits: [Option<Decision>; 3],
    pub concurrency: Option<Decision>,
    /// The concurrency lease taken, if any.
    pub lease: Option<u64>,
    /// When the reservation was charged (the budget's clock, ns): settling needs it.
    pub charged_at: u64,
}

/// Tokens counted for reporting, by what became of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Estimates of admitted reservations.
    pub reserved: u64,
    /// Actual counts of settled reservations.
    pub settled: u64,
    /// Estimates of cancelled reservations.
    pub refunded: u64,
}

/// A key as a budget takes it: fingerprinted for this process, or (in a shared-memory
/// store) named so that every process finds the same state. Made by [`Budget::key`].
#[derive(Clone, Debug)]
pub enum BudgetKey {
    InProcess(Fingerprint),
    Shared(Path),
}

/// A budget's counters: each rate limit's, and how many keys hold leases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetStats {
    pub limits: [Option<Stats>; 3],
    /// Keys holding leases (in a shared-memory store: every key the store holds).
    pub concurrency_keys: Option<usize>,
}

/// One key's quotas and usage: each rate limit's, and its leases as (limit, in flight).
#[derive(Clone, Debug, Default)]
pub struct BudgetInspection {
    pub limits: [Option<Inspection>; 3],
    pub concurrency: Option<(u64, u64)>,
}

enum Engine {
    InProcess(InProcessBudget),
    // Boxed: a hierarchy is large, and a budget is made once.
    Shared(Box<SharedBudget>),
}

/// Request and token limits plus an optional concurrency limit, reserved together (see
/// the module's documentation).
pub struct Budget {
    engine: Engine,
    tally: [AtomicU64; 3],
}

/// The checks every budget makes of its settings.
fn check_new(rates: &Rates, concurrency: Option<u64>, lease_ttl_secs: f64) -> Result<()> {
    if rates.iter().all(Option::is_none) && concurrency.is_none() {
        return Err(Error::InvalidArgument(
            "TokenLimiter needs at least one of requests, tokens, daily_tokens or concurrency".into(),
        ));
    }
    if !(lease_ttl_secs.is_finite() && lease_ttl_secs > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "lease_ttl must be a finite number of seconds above 0, got {lease_ttl_secs}"
        )));
    }
    Ok(())
}

fn none_given() -> Error {
    Error::InvalidArgument("give at least one of requests, tokens, daily_tokens".into())
}

fn no_limit_to_change(limit: Limit) -> Error {
    Error::InvalidArgument(format!("this TokenLimiter has no {} limit to change", limit.name()))
}

fn wrong_key() -> Error {
    Error::InvalidArgument("this key was made by another TokenLimiter".into())
}

impl Budget {
    fn with(engine: Engine) -> Budget {
        Budget { engine, tally: Default::default() }
    }

    /// A budget in this process: `rates` and `concurrency` (at least one of them), every
    /// rate limit with `ttl_secs` and `max_keys` as a [`crate::limiter::Limiter`]'s; a
    /// reservation stands (and its lease lives) `lease_ttl_secs`.
    pub fn new(
        rates: Rates,
        concurrency: Option<u64>,
        clock: Clock,
        ttl_secs: f64,
        max_keys: Option<usize>,
        lease_ttl_secs: f64,
    ) -> Result<Budget> {
        let b = InProcessBudget::new(rates, concurrency, clock, ttl_secs, max_keys, lease_ttl_secs)?;
        Ok(Budget::with(Engine::InProcess(b)))
    }

    /// A budget in the shared-memory store `table`, for every process of the host that
    /// builds it alike: with the same `name`, its keys are the same in every process
    /// (budgets with other names or other rates never share a key).
    pub fn shared(
        rates: Rates,
        concurrency: Option<u64>,
        table: Arc<ShmTable>,
        name: &str,
        clock: Clock,
        lease_ttl_secs: f64,
    ) -> Result<Budget> {
        let b = SharedBudget::new(rates, concurrency, table, name, clock, lease_ttl_secs)?;
        Ok(Budget::with(Engine::Shared(Box::new(b))))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.engine, Engine::Shared(_))
    }

    /// The shared-memory store's file, if the budget lives in one.
    pub fn store_path(&self) -> Option<&str> {
        match &self.engine {
            Engine::InProcess(_) => None,
            Engine::Shared(b) => Some(b.store_path()),
        }
    }

    /// The key `bytes` (of kind `kind`) as this budget takes it.
    pub fn key(&self, kind: KeyKind, bytes: &[u8]) -> BudgetKey {
        match &self.engine {
            Engine::InProcess(_) => BudgetKey::InProcess(fingerprint(kind, bytes)),
            Engine::Shared(_) => {
                let mut path = Path::new();
                path.push(kind, bytes);
                BudgetKey::Shared(path)
            }
        }
    }

    /// Reserves one request and `tokens` tokens for the key against every limit at once,
    /// with a concurrency lease: all of it, or nothing.
    pub fn reserve(&self, key: &BudgetKey, tokens: u64) -> Result<Reserved> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(b.reserve(fp, tokens)),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.reserve(path, tokens),
            _ => Err(wrong_key()),
        }
    }

    /// What [`reserve`](Self::reserve) would decide now, charging nothing and taking no
    /// lease.
    pub fn peek(&self, key: &BudgetKey, tokens: u64) -> Result<Reserved> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(b.peek(fp, tokens)),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.peek(path, tokens),
            _ => Err(wrong_key()),
        }
    }

    /// True when a reservation charged at `charged_at` has outlived `lease_ttl`: it stands
    /// at its estimate.
    pub fn expired(&self, charged_at: u64) -> bool {
        match &self.engine {
            Engine::InProcess(b) => b.expired(charged_at),
            Engine::Shared(b) => b.expired(charged_at),
        }
    }

    /// Charges (`tokens > 0`) or refunds (`tokens < 0`) tokens of a reservation charged at
    /// `charged_at` on the token limits, and `requests` requests.
    pub fn adjust(&self, key: &BudgetKey, tokens: i64, charged_at: u64, requests: i64) -> Result<()> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => {
                b.adjust(fp, tokens, charged_at, requests);
                Ok(())
            }
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.adjust(path, tokens, charged_at, requests),
            _ => Err(wrong_key()),
        }
    }

    /// Ends a reservation's concurrency lease; true if it was still held.
    pub fn release(&self, key: &BudgetKey, lease: u64) -> Result<bool> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(b.release(fp, lease)),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.release(path, lease),
            _ => Err(wrong_key()),
        }
    }

    /// Ends a reservation charged at `charged_at`: charges `tokens` more tokens (a refund
    /// when negative) and `requests` more requests, and ends its lease. Settling at the
    /// actual count is `tokens = actual - estimate, requests = 0`; cancelling refunds it
    /// all, `tokens = -estimate, requests = -1`. False, doing nothing, once the
    /// reservation has expired: its estimate stands.
    pub fn settle(
        &self,
        key: &BudgetKey,
        tokens: i64,
        requests: i64,
        charged_at: u64,
        lease: Option<u64>,
    ) -> Result<bool> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(b.settle(fp, tokens, requests, charged_at, lease)),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.settle(path, tokens, requests, charged_at, lease),
            _ => Err(wrong_key()),
        }
    }

    /// Adds to the token counts reported (this process's).
    pub fn count(&self, tally: Tally) {
        for (i, n) in [tally.reserved, tally.settled, tally.refunded].into_iter().enumerate() {
            if n > 0 {
                self.tally[i].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub fn tally(&self) -> Tally {
        let [reserved, settled, refunded] = [0, 1, 2].map(|i| self.tally[i].load(Ordering::Relaxed));
        Tally { reserved, settled, refunded }
    }

    /// Forgets the key everywhere, its leases included.
    pub fn reset(&self, key: &BudgetKey) -> Result<()> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => {
                b.reset(fp);
                Ok(())
            }
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.reset(path),
            _ => Err(wrong_key()),
        }
    }

    /// Evicts idle keys (in a shared-memory store: every idle key of the store).
    pub fn sweep(&self) -> usize {
        match &self.engine {
            Engine::InProcess(b) => b.sweep(),
            Engine::Shared(b) => b.sweep(),
        }
    }

    /// Gives the key its own rate for each limit given, keeping what it has used (in a
    /// shared-memory store, for every process, kept in the store until cleared).
    pub fn set_quota(&self, key: &BudgetKey, rates: Rates) -> Result<()> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => b.set_quota(fp, rates),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.set_quota(path, rates),
            _ => Err(wrong_key()),
        }
    }

    /// Puts the key back on the default rates; false if it had none of its own.
    pub fn clear_quota(&self, key: &BudgetKey) -> Result<bool> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(b.clear_quota(fp)),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.clear_quota(path),
            _ => Err(wrong_key()),
        }
    }

    /// Changes the default rates given (keys with their own keep theirs) keeping usage,
    /// and the concurrency limit (leases held stay held). In this process only.
    pub fn set_default(&self, rates: Rates, concurrency: Option<u64>) -> Result<()> {
        match &self.engine {
            Engine::InProcess(b) => b.set_default(rates, concurrency),
            Engine::Shared(_) => Err(Error::InvalidArgument(
                "set_default_quota is not available with a SharedMemoryStore: a TokenLimiter's default quotas are \
                 part of its keys' identity in the store; build it with the new quotas in every process (or give \
                 one key quotas of its own with set_quota, which every process sees)"
                    .into(),
            )),
        }
    }

    /// Shadow mode of the rate limits (concurrency leases stay real).
    pub fn shadow(&self) -> bool {
        match &self.engine {
            Engine::InProcess(b) => b.shadow(),
            Engine::Shared(b) => b.shadow(),
        }
    }

    pub fn set_shadow(&self, on: bool) {
        match &self.engine {
            Engine::InProcess(b) => b.set_shadow(on),
            Engine::Shared(b) => b.set_shadow(on),
        }
    }

    /// The default rate of a limit, if it is set.
    pub fn rate(&self, limit: Limit) -> Option<Rate> {
        match &self.engine {
            Engine::InProcess(b) => b.limiter(limit).map(|l| l.quota().rate()),
            Engine::Shared(b) => b.rate(limit),
        }
    }

    /// The default concurrency limit, if there is one.
    pub fn concurrency_max(&self) -> Option<u64> {
        match &self.engine {
            Engine::InProcess(b) => b.concurrency().map(|c| c.max()),
            Engine::Shared(b) => b.concurrency_max(),
        }
    }

    pub fn clock(&self) -> &Clock {
        match &self.engine {
            Engine::InProcess(b) => b.clock(),
            Engine::Shared(b) => b.clock(),
        }
    }

    pub fn lease_ttl_ns(&self) -> u64 {
        match &self.engine {
            Engine::InProcess(b) => b.lease_ttl_ns(),
            Engine::Shared(b) => b.lease_ttl_ns(),
        }
    }

    pub fn stats(&self) -> BudgetStats {
        match &self.engine {
            Engine::InProcess(b) => BudgetStats {
                limits: Limit::ALL.map(|l| b.limiter(l).map(|l| l.stats())),
                concurrency_keys: b.concurrency().map(|c| c.len()),
            },
            Engine::Shared(b) => b.stats(),
        }
    }

    /// The key's quotas and usage.
    pub fn inspect(&self, key: &BudgetKey) -> Result<BudgetInspection> {
        match (&self.engine, key) {
            (Engine::InProcess(b), BudgetKey::InProcess(fp)) => Ok(BudgetInspection {
                limits: Limit::ALL.map(|l| b.limiter(l).map(|l| l.inspect(fp))),
                concurrency: b.concurrency().map(|c| c.in_flight(fp)),
            }),
            (Engine::Shared(b), BudgetKey::Shared(path)) => b.inspect(path),
            _ => Err(wrong_key()),
        }
    }

    /// The `n` keys using the largest share of `limit` now (in this process only).
    pub fn top(&self, limit: Limit, n: usize) -> Result<Vec<TopRow>> {
        match &self.engine {
            Engine::InProcess(b) => b.limiter_or_err(limit)?.top(n),
            Engine::Shared(_) => Err(Error::InvalidArgument(
                "top_keys is not available with a SharedMemoryStore: the store keeps fingerprints, not keys".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, NANOS};
    use crate::store::shm::Location;

    fn rate(s: &str) -> Option<Rate> {
        Some(Rate::parse(s).unwrap())
    }

    fn store(name: &str) -> (Arc<ShmTable>, String) {
        let p = std::env::temp_dir().join(format!("nl-budget-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let p = p.to_string_lossy().into_owned();
        (Arc::new(ShmTable::open(Location::Path(&p), Some(4096), Some(3600)).unwrap()), p)
    }

    /// The same calls answered alike in this process and in a shared-memory store.
    #[test]
    fn both_engines_answer_alike() {
        let (table, p) = store("alike");
        let clock = ManualClock::new(0);
        let rates = [rate("10/minute"), rate("1000/minute"), None];
        let local = Budget::new(rates, Some(1), Clock::Manual(clock.clone()), 3600.0, None, 60.0).unwrap();
        let shared = Budget::shared(rates, Some(1), table, "t", Clock::Manual(clock.clone()), 60.0).unwrap();
        assert!(!local.is_shared() && shared.is_shared() && shared.store_path() == Some(p.as_str()));
        for b in [&local, &shared] {
            let k = b.key(KeyKind::Str, b"k");
            let r = b.reserve(&k, 600).unwrap();
            assert!(r.allowed && r.lease.is_some() && !r.shadow);
            assert_eq!(r.limits[Limit::Tokens as usize].unwrap().remaining, 400);
            assert_eq!(r.decision.remaining, 0, "the concurrency limit is the tightest");
            let busy = b.reserve(&k, 1).unwrap();
            assert!(!busy.allowed && busy.lease.is_none());
            assert_eq!(busy.limits[Limit::Requests as usize].unwrap().remaining, 8, "told, charging nothing");
            assert!(b.settle(&k, 100 - 600, 0, r.charged_at, r.lease).unwrap());
            assert!(!b.release(&k, r.lease.unwrap()).unwrap(), "the lease ended with the settle");
            let inspected = b.inspect(&k).unwrap();
            assert_eq!(inspected.limits[Limit::Tokens as usize].as_ref().unwrap().remaining, 900);
            assert_eq!(inspected.concurrency, Some((1, 0)));
            let tight = b.reserve(&k, 950).unwrap();
            assert!(!tight.allowed && tight.lease.is_none(), "no lease taken when the tokens say no");
            assert_eq!(tight.limits[Limit::Tokens as usize].unwrap().retry_after, Some(3 * NANOS));
            let late = b.reserve(&k, 10).unwrap();
            clock.advance(61 * NANOS);
            assert!(b.expired(late.charged_at) && !b.settle(&k, -10, -1, late.charged_at, late.lease).unwrap());
            assert!(b.reserve(&k, 1).unwrap().allowed, "the expired lease is free again");
            b.set_quota(&k, [None, rate("2000/minute"), None]).unwrap();
            assert_eq!(b.peek(&k, 0).unwrap().limits[Limit::Tokens as usize].unwrap().limit, 2000);
            assert_eq!(b.set_quota(&k, [None; 3]).unwrap_err().to_string(), none_given().to_string());
            let err = b.set_quota(&k, [None, None, rate("1/day")]).unwrap_err().to_string();
            assert_eq!(err, "this TokenLimiter has no daily_tokens limit to change");
            assert!(b.clear_quota(&k).unwrap() && !b.clear_quota(&k).unwrap());
            b.reset(&k).unwrap();
            let fresh = b.peek(&k, 0).unwrap();
            assert_eq!(
                (fresh.limits[Limit::Requests as usize].unwrap().remaining, fresh.concurrency.unwrap().remaining),
                (9, 0)
            );
            assert_eq!(b.rate(Limit::Tokens), rate("1000/minute"));
            assert_eq!((b.concurrency_max(), b.lease_ttl_ns()), (Some(1), 60 * NANOS));
            assert!(b.stats().limits[Limit::Tokens as usize].is_some() && b.stats().concurrency_keys.is_some());
        }
        assert!(shared.set_default([None, rate("1/s"), None], None).is_err());
        assert!(shared.top(Limit::Tokens, 3).is_err() && local.top(Limit::Tokens, 3).is_ok());
        let other = local.key(KeyKind::Str, b"k");
        assert!(shared.reserve(&other, 1).is_err(), "a key of another budget");
        local.count(Tally { reserved: 210, settled: 1500, refunded: 100 });
        assert_eq!(local.tally(), Tally { reserved: 210, settled: 1500, refunded: 100 });
        std::fs::remove_file(p).unwrap();
    }

    /// Threads, each with its own budget on one store (as processes would have): the
    /// key's tokens and leases are shared exactly.
    #[test]
    fn budgets_on_one_store_share_exactly() {
        let (table, p) = store("threads");
        let clock = ManualClock::new(NANOS);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (table, clock) = (Arc::clone(&table), clock.clone());
                std::thread::spawn(move || {
                    let rates = [None, rate("1000/hour"), None];
                    let b = Budget::shared(rates, Some(5), table, "t", Clock::Manual(clock), 60.0).unwrap();
                    let k = b.key(KeyKind::Int, &7u64.to_le_bytes());
                    // Tokens: reserved and settled at once, so only the tokens limit binds.
                    let mut tokens = 0;
                    for _ in 0..100 {
                        let r = b.reserve(&k, 10).unwrap();
                        if r.allowed {
                            tokens += 10;
                            assert!(b.settle(&k, 0, 0, r.charged_at, r.lease).unwrap());
                        }
                    }
                    // Leases: kept, so only the concurrency limit binds.
                    let held: Vec<Reserved> = (0..5).map(|_| b.reserve(&k, 0).unwrap()).filter(|r| r.allowed).collect();
                    (tokens, held.len())
                })
            })
            .collect();
        let results: Vec<(u64, usize)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().map(|r| r.0).sum::<u64>(), 1000, "{results:?}");
        assert_eq!(results.iter().map(|r| r.1).sum::<usize>(), 5, "{results:?}");
        std::fs::remove_file(p).unwrap();
    }
}
