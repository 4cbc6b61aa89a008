//! Property tests of the step functions (proptest): no input makes them panic, and no
//! sequence of calls is admitted past what the quota allows.

use super::*;
use crate::rate::Rate;
use proptest::prelude::*;

fn algorithms() -> impl Strategy<Value = Algorithm> {
    let rate = (1u64..1_000_000, 1u64..=86_400_000_000_000).prop_map(|(count, period_ns)| Rate { count, period_ns });
    // Windows anywhere: any alignment, bound to any clock's epoch offset.
    let place = (-(crate::rate::MAX_PERIOD_NS as i64)..=crate::rate::MAX_PERIOD_NS as i64, any::<u64>());
    (rate, 1u64..1_000_000, 0u8..4, place).prop_filter_map("a valid quota", |(rate, burst, kind, (align, offset))| {
        let algo = match kind {
            0 => Gcra::new(rate, burst).ok().map(Algorithm::TokenBucket),
            1 => Gcra::new(rate, burst).ok().map(Algorithm::LeakyBucket),
            2 => FixedWindow::aligned(rate, align).ok().map(Algorithm::FixedWindow),
            _ => SlidingWindow::aligned(rate, align).ok().map(Algorithm::SlidingWindow),
        };
        algo.map(|a| a.bound(offset))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_input_panics(algo in algorithms(), other in algorithms(), state: u128, b: u128, now: u64, cost: u64, delta: i64, at: u64) {
        let (next, d) = algo.step(state, now, cost);
        prop_assert!(d.allowed || next == state, "a denied step changes nothing");
        prop_assert!(d.remaining <= d.limit || !d.allowed);
        let _ = algo.is_fresh(state, now);
        let _ = algo.adjust(state, now, delta, at);
        let _ = algo.convert(&other, state, now);
        let _ = algo.merge(state, b, now);
    }

    #[test]
    fn fresh_state_admits_up_to_the_limit(algo in algorithms(), now in 0u64..(1 << 62)) {
        let limit = algo.limit();
        let (_, d) = algo.step(0, now, limit);
        prop_assert!(d.allowed, "a fresh key takes its whole limit at once");
        let (_, d) = algo.step(0, now, limit.saturating_add(1));
        prop_assert!(!d.allowed && d.retry_after.is_none(), "a cost above the limit never passes");
    }

    #[test]
    fn never_more_than_the_quota(
        algo in algorithms(),
        start in 0u64..(1 << 50),
        ops in proptest::collection::vec((0u64..50, 0u64..2_000_000_000), 1..200),
    ) {
        let rate = algo.rate();
        let limit = algo.limit() as u128;
        let mut state = 0u128;
        let mut now = start;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (cost, step) in ops {
            now = now.saturating_add(step);
            let (next, d) = algo.step(state, now, cost);
            if d.allowed {
                state = next;
                admitted.push((now, cost));
            }
        }
        // Over any interval [a, b]: buckets admit at most burst + refill; windows at most
        // twice the limit in any period (a fixed window's worst case across a boundary).
        for (i, &(a, _)) in admitted.iter().enumerate() {
            let mut used = 0u128;
            for &(b, c) in &admitted[i..] {
                used += c as u128;
                let span = (b - a) as u128;
                match algo {
                    Algorithm::TokenBucket(_) | Algorithm::LeakyBucket(_) => {
                        let refill = span * rate.count as u128 / rate.period_ns as u128 + 1;
                        prop_assert!(used <= limit + refill, "{used} > {limit} + {refill}");
                    }
                    _ if span < rate.period_ns as u128 => prop_assert!(used <= 2 * limit),
                    _ => {}
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// A window ends exactly where Unix time reaches `align + k * period`, whatever the
    /// clock's epoch offset: `reset_after` of a charged call lands on a boundary.
    #[test]
    fn windows_end_on_aligned_unix_boundaries(
        count in 1u64..1000,
        period_ns in 1_000u64..=86_400_000_000_000,
        align in -(crate::rate::MAX_PERIOD_NS as i64)..=crate::rate::MAX_PERIOD_NS as i64,
        offset in 0u64..(1 << 62),
        now in 0u64..(1 << 61),
    ) {
        let rate = Rate { count, period_ns };
        let fixed = Algorithm::FixedWindow(FixedWindow::aligned(rate, align).unwrap()).bound(offset);
        let sliding = Algorithm::SlidingWindow(SlidingWindow::aligned(rate, align).unwrap()).bound(offset);
        let end = |reset: u64| (now as i128 + offset as i128 + reset as i128 - align as i128).rem_euclid(period_ns as i128);
        let d = fixed.step(0, now, 1).1;
        prop_assert!(d.reset_after > 0 && d.reset_after <= period_ns);
        prop_assert_eq!(end(d.reset_after), 0);
        let d = sliding.step(0, now, 1).1;
        prop_assert!(d.reset_after > period_ns && d.reset_after <= 2 * period_ns);
        prop_assert_eq!(end(d.reset_after), 0);
    }
}
