//! Token bucket and leaky bucket (as a queue), both as GCRA.
//!
//! GCRA keeps one number per key, the theoretical arrival time `tat`: the moment the
//! bucket will be full again. With an emission interval `T = period / count` and a
//! tolerance `tau = burst * T`, a call of `cost` is admitted when
//! `max(tat, now) + cost * T - now <= tau`, and then `tat` moves to that sum.
//!
//! `T` is rarely a whole number of nanoseconds (7/day is 12342857142857.14 ns), so
//! time is kept in *scaled ticks* of `1 / count` ns: `now` becomes `now * count` and
//! `T` becomes exactly `period_ns`. Nothing is rounded, so no fraction of a refill is
//! ever lost; a tick state fits the 16-byte `u128`.
//!
//! The same state, read as a queue, is the leaky bucket used for shaping: `tat - now`
//! is the backlog that still has to drain, the capacity bounds it, and an admitted call
//! waits `delay = max(tat - now, 0)` so that admitted work leaves at a steady rate.

use super::{clamp_ns, div_floor, Decision, State};
use crate::error::{Error, Result};
use crate::rate::Rate;

/// The largest tolerance `burst * period` (in ns) accepted: about 146 years.
const MAX_TAU_NS: u128 = 1 << 62;

#[derive(Clone, Debug)]
pub struct Gcra {
    pub count: u64,
    pub period_ns: u64,
    pub burst: u64,
    /// `burst * period_ns`: the tolerance in ticks.
    tau: u128,
}

impl Gcra {
    /// `burst` units may be taken at once; they refill at `rate`.
    pub fn new(rate: Rate, burst: u64) -> Result<Gcra> {
        if burst == 0 {
            return Err(Error::InvalidArgument("burst/capacity must be at least 1, got 0".into()));
        }
        let tau = burst as u128 * rate.period_ns as u128;
        // In nanoseconds the tolerance is tau / count.
        if tau / rate.count as u128 > MAX_TAU_NS {
            return Err(Error::InvalidArgument(format!(
                "burst/capacity {burst} at {rate} takes over 146 years to refill; use a smaller one"
            )));
        }
        Ok(Gcra { count: rate.count, period_ns: rate.period_ns, burst, tau })
    }

    #[inline]
    fn ticks(&self, now: u64) -> u128 {
        now as u128 * self.count as u128
    }

    /// Ticks to nanoseconds, rounded up so that waiting that long is always enough.
    #[inline]
    fn ns(&self, ticks: u128) -> u64 {
        clamp_ns(ticks.div_ceil(self.count as u128))
    }

    #[inline(always)]
    pub fn step(&self, tat: State, now: u64, cost: u64, shaping: bool) -> (State, Decision) {
        let now_t = self.ticks(now);
        let base = if tat > now_t { tat } else { now_t };
        let backlog = base - now_t;
        // Capacity left before this call, in whole units.
        let free_units = div_floor(self.tau - backlog.min(self.tau), self.period_ns) as u64;
        if cost > self.burst {
            return (tat, Decision::never(self.burst, free_units, self.ns(backlog)));
        }
        let after = backlog + cost as u128 * self.period_ns as u128;
        if after <= self.tau {
            let decision = Decision {
                allowed: true,
                limit: self.burst,
                remaining: div_floor(self.tau - after, self.period_ns) as u64,
                reset_after: self.ns(after),
                retry_after: Some(0),
                delay: if shaping { self.ns(backlog) } else { 0 },
            };
            (base + (after - backlog), decision)
        } else {
            let decision = Decision {
                allowed: false,
                limit: self.burst,
                remaining: free_units,
                reset_after: self.ns(backlog),
                retry_after: Some(self.ns(after - self.tau)),
                delay: 0,
            };
            (tat, decision)
        }
    }

    /// Charges `delta` more units (delta > 0, even past the burst: the key goes into
    /// debt and is denied until it has paid it back) or refunds `-delta` units (never
    /// past a full bucket). Used to settle a reservation with the actual cost.
    pub fn adjust(&self, tat: State, now: u64, delta: i64) -> State {
        let now_t = self.ticks(now);
        let units = delta.unsigned_abs() as u128 * self.period_ns as u128;
        if delta >= 0 {
            tat.max(now_t).saturating_add(units)
        } else if tat <= now_t {
            tat
        } else {
            tat.saturating_sub(units).max(now_t)
        }
    }

    /// The state with the same backlog of units under the quota `to` (see
    /// `Algorithm::convert`). The backlog is rounded up to a whole tick.
    pub fn convert(&self, to: &Gcra, tat: State, now: u64) -> State {
        let now_t = self.ticks(now);
        if tat <= now_t {
            return 0;
        }
        // units = backlog / period; the new backlog is units * to.period.
        let backlog = (tat - now_t).checked_mul(to.period_ns as u128).map(|b| b.div_ceil(self.period_ns as u128));
        let cap = to.tau.saturating_mul(2);
        to.ticks(now).saturating_add(backlog.unwrap_or(cap).min(cap.max(1)))
    }

