//! A token budget in this process: each rate limit is a [`Limiter`] of its own, decided
//! together as a [`Group`] (its shards locked in one global order), and the concurrency
//! limit a [`Concurrency`] whose lease is taken under the key's lock around the rate
//! check, only if the rates admit.

use super::{Limit, Rates, Reserved};
use crate::clock::Clock;
use crate::composite::Group;
use crate::concurrency::Concurrency;
use crate::decision::{combine, Decision};
use crate::error::{Error, Result};
use crate::key::Fingerprint;
use crate::limiter::Limiter;
use crate::quota::{Kind, Quota};
use crate::rate::Rate;
use std::sync::Arc;

/// Request and token limits plus an optional concurrency limit, reserved together, in
/// this process.
pub struct InProcessBudget {
    /// The rate limits that are set, decided together.
    group: Group,
    /// For each [`Limit`], its index in `group`, if it is set.
    index: [Option<usize>; 3],
    concurrency: Option<Arc<Concurrency>>,
    clock: Clock,
    lease_ttl_ns: u64,
}

fn bucket(rate: Rate) -> Result<Quota> {
    Quota::new(Kind::TokenBucket, rate, None, 0)
}

impl InProcessBudget {
    /// `rates` and `concurrency` (at least one of them), every rate limit with `ttl_secs`
    /// and `max_keys` as a [`Limiter`]'s; a reservation stands (and its lease lives)
    /// `lease_ttl_secs`.
    pub fn new(
        rates: Rates,
        concurrency: Option<u64>,
        clock: Clock,
        ttl_secs: f64,
        max_keys: Option<usize>,
        lease_ttl_secs: f64,
    ) -> Result<InProcessBudget> {
        let mut parts = Vec::new();
        let mut index = [None; 3];
        for limit in Limit::ALL {
            if let Some(rate) = rates[limit as usize] {
                index[limit as usize] = Some(parts.len());
                parts.push(Arc::new(Limiter::new(bucket(rate)?, clock.clone(), ttl_secs, max_keys)?));
            }
        }
        let concurrency =
            concurrency.map(|n| Concurrency::new(n, lease_ttl_secs, clock.clone()).map(Arc::new)).transpose()?;
        super::check_new(&rates, concurrency.as_ref().map(|c| c.max()), lease_ttl_secs)?;
        Ok(InProcessBudget {
            group: Group::new(parts)?,
            index,
            concurrency,
            clock,
            lease_ttl_ns: crate::clock::secs_to_ns(lease_ttl_secs).max(1),
        })
    }

    /// The limiter of one rate limit, if it is set.
    pub fn limiter(&self, limit: Limit) -> Option<&Arc<Limiter>> {
        self.index[limit as usize].map(|i| &self.group.parts()[i])
    }

    /// The limiter of one rate limit, or an error naming it.
    pub fn limiter_or_err(&self, limit: Limit) -> Result<&Arc<Limiter>> {
        self.limiter(limit)
            .ok_or_else(|| Error::InvalidArgument(format!("this TokenLimiter has no {} limit", limit.name())))
    }

