//! Sliding window counter: two fixed windows, weighted.
//!
//! The estimate of the units used in the last `period` is
//! `previous * (1 - elapsed / period) + current`, where `current` counts the units
//! admitted in the window containing `now` (windows aligned like a fixed window's, see
//! [`super::Windows`]), `previous` those of the window before, and `elapsed` the time since the
//! current window began. A call of `cost` is admitted when `estimate + cost <= limit`.
//! The comparison is done exactly in integers (everything multiplied by the period).
//!
//! The estimate assumes the previous window's units were spread evenly; across a
//! window boundary, real traffic in any sliding `period` can reach up to twice the
//! limit in the worst case. That is the algorithm's definition, not a rounding error.
//!
//! State: window index (48 bits, wrapping), previous count (40 bits), current count
//! (40 bits). Limits are therefore at most 2^40 - 1 units per window.

use super::{clamp_ns, Decision, State, Windows};
use crate::error::{Error, Result};
use crate::rate::Rate;

const COUNT_BITS: u32 = 40;
const COUNT_MASK: u128 = (1 << COUNT_BITS) - 1;
const WINDOW_MASK: u64 = (1 << 48) - 1;
pub const MAX_LIMIT: u64 = (1 << COUNT_BITS) - 1;

#[derive(Clone, Debug)]
pub struct SlidingWindow {
    pub limit: u64,
    pub period_ns: u64,
    pub windows: Windows,
}

#[inline]
fn pack(window: u64, prev: u64, cur: u64) -> State {
    (((window & WINDOW_MASK) as u128) << 80) | ((prev as u128) << COUNT_BITS) | cur as u128
}

impl SlidingWindow {
    /// Windows starting at multiples of the period from the Unix epoch.
    pub fn new(rate: Rate) -> Result<SlidingWindow> {
        SlidingWindow::aligned(rate, 0)
    }

    /// Windows starting `align_ns` after multiples of the period from the Unix epoch.
    pub fn aligned(rate: Rate, align_ns: i64) -> Result<SlidingWindow> {
        if rate.count > MAX_LIMIT {
            return Err(Error::InvalidRate(format!(
                "sliding window limit {} is too large (at most {MAX_LIMIT})",
                rate.count
            )));
        }
        Ok(SlidingWindow { limit: rate.count, period_ns: rate.period_ns, windows: Windows::new(align_ns)? })
    }

    /// The window containing `now` and the time left in it (in `(0, period]`).
    #[inline(always)]
    fn at(&self, now: u64) -> (u64, u64) {
        self.windows.at(now, self.period_ns)
    }

    /// (previous, current) counts as seen from `window`.
    #[inline]
    fn counts(&self, state: State, window: u64) -> (u64, u64) {
        let w = (state >> 80) as u64;
        let prev = ((state >> COUNT_BITS) & COUNT_MASK) as u64;
        let cur = (state & COUNT_MASK) as u64;
        match (window & WINDOW_MASK).wrapping_sub(w) & WINDOW_MASK {
            0 => (prev, cur),
            1 => (cur, 0),
            _ => (0, 0),
        }
    }

    #[inline(always)]
    pub fn step(&self, state: State, now: u64, cost: u64) -> (State, Decision) {
        let p = self.period_ns as u128;
        let l = self.limit as u128;
        let (window, rest) = self.at(now);
        let (prev, cur) = self.counts(state, window);
        // estimate * period, exactly.
        let weighted = prev as u128 * rest as u128 + cur as u128 * p;
        let room = (l * p).saturating_sub(weighted);
        let reset = |prev: u64, cur: u64| {
            if cur > 0 {
                rest + self.period_ns
            } else if prev > 0 {
                rest
            } else {
                0
            }
        };
        let free = (room / p) as u64;
        if cost > self.limit {
            return (state, Decision::never(self.limit, free, reset(prev, cur)));
        }
        let need = cost as u128 * p;
        if need <= room {
            let decision = Decision {
                allowed: true,
                limit: self.limit,
                remaining: ((room - need) / p) as u64,
                reset_after: reset(prev, cur + cost),
                retry_after: Some(0),
                delay: 0,
            };
            (pack(window, prev, cur + cost), decision)
        } else {
            let wait = if cur + cost <= self.limit {
                // Still in this window, once enough of `previous` has slid out:
                // prev * (rest - t) <= (limit - cur - cost) * period.
                let allowance = (l - cur as u128 - cost as u128) * p / prev as u128;
                rest as u128 - allowance
            } else {
                // In the next window `previous` becomes `cur`:
                // cur * (period - e) <= (limit - cost) * period, e from the window start.
                let allowance = (l - cost as u128) * p / cur as u128;
                rest as u128 + p.saturating_sub(allowance)
            };
            let decision = Decision {
                allowed: false,
                limit: self.limit,
                remaining: free,
                reset_after: reset(prev, cur),
                retry_after: Some(clamp_ns(wait)),
                delay: 0,
            };
            (state, decision)
        }
    }

    /// Charges (`delta > 0`, into the current window, saturating at the largest count)
    /// or refunds (`delta < 0`) units of a call made at `charged_at`: from the current
    /// window if it was charged there, from the previous one if it was charged there.
    pub fn adjust(&self, state: State, now: u64, delta: i64, charged_at: u64) -> State {
        let window = self.at(now).0;
        let (prev, cur) = self.counts(state, window);
        let amount = delta.unsigned_abs();
        if delta >= 0 {
            return pack(window, prev, cur.saturating_add(amount).min(MAX_LIMIT));
        }
        let charged = self.at(charged_at).0;
        if charged == window {
            pack(window, prev, cur.saturating_sub(amount))
        } else if charged + 1 == window {
            pack(window, prev.saturating_sub(amount), cur)
        } else {
            state
        }
    }

