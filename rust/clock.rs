//! Clocks. Time inside the core is a `u64` count of nanoseconds.
//!
//! The default clock is the system's `CLOCK_MONOTONIC`: it never jumps when the
//! wall clock is changed, and on Linux every process on the host reads the same
//! value, which a store shared between processes relies on. A [`ManualClock`]
//! only moves when told to, for deterministic tests.
//!
//! Windows (fixed and sliding) need Unix time as well, to start on the same boundaries
//! (UTC midnight for a day) as a Redis server's. Each clock has an *epoch offset*: what
//! to add to its time to get Unix time. A manual clock's time is read as Unix time
//! (offset 0). For the monotonic clock the offset is measured once per process, the first
//! time it is needed ([`epoch_offset`]), and then kept: a later step of the wall clock
//! (`date -s`, an NTP step) moves no window boundary, refills nothing and resets nothing;
//! windows keep the monotonic clock's pace, which NTP slews like the wall clock's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Nanoseconds per second.
pub const NANOS: u64 = 1_000_000_000;

/// A clock the limiters read. Cloning shares the underlying manual time.
#[derive(Clone, Debug)]
pub enum Clock {
    Monotonic,
    Manual(ManualClock),
}

impl Clock {
    #[inline]
    pub fn now(&self) -> u64 {
        match self {
            Clock::Monotonic => monotonic_ns(),
            Clock::Manual(m) => m.now(),
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }

    /// What to add to this clock's time to get Unix time, in ns (see the module docs).
    pub fn epoch_offset(&self) -> u64 {
        match self {
            Clock::Monotonic => epoch_offset(),
            Clock::Manual(_) => 0,
        }
    }

    /// True when both read the same time (both monotonic, or one shared manual time).
    pub fn same(&self, other: &Clock) -> bool {
        match (self, other) {
            (Clock::Monotonic, Clock::Monotonic) => true,
            (Clock::Manual(a), Clock::Manual(b)) => a.same(b),
            _ => false,
        }
    }
}

/// Reads `CLOCK_REALTIME` (Unix time) in nanoseconds; 0 before 1970.
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as in `monotonic_ns`; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    if ts.tv_sec < 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(NANOS).saturating_add(ts.tv_nsec as u64)
}

/// Unix time minus monotonic time, now: the wall clock read between two monotonic
/// reads (so the error is at most half the few tens of ns between them).
pub fn measure_epoch_offset() -> u64 {
    let before = monotonic_ns();
    let wall = realtime_ns();
    let after = monotonic_ns();
    wall.saturating_sub(before + (after - before) / 2)
}

/// The monotonic clock's epoch offset for this process, measured at its first use.
pub fn epoch_offset() -> u64 {
    static OFFSET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(measure_epoch_offset)
}

/// Reads `CLOCK_MONOTONIC` in nanoseconds.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on
    // the platforms we build for, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * NANOS + ts.tv_nsec as u64
}

/// A clock that only moves forward when advanced.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start_ns)))
    }

    #[inline]
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Moves the clock forward by `ns`, saturating at `u64::MAX`. Returns the new time.
    pub fn advance(&self, ns: u64) -> u64 {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let next = cur.saturating_add(ns);
            match self.0.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// True when both handles share one time.
    pub fn same(&self, other: &ManualClock) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Seconds (finite, non-negative) to nanoseconds, rounded to the nearest and saturating.
pub fn secs_to_ns(secs: f64) -> u64 {
    let ns = (secs * NANOS as f64).round();
    if ns >= u64::MAX as f64 {
        u64::MAX
    } else {
        ns as u64
    }
}

/// Nanoseconds to seconds.
#[inline]
pub fn ns_to_secs(ns: u64) -> f64 {
    ns as f64 / NANOS as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a);
        assert!(a > 0);
    }

    #[test]
    fn manual_clock_advances_and_is_shared_by_its_clones() {
        let c = ManualClock::new(5);
        assert_eq!(c.now(), 5);
        assert_eq!(c.advance(10), 15);
        let shared = c.clone();
        shared.advance(1);
        assert_eq!(c.now(), 16);
        assert!(c.same(&shared));
        assert_eq!(c.advance(u64::MAX), u64::MAX);
    }

    #[test]
    fn the_epoch_offset_turns_monotonic_time_into_unix_time() {
        let unix = monotonic_ns() + Clock::Monotonic.epoch_offset();
        let wall = realtime_ns();
        assert!(unix.abs_diff(wall) < NANOS / 10, "{unix} vs {wall}");
        assert_eq!(epoch_offset(), epoch_offset(), "measured once");
        assert_eq!(Clock::Manual(ManualClock::new(5)).epoch_offset(), 0);
        let m = ManualClock::new(0);
        assert!(Clock::Manual(m.clone()).same(&Clock::Manual(m)));
        assert!(!Clock::Manual(ManualClock::new(0)).same(&Clock::Manual(ManualClock::new(0))));
        assert!(Clock::Monotonic.same(&Clock::Monotonic));
    }

    #[test]
    fn seconds_round_trip() {
        for ns in [0u64, 1, 999, 1_500_000_000, 123_456_789_012_345] {
            assert_eq!(secs_to_ns(ns_to_secs(ns)), ns);
        }
        assert_eq!(secs_to_ns(1e30), u64::MAX);
    }
}
