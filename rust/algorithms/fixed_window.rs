//! Fixed window: at most `limit` units in each window `[align + k * period,
//! align + (k + 1) * period)` of Unix time (see [`super::Windows`]). State: the window
//! index (high 64 bits) and the units admitted in it (low 64 bits).

use super::{Decision, State, Windows};
use crate::error::Result;
use crate::rate::Rate;

#[derive(Clone, Debug)]
pub struct FixedWindow {
    pub limit: u64,
    pub period_ns: u64,
    pub windows: Windows,
}

#[inline]
fn unpack(state: State) -> (u64, u64) {
    ((state >> 64) as u64, state as u64)
}

#[inline]
fn pack(window: u64, count: u64) -> State {
    ((window as u128) << 64) | count as u128
}

impl FixedWindow {
    /// Windows starting at multiples of the period from the Unix epoch.
    pub fn new(rate: Rate) -> Result<FixedWindow> {
        FixedWindow::aligned(rate, 0)
    }

    /// Windows starting `align_ns` after multiples of the period from the Unix epoch.
    pub fn aligned(rate: Rate, align_ns: i64) -> Result<FixedWindow> {
        Ok(FixedWindow { limit: rate.count, period_ns: rate.period_ns, windows: Windows::new(align_ns)? })
    }

    /// The window containing `now` and the time left in it (in `(0, period]`).
    #[inline(always)]
    fn at(&self, now: u64) -> (u64, u64) {
        self.windows.at(now, self.period_ns)
    }

    /// Units already admitted in the window that contains `now`.
    #[inline]
    fn used(&self, state: State, window: u64) -> u64 {
        let (w, count) = unpack(state);
        if w == window {
            count
        } else {
            0
        }
    }

    #[inline(always)]
    pub fn step(&self, state: State, now: u64, cost: u64) -> (State, Decision) {
        let (window, rest) = self.at(now);
        let used = self.used(state, window);
        let free = self.limit.saturating_sub(used);
        let reset_if = |n: u64| if n > 0 { rest } else { 0 };
        if cost > self.limit {
            return (state, Decision::never(self.limit, free, reset_if(used)));
        }
        if cost <= free {
            let now_used = used + cost;
            let decision = Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.limit.saturating_sub(now_used),
                reset_after: reset_if(now_used),
                retry_after: Some(0),
                delay: 0,
            };
            (pack(window, now_used), decision)
        } else {
            let decision = Decision {
                allowed: false,
                limit: self.limit,
                remaining: free,
                reset_after: reset_if(used),
                retry_after: Some(rest),
                delay: 0,
            };
            (state, decision)
        }
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units of a call made at
    /// `charged_at`: a refund only reaches the window it was charged in.
    pub fn adjust(&self, state: State, now: u64, delta: i64, charged_at: u64) -> State {
        let window = self.at(now).0;
        let (w, count) = unpack(state);
        let count = if w == window { count } else { 0 };
        if delta >= 0 {
            return pack(window, count.saturating_add(delta as u64));
        }
        if self.at(charged_at).0 != window || w != window {
            return state;
        }
        pack(window, count.saturating_sub(delta.unsigned_abs()))
    }

    /// The units of `a` and `b` in the current window, added.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let window = self.at(now).0;
        pack(window, self.used(a, window).saturating_add(self.used(b, window)))
    }

    /// The state under the quota `to` (see `Algorithm::convert`).
    pub fn convert(&self, to: &FixedWindow, state: State, now: u64) -> State {
        if to.period_ns == self.period_ns {
            return state;
        }
        match self.used(state, self.at(now).0) {
            0 => 0,
            used => pack(to.at(now).0, used),
        }
    }

    #[inline]
    pub fn is_fresh(&self, state: State, now: u64) -> bool {
        self.used(state, self.at(now).0) == 0
    }

    pub fn time_to_fresh(&self) -> u64 {
        self.period_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS;

    fn fw(rate: &str) -> FixedWindow {
        FixedWindow::new(Rate::parse(rate).unwrap()).unwrap()
    }

    #[test]
    fn counts_per_aligned_window() {
        let w = fw("3/10s");
        let mut s = 0;
        let now = 7 * NANOS; // window [0, 10)
        for left in [2, 1, 0] {
            let (n, d) = w.step(s, now, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
            assert_eq!(d.reset_after, 3 * NANOS);
            s = n;
        }
        let (n, d) = w.step(s, now, 1);
        assert!(!d.allowed);
        assert_eq!(n, s);
        assert_eq!(d.retry_after, Some(3 * NANOS));
        // The boundary: one ns before it still the old window, at it a new one.
        assert!(!w.step(s, 10 * NANOS - 1, 1).1.allowed);
        let (_, d) = w.step(s, 10 * NANOS, 3);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(d.reset_after, 10 * NANOS);
    }

    #[test]
    fn cost_above_limit_is_never_admitted() {
        let w = fw("3/s");
        let (s, d) = w.step(0, 0, 4);
        assert_eq!(s, 0);
        assert_eq!(d.retry_after, None);
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after, 0);
    }

    #[test]
    fn partial_cost_does_not_fit() {
        let w = fw("5/s");
        let (s, _) = w.step(0, 0, 4);
        let (s2, d) = w.step(s, 0, 2);
        assert!(!d.allowed);
        assert_eq!(s2, s);
        assert_eq!(d.remaining, 1);
        assert!(w.step(s, 0, 1).1.allowed);
    }

    #[test]
    fn adjust_stays_in_the_charged_window() {
        let w = fw("10/s");
        let (s, _) = w.step(0, 0, 8);
        let s2 = w.adjust(s, NANOS / 2, -5, 0);
        assert_eq!(w.step(s2, NANOS / 2, 7).1.remaining, 0);
        // A refund for a call charged in an earlier window is dropped.
        let (s3, _) = w.step(s, NANOS, 2);
        assert_eq!(w.adjust(s3, NANOS, -2, 0), s3);
        // Extra charges can pass the limit.
        let over = w.adjust(s, 0, 5, 0);
        assert_eq!(w.step(over, 0, 0).1.remaining, 0);
        assert!(!w.step(over, 0, 1).1.allowed);
    }

    #[test]
    fn freshness() {
        let w = fw("5/s");
        let (s, _) = w.step(0, NANOS / 2, 1);
        assert!(!w.is_fresh(s, NANOS - 1));
        assert!(w.is_fresh(s, NANOS));
        assert!(w.is_fresh(0, 0));
    }
}