    /// `a` with `b`'s backlog added.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let now_t = self.ticks(now);
        if b <= now_t {
            return a;
        }
        a.max(now_t).saturating_add(b - now_t)
    }

    #[inline]
    pub fn is_fresh(&self, tat: State, now: u64) -> bool {
        tat <= self.ticks(now)
    }

    pub fn time_to_fresh(&self) -> u64 {
        self.ns(self.tau)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS;

    fn bucket(rate: &str, burst: u64) -> Gcra {
        Gcra::new(Rate::parse(rate).unwrap(), burst).unwrap()
    }

    #[test]
    fn new_key_starts_full_and_denies_past_burst() {
        let g = bucket("10/s", 3);
        let mut s = 0;
        for left in [2, 1, 0] {
            let (n, d) = g.step(s, 0, 1, false);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            s = n;
        }
        let (n, d) = g.step(s, 0, 1, false);
        assert!(!d.allowed);
        assert_eq!(n, s, "a denied call must not change the state");
        assert_eq!(d.retry_after, Some(NANOS / 10));
        assert_eq!(d.reset_after, 3 * NANOS / 10);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn refills_continuously_with_nanosecond_precision() {
        // 7/day: T = 12342857142857.142857... ns, never a whole number of ns.
        let g = bucket("7/day", 7);
        let (s, d) = g.step(0, 0, 7, false);
        assert!(d.allowed);
        let day = 86_400 * NANOS;
        // One ns before a full day, 6.99999... units have refilled: 6 whole ones.
        let (_, d) = g.step(s, day - 1, 7, false);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 6);
        assert_eq!(d.retry_after, Some(1));
        // At exactly one day all seven are back; nothing was lost to rounding.
        let (_, d) = g.step(s, day, 7, false);
        assert!(d.allowed);
        // A single unit refills after ceil(T).
        let (s, _) = g.step(0, 0, 7, false);
        let t = day / 7;
        assert!(!g.step(s, t, 1, false).1.allowed);
        assert!(g.step(s, t + 1, 1, false).1.allowed);
    }

    #[test]
    fn cost_above_burst_is_never_admitted() {
        let g = bucket("10/s", 5);
        let (s, d) = g.step(0, 0, 6, false);
        assert_eq!(s, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, None);
        assert_eq!(d.remaining, 5);
        let (_, d) = g.step(0, 0, 5, false);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn retry_after_is_exactly_enough() {
        let g = bucket("3/7s", 2);
        let mut s = 0;
        let mut now = 0;
        for _ in 0..50 {
            let (n, d) = g.step(s, now, 2, false);
            if d.allowed {
                s = n;
            } else {
                let wait = d.retry_after.unwrap();
                assert!(wait > 0);
                assert!(!g.step(s, now + wait - 1, 2, false).1.allowed);
                let (n, d) = g.step(s, now + wait, 2, false);
                assert!(d.allowed);
                s = n;
                now += wait;
            }
        }
    }

    #[test]
    fn leaky_bucket_spaces_admitted_calls() {
        let g = bucket("10/s", 3);
        let mut s = 0;
        let mut delays = vec![];
        for _ in 0..3 {
            let (n, d) = g.step(s, 0, 1, true);
            assert!(d.allowed);
            delays.push(d.delay);
            s = n;
        }
        assert_eq!(delays, vec![0, NANOS / 10, 2 * NANOS / 10]);
        let (_, d) = g.step(s, 0, 1, true);
        assert!(!d.allowed);
        assert_eq!(d.delay, 0);
        // After 150 ms, 1.5 units drained: the next call waits 150 ms.
        let (_, d) = g.step(s, 150_000_000, 1, true);
        assert!(d.allowed);
        assert_eq!(d.delay, 150_000_000);
    }

    #[test]
    fn freshness() {
        let g = bucket("1/s", 2);
        let (s, _) = g.step(0, 10 * NANOS, 2, false);
        assert!(!g.is_fresh(s, 11 * NANOS));
        assert!(g.is_fresh(s, 12 * NANOS));
        assert!(g.is_fresh(0, 0));
        assert_eq!(g.time_to_fresh(), 2 * NANOS);
    }

    #[test]
    fn adjust_charges_into_debt_and_refunds_up_to_full() {
        let g = bucket("10/s", 10);
        let (s, _) = g.step(0, 0, 4, false);
        let refunded = g.adjust(s, 0, -3);
        assert_eq!(g.step(refunded, 0, 9, false).1.remaining, 0);
        assert!(g.is_fresh(g.adjust(s, 0, -100), 0), "a refund never overfills");
        let debt = g.adjust(s, 0, 20);
        let d = g.step(debt, 0, 1, false).1;
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Some(1_500_000_000), "24 units charged: 14 over, then 1 more");
        assert_eq!(g.adjust(0, 5 * NANOS, -3), 0, "nothing to refund on a full bucket");
    }

    #[test]
    fn rejects_bad_bursts() {
        assert!(Gcra::new(Rate::parse("1/s").unwrap(), 0).is_err());
        let err = Gcra::new(Rate::parse("1/w").unwrap(), 1 << 40).unwrap_err();
        assert!(err.to_string().contains("146 years"));
    }

    #[test]
    fn huge_times_do_not_overflow() {
        let g = bucket("1000000/ms", 1_000_000);
        let (s, d) = g.step(0, u64::MAX - 5, 1_000_000, false);
        assert!(d.allowed);
        assert!(!g.step(s, u64::MAX - 5, 1, false).1.allowed);
    }
}
