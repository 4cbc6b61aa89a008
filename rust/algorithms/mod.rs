//! Rate-limiting algorithms as pure step functions.
//!
//! Every algorithm keeps a key's state in one `u128` (16 bytes) whose all-zero value
//! is the fresh state, so a store can hand out zeroed slots for new keys, and decides
//! with `step(state, now, cost) -> (state', Decision)`: no clock, no store, no locks.
//! A denied step returns the state unchanged (a denied call never consumes quota).
//! The Redis Lua scripts mirror these functions.

pub mod fixed_window;
pub mod gcra;
pub mod sliding_window;

#[cfg(test)]
mod props;

pub use fixed_window::FixedWindow;
pub use gcra::Gcra;
pub use sliding_window::SlidingWindow;

pub use crate::decision::Decision;

/// A key's state. Zero is the fresh state for every algorithm.
pub type State = u128;
/// The state of a key never seen (or back to where it decides like one).
pub const FRESH: State = 0;

/// Where the windows of a fixed or sliding window start.
///
/// Windows are `[align + k * period, align + (k + 1) * period)` of Unix time, `k` any
/// whole number: with `align` 0 (the default) a day's windows start at UTC midnight and
/// an hour's on the hour, which is where a Redis server (reading its `TIME`) puts them
/// too. A limiter's clock is turned into Unix time by adding the clock's epoch offset
/// (see [`crate::clock`]), which [`Algorithm::bind`] records here, folded with `align`
/// into one phase so that a step costs one addition more than windows on the bare clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    /// Where windows start, in ns after the Unix epoch, as given (used modulo the period).
    pub align_ns: i64,
    /// `(epoch offset - align) mod period`: added to the clock's time, windows start at
    /// multiples of the period.
    phase_ns: u64,
}

impl Windows {
    pub fn new(align_ns: i64) -> crate::error::Result<Windows> {
        if align_ns.unsigned_abs() > crate::rate::MAX_PERIOD_NS {
            return Err(crate::error::Error::InvalidArgument(format!(
                "align must be within {} days of 0, got {} s",
                crate::rate::MAX_PERIOD_DAYS,
                align_ns as f64 / crate::clock::NANOS as f64
            )));
        }
        Ok(Windows { align_ns, phase_ns: 0 })
    }

    /// Records the epoch offset of the clock the windows are read on.
    pub fn bind(&mut self, epoch_offset: u64, period_ns: u64) {
        let p = period_ns as i128;
        self.phase_ns = (epoch_offset as i128 - self.align_ns as i128).rem_euclid(p) as u64;
    }

    /// The window containing `now` (on the bound clock) and the time left in it, in
    /// `(0, period]`.
    #[inline(always)]
    pub fn at(&self, now: u64, period_ns: u64) -> (u64, u64) {
        let t = now.saturating_add(self.phase_ns);
        let window = t / period_ns;
        (window, period_ns - (t - window * period_ns))
    }
}

/// One of the window or bucket algorithms with its quota.
#[derive(Clone, Debug)]
pub enum Algorithm {
    TokenBucket(Gcra),
    LeakyBucket(Gcra),
    FixedWindow(FixedWindow),
    SlidingWindow(SlidingWindow),
}

impl Algorithm {
    /// Records the epoch offset of the clock the algorithm will be stepped with (windows
    /// start on Unix-time boundaries; buckets need no wall time). Every limiter binds the
    /// quotas it is given.
    pub fn bind(&mut self, epoch_offset: u64) {
        match self {
            Algorithm::TokenBucket(_) | Algorithm::LeakyBucket(_) => {}
            Algorithm::FixedWindow(w) => w.windows.bind(epoch_offset, w.period_ns),
            Algorithm::SlidingWindow(w) => w.windows.bind(epoch_offset, w.period_ns),
        }
    }

    /// [`bind`](Self::bind), by value.
    pub fn bound(mut self, epoch_offset: u64) -> Algorithm {
        self.bind(epoch_offset);
        self
    }

    /// Where windows start (ns after the Unix epoch, as given), for a window algorithm.
    pub fn align_ns(&self) -> Option<i64> {
        match self {
            Algorithm::TokenBucket(_) | Algorithm::LeakyBucket(_) => None,
            Algorithm::FixedWindow(w) => Some(w.windows.align_ns),
            Algorithm::SlidingWindow(w) => Some(w.windows.align_ns),
        }
    }