    pub fn concurrency(&self) -> Option<&Arc<Concurrency>> {
        self.concurrency.as_ref()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn lease_ttl_ns(&self) -> u64 {
        self.lease_ttl_ns
    }

    fn costs(&self, tokens: u64) -> Vec<u64> {
        let mut costs = vec![0; self.group.parts().len()];
        for limit in Limit::ALL {
            if let Some(i) = self.index[limit as usize] {
                costs[i] = limit.cost(tokens);
            }
        }
        costs
    }

    /// The rate limits' combined decision and each one's, charging them with `charge`.
    fn check_rates(&self, fp: &Fingerprint, tokens: u64, charge: bool) -> Option<(Decision, Vec<Decision>)> {
        if self.group.is_empty() {
            return None;
        }
        let mut each = Vec::with_capacity(self.group.parts().len());
        let d = self.group.check(fp, &self.costs(tokens), charge, Some(&mut each));
        Some((d, each))
    }

    fn answer(
        &self,
        rates: Option<(Decision, Vec<Decision>)>,
        concurrency: Option<Decision>,
        lease: Option<u64>,
        charged_at: u64,
    ) -> Reserved {
        let all: Vec<Decision> = rates.iter().map(|r| r.0).chain(concurrency).collect();
        let decision = combine(&all);
        let each = rates.map(|r| r.1);
        let mut limits = [None; 3];
        for limit in Limit::ALL {
            if let (Some(i), Some(each)) = (self.index[limit as usize], &each) {
                limits[limit as usize] = Some(each[i]);
            }
        }
        // Admitted although a limit said no: that limit is in shadow mode.
        let shadow = decision.allowed && each.as_ref().is_some_and(|e| e.iter().any(|d| !d.allowed));
        Reserved { allowed: decision.allowed, decision, shadow, limits, concurrency, lease, charged_at }
    }

    /// Reserves one request and `tokens` tokens for the key against every limit at once,
    /// with a concurrency lease: all of it, or nothing.
    pub fn reserve(&self, fp: &Fingerprint, tokens: u64) -> Reserved {
        let now = self.clock.now();
        match &self.concurrency {
            Some(c) => {
                // The rate limits are charged under the lease's lock, only if a lease is
                // free, and the lease is taken only if they admit.
                let (lease, d, ran) = c.acquire_if(fp, || match self.check_rates(fp, tokens, true) {
                    Some(rates) => (rates.0.allowed, Some(rates)),
                    None => (true, None),
                });
                // No lease free: the rate limits are told, charging nothing.
                let rates = ran.unwrap_or_else(|| self.check_rates(fp, tokens, false));
                self.answer(rates, Some(d), lease, now)
            }
            None => self.answer(self.check_rates(fp, tokens, true), None, None, now),
        }
    }

    /// What [`reserve`](Self::reserve) would decide now, charging nothing and taking no
    /// lease.
    pub fn peek(&self, fp: &Fingerprint, tokens: u64) -> Reserved {
        let rates = self.check_rates(fp, tokens, false);
        self.answer(rates, self.concurrency.as_ref().map(|c| c.peek(fp)), None, 0)
    }

    /// True when a reservation charged at `charged_at` has outlived `lease_ttl`: it stands
    /// at its estimate.
    pub fn expired(&self, charged_at: u64) -> bool {
        self.clock.now() > charged_at.saturating_add(self.lease_ttl_ns)
    }

    /// Charges (`tokens > 0`) or refunds (`tokens < 0`) tokens of a reservation charged at
    /// `charged_at` on the token limits, and `requests` requests.
    pub fn adjust(&self, fp: &Fingerprint, tokens: i64, charged_at: u64, requests: i64) {
        if tokens == 0 && requests == 0 {
            return;
        }
        let mut deltas = vec![0i64; self.group.parts().len()];
        for limit in Limit::ALL {
            if let Some(i) = self.index[limit as usize] {
                deltas[i] = if limit == Limit::Requests { requests } else { tokens };
            }
        }
        self.group.adjust(fp, &deltas, charged_at);
    }

    /// Ends a reservation's concurrency lease; true if it was still held.
    pub fn release(&self, fp: &Fingerprint, lease: u64) -> bool {
        self.concurrency.as_ref().is_some_and(|c| c.release(fp, lease))
    }

    /// Ends a reservation charged at `charged_at`: charges `tokens` more tokens (a refund
    /// when negative) and `requests` more requests, and ends its lease. Settling at the
    /// actual count is `tokens = actual - estimate, requests = 0`; cancelling refunds it
    /// all, `tokens = -estimate, requests = -1`. False, doing nothing, once the
    /// reservation has expired: its estimate stands.
    pub fn settle(&self, fp: &Fingerprint, tokens: i64, requests: i64, charged_at: u64, lease: Option<u64>) -> bool {
        if self.expired(charged_at) {
            return false;
        }
        self.adjust(fp, tokens, charged_at, requests);
        if let Some(lease) = lease {
            self.release(fp, lease);
        }
        true
    }

    /// Forgets the key everywhere, its leases included.
    pub fn reset(&self, fp: &Fingerprint) {
        for p in self.group.parts() {
            p.reset(fp);
        }
        if let Some(c) = &self.concurrency {
            c.reset(fp);
        }
    }

    pub fn sweep(&self) -> usize {
        self.group.parts().iter().map(|p| p.sweep()).sum::<usize>() + self.concurrency.as_ref().map_or(0, |c| c.sweep())
    }

    /// The rate limits given a new rate, each with its limiter.
    fn changes(&self, rates: Rates) -> Result<Vec<(&Arc<Limiter>, Quota)>> {
        let mut out = Vec::new();
        for limit in Limit::ALL {
            if let Some(rate) = rates[limit as usize] {
                let Some(limiter) = self.limiter(limit) else {
                    return Err(Error::InvalidArgument(format!(
                        "this TokenLimiter has no {} limit to change",
                        limit.name()
                    )));
                };
                out.push((limiter, bucket(rate)?));
            }
        }
        Ok(out)
    }

    /// Gives the key its own rate for each limit given, keeping what it has used.
    pub fn set_quota(&self, fp: &Fingerprint, rates: Rates) -> Result<()> {
        let changes = self.changes(rates)?;
        if changes.is_empty() {
            return Err(super::none_given());
        }
        changes.into_iter().try_for_each(|(limiter, quota)| limiter.set_quota(fp, quota))
    }

    /// Puts the key back on the default rates; false if it had none of its own.
    pub fn clear_quota(&self, fp: &Fingerprint) -> bool {
        // Every limit is cleared (no short-circuit).
        let mut any = false;
        for p in self.group.parts() {
            any |= p.clear_quota(fp).unwrap_or(false);
        }
        any
    }

    /// Changes the default rates given (keys with their own keep theirs) keeping usage,
    /// and the concurrency limit (leases held stay held).
    pub fn set_default(&self, rates: Rates, concurrency: Option<u64>) -> Result<()> {
        let max = match (concurrency, &self.concurrency) {
            (None, _) => None,
            (Some(n), Some(c)) => Some((c, n)),
            (Some(_), None) => {
                return Err(Error::InvalidArgument("this TokenLimiter has no concurrency limit to change".into()))
            }
        };
        let changes = self.changes(rates)?;
        if changes.is_empty() && max.is_none() {
            return Err(super::none_given());
        }
        if let Some((c, n)) = max {
            c.set_max(n)?;
        }
        changes.into_iter().try_for_each(|(limiter, quota)| limiter.set_default(quota))
    }

    /// Shadow mode of the rate limits (concurrency leases stay real).
    pub fn shadow(&self) -> bool {
        self.group.parts().iter().any(|p| p.shadow())
    }

    pub fn set_shadow(&self, on: bool) {
        for p in self.group.parts() {
            p.set_shadow(on);
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

    fn rate(s: &str) -> Option<Rate> {
        Some(Rate::parse(s).unwrap())
    }

    fn budget(rates: Rates, concurrency: Option<u64>, clock: &ManualClock) -> InProcessBudget {
        InProcessBudget::new(rates, concurrency, Clock::Manual(clock.clone()), 3600.0, None, 60.0).unwrap()
    }

    fn remaining(b: &InProcessBudget, limit: Limit, key: &str) -> u64 {
        b.limiter(limit).unwrap().peek(&fp(key), 0).remaining
    }

    #[test]
    fn reserves_everything_or_nothing() {
        let clock = ManualClock::new(0);
        let b = budget([rate("10/minute"), rate("1000/minute"), None], Some(1), &clock);
        let r = b.reserve(&fp("k"), 600);
        assert!(r.allowed && r.lease.is_some() && !r.shadow);
        assert_eq!(r.limits[Limit::Tokens as usize].unwrap().remaining, 400);
        assert_eq!(r.limits[Limit::DailyTokens as usize], None);
        assert_eq!(r.decision.remaining, 0, "the concurrency limit is the tightest");
        let busy = b.reserve(&fp("k"), 1);
        assert!(!busy.allowed && busy.lease.is_none());
        assert_eq!(remaining(&b, Limit::Requests, "k"), 9, "a refused lease charges nothing");
        assert!(b.settle(&fp("k"), 100 - 600, 0, r.charged_at, r.lease));
        assert_eq!(remaining(&b, Limit::Tokens, "k"), 900, "the 500 tokens estimated too many are back");
        let tight = b.reserve(&fp("k"), 950);
        assert!(!tight.allowed && tight.lease.is_none(), "no lease taken when the tokens say no");
        assert_eq!(tight.limits[Limit::Tokens as usize].unwrap().retry_after, Some(3 * NANOS));
        assert!(b.concurrency().unwrap().held(&fp("k")) == 0);
    }

    #[test]
    fn settles_cancels_and_expires() {
        let clock = ManualClock::new(0);
        let b = budget([rate("10/minute"), rate("1000/minute"), rate("5000/day")], None, &clock);
        let r = b.reserve(&fp("k"), 100);
        assert!(b.settle(&fp("k"), -100, -1, r.charged_at, r.lease), "cancelled");
        assert_eq!((remaining(&b, Limit::Requests, "k"), remaining(&b, Limit::DailyTokens, "k")), (10, 5000));
        let r = b.reserve(&fp("k"), 100);
        assert!(
            b.settle(&fp("k"), 1400, 0, r.charged_at, r.lease),
            "an actual count above the estimate goes into debt"
        );
        assert!(!b.peek(&fp("k"), 0).allowed);
        assert_eq!(remaining(&b, Limit::DailyTokens, "k"), 3500);
        let late = b.reserve(&fp("other"), 10);
        clock.advance(61 * NANOS);
        assert!(b.expired(late.charged_at));
        assert!(!b.settle(&fp("other"), -10, -1, late.charged_at, late.lease), "past lease_ttl the estimate stands");
        // 10 used, 3.5 of them refilled in 61 s at 5000/day; a refund would have left 5000.
        assert_eq!(remaining(&b, Limit::DailyTokens, "other"), 4993);
    }

    #[test]
    fn quotas_shadow_and_validation() {
        let clock = ManualClock::new(0);
        let b = budget([None, rate("1000/minute"), None], Some(2), &clock);
        assert!(b.reserve(&fp("k"), 500).allowed);
        b.set_quota(&fp("k"), [None, rate("600/minute"), None]).unwrap();
        assert_eq!(remaining(&b, Limit::Tokens, "k"), 100);
        let err = b.set_quota(&fp("k"), [rate("1/s"), None, None]).unwrap_err().to_string();
        assert_eq!(err, "this TokenLimiter has no requests limit to change");
        assert!(b.set_quota(&fp("k"), [None; 3]).unwrap_err().to_string().contains("give at least one"));
        assert!(b.clear_quota(&fp("k")) && !b.clear_quota(&fp("k")));
        b.set_default([None, rate("2000/minute"), None], Some(3)).unwrap();
        assert_eq!((remaining(&b, Limit::Tokens, "k"), b.concurrency().unwrap().max()), (1500, 3));
        b.set_default([None; 3], Some(4)).unwrap();
        assert!(b.set_default([None; 3], None).is_err());
        b.set_shadow(true);
        let r = b.reserve(&fp("k"), 1800);
        assert!(r.allowed && r.shadow);
        assert!(b.shadow());
        assert!(b.limiter_or_err(Limit::Requests).err().unwrap().to_string().contains("no requests limit"));
        assert_eq!(Limit::parse("daily_tokens").unwrap(), Limit::DailyTokens);
        assert!(Limit::parse("dollars").is_err());
        b.reset(&fp("k"));
        assert_eq!(remaining(&b, Limit::Tokens, "k"), 2000);
        let nothing = InProcessBudget::new([None; 3], None, Clock::Monotonic, 60.0, None, 1.0).err().unwrap();
        assert!(nothing.to_string().contains("needs at least one"));
        let bad_ttl =
            InProcessBudget::new([rate("1/s"), None, None], None, Clock::Monotonic, 60.0, None, 0.0).err().unwrap();
        assert!(bad_ttl.to_string().contains("lease_ttl must be"));
    }

    #[test]
    fn concurrency_only() {
        let clock = ManualClock::new(0);
        let b = budget([None; 3], Some(1), &clock);
        let r = b.reserve(&fp("k"), 10);
        assert!(r.allowed && r.limits == [None; 3]);
        assert!(!b.reserve(&fp("k"), 10).allowed);
        assert!(b.settle(&fp("k"), 0, 0, r.charged_at, r.lease));
        assert!(b.peek(&fp("k"), 10).allowed);
    }
}
