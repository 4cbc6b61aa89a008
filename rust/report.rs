//! What limiters report about themselves: counters of their checks, one key's state
//! ([`Inspection`]), and their busiest keys ([`top_n`]). Every limiter counts and
//! applies shadow mode through [`Counters::count_check`], so both mean the same
//! everywhere.

use crate::decision::{Checked, Decision};
use crate::key::Fingerprint;
use crate::rate::Rate;
use std::sync::atomic::{AtomicU64, Ordering};

/// Checks counted. In-process limiters keep one per shard, counted under the shard's
/// lock, so counting costs no atomic operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    /// Admitted checks that left at most 20% of the limit (at least 80% used).
    pub near_limit: u64,
    /// Checks a shadow-mode limiter would have denied (and admitted instead).
    pub shadow_denied: u64,
}

impl Counters {
    /// Counts a decision (shadow mode aside).
    #[inline]
    pub fn count(&mut self, d: &Decision) {
        if d.allowed {
            self.allowed += 1;
            if d.remaining.saturating_mul(5) <= d.limit {
                self.near_limit += 1;
            }
        } else {
            self.denied += 1;
        }
    }

    pub fn add(&mut self, o: &Counters) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.near_limit += o.near_limit;
        self.shadow_denied += o.shadow_denied;
    }

    /// Counts a decision and applies shadow mode: a denial by a limiter in shadow mode
    /// becomes an admission (the caller charges nothing for it), and the denial is kept
    /// for the log.
    #[inline(always)]
    pub fn count_check(&mut self, d: Decision, shadow: bool) -> Checked {
        self.count(&d);
        if !d.allowed && shadow {
            self.shadow_denied += 1;
            return Checked { decision: d.shadow_admitted(), shadowed: Some(d) };
        }
        Checked::plain(d)
    }
}

/// [`Counters`] kept with atomics, for limiters whose checks hold no lock of their own
/// (composites, and limiters over shared memory).
#[derive(Default)]
pub struct AtomicCounters {
    allowed: AtomicU64,
    denied: AtomicU64,
    near_limit: AtomicU64,
    shadow_denied: AtomicU64,
}

impl AtomicCounters {
    /// [`Counters::count_check`], added atomically.
    #[inline]
    pub fn count_check(&self, d: Decision, shadow: bool) -> Checked {
        let mut c = Counters::default();
        let out = c.count_check(d, shadow);
        for (n, a) in [
            (c.allowed, &self.allowed),
            (c.denied, &self.denied),
            (c.near_limit, &self.near_limit),
            (c.shadow_denied, &self.shadow_denied),
        ] {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        out
    }

    pub fn get(&self) -> Counters {
        Counters {
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            near_limit: self.near_limit.load(Ordering::Relaxed),
            shadow_denied: self.shadow_denied.load(Ordering::Relaxed),
        }
    }
}

/// One key as a limiter sees it now, for support ("why was I limited?").
#[derive(Clone, Debug, PartialEq)]
pub struct Inspection {
    /// `"token bucket"`..., `"concurrency"`, `"composite"`.
    pub algorithm: &'static str,
    /// The key's rate (None for a concurrency limit or a composite).
    pub rate: Option<Rate>,
    pub limit: u64,
    /// True when the key has a quota of its own.
    pub own_quota: bool,
    pub used: u64,
    pub remaining: u64,
    /// Whether a call of one unit would be admitted now, and when it would be if not.
    pub allowed: bool,
    pub retry_after: Option<u64>,
    pub reset_after: u64,
    /// True when the limiter keeps state for the key (it is not fresh).
    pub tracked: bool,
    pub shadow: bool,
}

impl Inspection {
    /// The fields two peeks (of 0 and 1 unit) tell.
    pub fn from_peeks(zero: &Decision, one: &Decision) -> Inspection {
        Inspection {
            algorithm: "",
            rate: None,
            limit: zero.limit,
            own_quota: false,
            used: zero.limit.saturating_sub(zero.remaining),
            remaining: zero.remaining,
            allowed: one.allowed,
            retry_after: one.retry_after,
            reset_after: zero.reset_after,
            tracked: zero.remaining < zero.limit,
            shadow: false,
        }
    }
}

/// One row of a limiter's busiest keys: (fingerprint, units used now, limit).
pub type TopRow = (Fingerprint, u64, u64);

/// The `n` rows using the largest share of their limit, most used first (`limit` is
/// taken as at least 1).
pub fn top_n(rows: impl Iterator<Item = TopRow>, n: usize) -> Vec<TopRow> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if n == 0 {
        return Vec::new();
    }
    // Shares compared exactly, as used * other_limit, on a min-heap of the best n.
    #[derive(PartialEq, Eq)]
    struct Row(u64, u64, [u32; 3]);
    impl Ord for Row {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            ((self.0 as u128) * (o.1 as u128)).cmp(&((o.0 as u128) * (self.1 as u128))).then(self.2.cmp(&o.2))
        }
    }
    impl PartialOrd for Row {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Row>> = BinaryHeap::with_capacity(n + 1);
    for (fp, used, limit) in rows {
        heap.push(Reverse(Row(used, limit.max(1), fp.0)));
        if heap.len() > n {
            heap.pop();
        }
    }
    let mut out: Vec<_> = heap.into_iter().map(|Reverse(r)| r).collect();
    out.sort_by(|a, b| b.cmp(a));
    out.into_iter().map(|r| (Fingerprint(r.2), r.0, r.1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(limit: u64, remaining: u64) -> Decision {
        Decision { allowed: true, limit, remaining, reset_after: 0, retry_after: Some(0), delay: 0 }
    }

    #[test]
    fn counts_and_shadows() {
        let mut c = Counters::default();
        assert_eq!(c.count_check(admitted(10, 2), false), Checked::plain(admitted(10, 2)));
        c.count_check(admitted(10, 3), false);
        let denied =
            Decision { allowed: false, limit: 10, remaining: 0, reset_after: 1, retry_after: Some(5), delay: 0 };
        assert_eq!(c.count_check(denied, false).decision, denied);
        let shadowed = c.count_check(denied, true);
        assert!(shadowed.decision.allowed && shadowed.shadowed == Some(denied));
        assert_eq!(c, Counters { allowed: 2, denied: 2, near_limit: 1, shadow_denied: 1 });
        let atomic = AtomicCounters::default();
        atomic.count_check(denied, true);
        atomic.count_check(admitted(5, 0), false);
        assert_eq!(atomic.get(), Counters { allowed: 1, denied: 1, near_limit: 1, shadow_denied: 1 });
        let mut sum = c;
        sum.add(&atomic.get());
        assert_eq!(sum.shadow_denied, 2);
    }

    #[test]
    fn top_rows_by_share() {
        let fp = |i: u32| Fingerprint([i, 0, 0]);
        let rows = vec![(fp(1), 5, 10), (fp(2), 1, 1), (fp(3), 9, 100), (fp(4), 3, 4), (fp(5), 1, 0)];
        let top = top_n(rows.clone().into_iter(), 3);
        assert_eq!(top, vec![(fp(5), 1, 1), (fp(2), 1, 1), (fp(4), 3, 4)]);
        assert!(top_n(rows.into_iter(), 0).is_empty());
    }

    #[test]
    fn inspection_from_peeks() {
        let zero = admitted(10, 4);
        let one = Decision { allowed: false, retry_after: Some(7), ..admitted(10, 4) };
        let i = Inspection::from_peeks(&zero, &one);
        assert_eq!((i.used, i.remaining, i.allowed, i.retry_after, i.tracked), (6, 4, false, Some(7), true));
    }
}