    /// Decides a call of `cost` units at `now`.
    #[inline(always)]
    pub fn step(&self, state: State, now: u64, cost: u64) -> (State, Decision) {
        match self {
            Algorithm::TokenBucket(g) => g.step(state, now, cost, false),
            Algorithm::LeakyBucket(g) => g.step(state, now, cost, true),
            Algorithm::FixedWindow(w) => w.step(state, now, cost),
            Algorithm::SlidingWindow(w) => w.step(state, now, cost),
        }
    }

    /// True when `state` decides every future call exactly like a fresh key would.
    #[inline]
    pub fn is_fresh(&self, state: State, now: u64) -> bool {
        match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => g.is_fresh(state, now),
            Algorithm::FixedWindow(w) => w.is_fresh(state, now),
            Algorithm::SlidingWindow(w) => w.is_fresh(state, now),
        }
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units of a call made at
    /// `charged_at`, to settle an estimate with the actual cost. Charges may pass the
    /// limit (the key is then denied until it has paid back); refunds never overfill.
    pub fn adjust(&self, state: State, now: u64, delta: i64, charged_at: u64) -> State {
        match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => g.adjust(state, now, delta),
            Algorithm::FixedWindow(w) => w.adjust(state, now, delta, charged_at),
            Algorithm::SlidingWindow(w) => w.adjust(state, now, delta, charged_at),
        }
    }

    /// The longest time a key can need, after its last admitted call, to be fresh again.
    pub fn time_to_fresh(&self) -> u64 {
        match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => g.time_to_fresh(),
            Algorithm::FixedWindow(w) => w.time_to_fresh(),
            Algorithm::SlidingWindow(w) => w.time_to_fresh(),
        }
    }

    /// Adds the usage held in state `b` to state `a` (two states of one key that must
    /// become one): a bucket's backlogs add up; a window's counts add up.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => g.merge(a, b, now),
            Algorithm::FixedWindow(w) => w.merge(a, b, now),
            Algorithm::SlidingWindow(w) => w.merge(a, b, now),
        }
    }

    /// The quota as a rate: count (burst aside) per period.
    pub fn rate(&self) -> crate::rate::Rate {
        let (count, period_ns) = match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => (g.count, g.period_ns),
            Algorithm::FixedWindow(w) => (w.limit, w.period_ns),
            Algorithm::SlidingWindow(w) => (w.limit, w.period_ns),
        };
        crate::rate::Rate { count, period_ns }
    }

    /// The algorithm's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::TokenBucket(_) => "token bucket",
            Algorithm::LeakyBucket(_) => "leaky bucket",
            Algorithm::FixedWindow(_) => "fixed window",
            Algorithm::SlidingWindow(_) => "sliding window",
        }
    }

    /// Re-expresses a key's state under another quota of the same algorithm, keeping the
    /// units it has used: the same backlog of units for a bucket (drained at the new
    /// rate from now on), the same count in the current window for a window with the
    /// same period, and the units used in the last period, put in the current window,
    /// for a window whose period changes. A key that used more than the new limit is
    /// denied until it is back under it; a larger limit gives the extra room at once.
    /// Different algorithms keep the state unchanged (callers refuse that case).
    pub fn convert(&self, to: &Algorithm, state: State, now: u64) -> State {
        match (self, to) {
            (Algorithm::TokenBucket(a), Algorithm::TokenBucket(b))
            | (Algorithm::LeakyBucket(a), Algorithm::LeakyBucket(b)) => a.convert(b, state, now),
            (Algorithm::FixedWindow(a), Algorithm::FixedWindow(b)) => a.convert(b, state, now),
            (Algorithm::SlidingWindow(a), Algorithm::SlidingWindow(b)) => a.convert(b, state, now),
            _ => state,
        }
    }

    pub fn limit(&self) -> u64 {
        match self {
            Algorithm::TokenBucket(g) | Algorithm::LeakyBucket(g) => g.burst,
            Algorithm::FixedWindow(w) => w.limit,
            Algorithm::SlidingWindow(w) => w.limit,
        }
    }
}

/// `a / b`, on the cheap 64-bit path when `a` fits (the usual case).
#[inline]
pub(crate) fn div_floor(a: u128, b: u64) -> u128 {
    if a >> 64 == 0 {
        ((a as u64) / b) as u128
    } else {
        a / b as u128
    }
}

/// Saturating conversion of a nanosecond count to `u64`.
#[inline]
pub(crate) fn clamp_ns(ns: u128) -> u64 {
    if ns > u64::MAX as u128 {
        u64::MAX
    } else {
        ns as u64
    }
}