    /// The counts of `a` and `b`, seen from the current window, added.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let window = self.at(now).0;
        let (pa, ca) = self.counts(a, window);
        let (pb, cb) = self.counts(b, window);
        pack(window, (pa + pb).min(MAX_LIMIT), (ca + cb).min(MAX_LIMIT))
    }

    /// The state under the quota `to` (see `Algorithm::convert`): with another period,
    /// the estimate of the units used in the last period goes into the current window.
    pub fn convert(&self, to: &SlidingWindow, state: State, now: u64) -> State {
        if to.period_ns == self.period_ns {
            return state;
        }
        let p = self.period_ns as u128;
        let (window, rest) = self.at(now);
        let (prev, cur) = self.counts(state, window);
        let used = (prev as u128 * rest as u128 + cur as u128 * p).div_ceil(p).min(MAX_LIMIT as u128) as u64;
        if used == 0 {
            return 0;
        }
        pack(to.at(now).0, 0, used)
    }

    #[inline]
    pub fn is_fresh(&self, state: State, now: u64) -> bool {
        self.counts(state, self.at(now).0) == (0, 0)
    }

    pub fn time_to_fresh(&self) -> u64 {
        self.period_ns.saturating_mul(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS;

    fn sw(rate: &str) -> SlidingWindow {
        SlidingWindow::new(Rate::parse(rate).unwrap()).unwrap()
    }

    #[test]
    fn weights_the_previous_window() {
        let w = sw("10/10s");
        // Fill the window [0, 10s) with 10 units at t = 5 s.
        let (s, d) = w.step(0, 5 * NANOS, 10);
        assert!(d.allowed);
        assert_eq!(d.reset_after, 15 * NANOS);
        // At t = 12 s: estimate = 10 * (1 - 2/10) = 8, so 2 fit and 3 do not.
        let (_, d) = w.step(s, 12 * NANOS, 3);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 2);
        // 3 fit when 10 * (10 - e)/10 <= 7, i.e. e >= 3 s: retry after 1 s.
        assert_eq!(d.retry_after, Some(NANOS));
        let (s2, d) = w.step(s, 12 * NANOS, 2);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, 18 * NANOS);
        // Two windows later, nothing is left.
        assert!(w.is_fresh(s2, 30 * NANOS));
        assert!(!w.is_fresh(s2, 30 * NANOS - 1));
    }

    #[test]
    fn retry_waits_for_the_next_window_when_current_is_full() {
        let w = sw("4/s");
        let (s, _) = w.step(0, 0, 4);
        let (_, d) = w.step(s, NANOS / 2, 1);
        assert!(!d.allowed);
        // Next window: 4 * (1 - e) + 1 <= 4  <=>  e >= 0.25 s; from t = 0.5 s that is 0.75 s.
        assert_eq!(d.retry_after, Some(750_000_000));
        assert!(!w.step(s, NANOS / 2 + 750_000_000 - 1, 1).1.allowed);
        assert!(w.step(s, NANOS / 2 + 750_000_000, 1).1.allowed);
        // A cost equal to the limit must wait for the window after.
        let (_, d) = w.step(s, NANOS / 2, 4);
        assert_eq!(d.retry_after, Some(1_500_000_000));
        assert!(w.step(s, 2 * NANOS, 4).1.allowed);
        assert!(!w.step(s, 2 * NANOS - 1, 4).1.allowed);
    }

    #[test]
    fn retry_after_is_minimal_everywhere() {
        let w = sw("7/3s");
        let mut s = 0;
        let mut now = 0u64;
        for i in 0..400u64 {
            let cost = 1 + i % 4;
            let (n, d) = w.step(s, now, cost);
            if d.allowed {
                s = n;
            } else {
                let wait = d.retry_after.unwrap();
                assert!(wait > 0);
                assert!(!w.step(s, now + wait - 1, cost).1.allowed, "i={i}");
                let (n, d) = w.step(s, now + wait, cost);
                assert!(d.allowed, "i={i}");
                s = n;
                now += wait;
            }
            now += 123_456_789 * (i % 5);
        }
    }

    #[test]
    fn adjust_refunds_where_it_was_charged() {
        let w = sw("10/s");
        let (s, _) = w.step(0, 0, 6);
        assert_eq!(w.step(w.adjust(s, 0, -4, 0), 0, 8).1.remaining, 0);
        // In the next window the charge sits in `previous`: the refund goes there.
        let later = NANOS + NANOS / 2;
        let refunded = w.adjust(s, later, -6, 0);
        assert!(w.is_fresh(refunded, later));
        // Two windows later there is nothing left to refund.
        assert_eq!(w.adjust(s, 3 * NANOS, -6, 0), s);
        let over = w.adjust(s, 0, 10, 0);
        assert!(!w.step(over, 0, 1).1.allowed);
    }

    #[test]
    fn cost_above_limit_and_large_limits() {
        let w = sw("5/s");
        assert_eq!(w.step(0, 0, 6).1.retry_after, None);
        assert!(SlidingWindow::new(Rate::new(MAX_LIMIT + 1, NANOS).unwrap()).is_err());
        let big = SlidingWindow::new(Rate::new(MAX_LIMIT, NANOS).unwrap()).unwrap();
        let (s, d) = big.step(0, 0, MAX_LIMIT);
        assert!(d.allowed);
        assert!(!big.step(s, 0, 1).1.allowed);
        assert!(big.step(s, 2 * NANOS, MAX_LIMIT).1.allowed);
    }

    #[test]
    fn window_index_wraps_safely() {
        let w = sw("2/ms");
        let far = u64::MAX - 10;
        let (s, d) = w.step(0, far, 2);
        assert!(d.allowed);
        assert!(!w.step(s, far, 1).1.allowed);
    }
}
