//! Priority classes sharing one limit, with capacity reserved for the higher ones.
//!
//! Each class has a share of the limit: the class may use the limit only as long as
//! what its call leaves free is at least the part of the capacity it may not touch.
//! With `interactive: 1.0, batch: 0.7` on a limit of 100, a batch call is admitted
//! only if at least 30 units remain after it, so batch traffic alone can never take
//! the last 30; interactive calls may take everything, those 30 included.
//!
//! The rule is a *floor* on one step ([`step_floor`]): the call is decided as if it
//! cost `cost + floor` and, when admitted, charged `cost`. Deciding and charging stay
//! one step, so the rule is exact wherever a step is atomic: under the shard lock in
//! this process, inside the compare-and-swap of a shared-memory slot, inside one Redis
//! script. A class's decision reads as its own view of the limit: `limit` is the part
//! it may use, `remaining` what it may still take, `retry_after` when its call fits.

use crate::algorithms::State;
use crate::decision::{Checked, Decision};
use crate::error::{Error, Result};
use crate::key::Fingerprint;
use crate::limiter::Limiter;
use crate::quota::Quota;
use crate::report::{AtomicCounters, Counters};
use crossbeam_utils::CachePadded;
use std::sync::Arc;

/// Shares are kept in millionths, so that `0.29` of 100 is 29, not 28.999... floored.
pub const SHARE_SCALE: u64 = 1_000_000;
/// The most classes one limit is shared by.
pub const MAX_CLASSES: usize = 32;

/// A class's share of a limit, in millionths (1 to [`SHARE_SCALE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Share(u32);

impl Share {
    /// The whole limit: no floor.
    pub const ALL: Share = Share(SHARE_SCALE as u32);

    /// A share given as a fraction of the limit, above 0 and at most 1, rounded to the
    /// nearest millionth.
    pub fn new(fraction: f64) -> Result<Share> {
        if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "a class's share must be a number above 0 and at most 1, got {fraction}"
            )));
        }
        let ppm = (fraction * SHARE_SCALE as f64).round().max(1.0) as u32;
        Ok(Share(ppm))
    }

    pub fn millionths(self) -> u32 {
        self.0
    }

    pub fn fraction(self) -> f64 {
        self.0 as f64 / SHARE_SCALE as f64
    }

    /// The units of `limit` this share may use: `limit * share`, rounded down.
    #[inline]
    pub fn usable(self, limit: u64) -> u64 {
        (limit as u128 * self.0 as u128 / SHARE_SCALE as u128) as u64
    }

    /// The units of `limit` a call of this share must leave free.
    #[inline]
    pub fn floor(self, limit: u64) -> u64 {
        limit - self.usable(limit)
    }
}

/// Decides a call of `cost` from `state` with `step`, admitting it only if at least
/// `floor` units remain free after it (see the module's documentation). `step` is the
/// quota's own step (`state, cost -> (state', decision)`); the answer is the class's
/// view of the limit.
#[inline(always)]
pub fn step_floor(
    step: impl Fn(State, u64) -> (State, Decision),
    state: State,
    cost: u64,
    floor: u64,
) -> (State, Decision) {
    if floor == 0 {
        return step(state, cost);
    }
    // The call is admitted exactly when `cost + floor` units would be: what it leaves
    // free is then at least `floor`.
    let (_, test) = step(state, cost.saturating_add(floor));
    let limit = test.limit.saturating_sub(floor);
    if !test.allowed {
        let retry_after = if cost > limit { None } else { test.retry_after };
        let decision =
            Decision { limit, remaining: test.remaining.saturating_sub(floor), retry_after, delay: 0, ..test };
        return (state, decision);
    }
    let (next, real) = step(state, cost);
    (next, Decision { limit, remaining: test.remaining, ..real })
}

/// [`step_floor`] for one quota and one share: the floor is the share's of the quota's
/// capacity (a key with a quota of its own gets the share of its own capacity).
#[inline(always)]
pub fn step_share(quota: &Quota, state: State, now: u64, cost: u64, share: Share) -> (State, Decision) {
    let floor = if share == Share::ALL { 0 } else { share.floor(quota.limit()) };
    step_floor(|s, c| quota.step(s, now, c), state, cost, floor)
}

/// Checks classes as given: 1 to [`MAX_CLASSES`], names unique and not empty, and at
/// least one class with the whole limit (share 1), else part of the limit could never
/// be used.
pub fn check_classes(classes: &[(String, Share)]) -> Result<()> {
    if classes.is_empty() || classes.len() > MAX_CLASSES {
        return Err(Error::InvalidArgument(format!("give from 1 to {MAX_CLASSES} classes, got {}", classes.len())));
    }
    for (i, (name, _)) in classes.iter().enumerate() {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a class name must not be empty".into()));
        }
        if classes[..i].iter().any(|(other, _)| other == name) {
            return Err(Error::InvalidArgument(format!("class {name:?} is given twice")));
        }
    }
    if !classes.iter().any(|(_, s)| *s == Share::ALL) {
        return Err(Error::InvalidArgument(
            "one class must have share 1.0 (the whole limit): the highest class may use all of it, else the rest \
             of the limit could never be used"
                .into(),
        ));
    }
    Ok(())
}

/// The class with the smallest share (the first of them when several tie).
pub fn lowest(shares: impl Iterator<Item = Share>) -> usize {
    let shares: Vec<Share> = shares.collect();
    let min = shares.iter().min().copied().unwrap_or(Share::ALL);
    shares.iter().position(|&s| s == min).unwrap_or(0)
}

/// One class of a [`Priority`]: its name, share and counters.
pub struct Class {
    pub name: String,
    pub share: Share,
    counters: CachePadded<AtomicCounters>,
}

/// A limiter shared by priority classes (see the module's documentation). The limiter
/// keeps its own counters, store, quotas and shadow mode; each class counts its own
/// checks.
pub struct Priority {
    limiter: Arc<Limiter>,
    classes: Vec<Class>,
}

/// A class as reported: name, share, counters.
pub type ClassStats = (String, Share, Counters);

impl Priority {
    /// `classes`: (name, share) pairs, 1 to [`MAX_CLASSES`], names unique and not empty,
    /// and at least one class with the whole limit (share 1), else part of the limit
    /// could never be used.
    pub fn new(limiter: Arc<Limiter>, classes: Vec<(String, Share)>) -> Result<Priority> {
        check_classes(&classes)?;
        let classes =
            classes.into_iter().map(|(name, share)| Class { name, share, counters: Default::default() }).collect();
        Ok(Priority { limiter, classes })
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn classes(&self) -> &[Class] {
        &self.classes
    }

    /// The index of the class named `name`, or an error naming the classes.
    pub fn class(&self, name: &str) -> Result<usize> {
        self.classes.iter().position(|c| c.name == name).ok_or_else(|| {
            let names: Vec<String> = self.classes.iter().map(|c| format!("{:?}", c.name)).collect();
            Error::InvalidArgument(format!("unknown class {name:?}: the classes are {}", names.join(", ")))
        })
    }

    /// The class with the smallest share (the first of them when several tie): what a
    /// call that names no class gets.
    pub fn lowest(&self) -> usize {
        lowest(self.classes.iter().map(|c| c.share))
    }

    /// Decides (and charges, if admitted) a call of `cost` of class `class` on the key,
    /// counted by the limiter and by the class.
    #[inline]
    pub fn check(&self, fp: &Fingerprint, cost: u64, class: usize) -> Checked {
        let c = &self.classes[class];
        let checked = self.limiter.check_share(fp, cost, c.share);
        // The limiter applied shadow mode; the class counts the real decision.
        let real = checked.shadowed.unwrap_or(checked.decision);
        c.counters.count_check(real, checked.shadowed.is_some());
        checked
    }

    /// The decision [`check`](Self::check) would give now, charging nothing.
    pub fn peek(&self, fp: &Fingerprint, cost: u64, class: usize) -> Decision {
        self.limiter.peek_share(fp, cost, self.classes[class].share)
    }

    /// Each class's name, share and counters.
    pub fn stats(&self) -> Vec<ClassStats> {
        self.classes.iter().map(|c| (c.name.clone(), c.share, c.counters.get())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock, NANOS};
    use crate::key::{fingerprint, KeyKind};
    use crate::quota::Kind;
    use crate::rate::Rate;

    fn quota(kind: Kind, rate: &str) -> Quota {
        Quota::new(kind, Rate::parse(rate).unwrap(), None, 0).unwrap()
    }

    fn fp(s: &str) -> Fingerprint {
        fingerprint(KeyKind::Str, s.as_bytes())
    }

    #[test]
    fn shares_round_to_millionths() {
        assert_eq!(Share::new(0.29).unwrap().usable(100), 29);
        assert_eq!(Share::new(0.7).unwrap().floor(100), 30);
        assert_eq!(Share::new(0.75).unwrap().usable(10), 7, "rounded down: 7.5 units is 7");
        assert_eq!(Share::new(1.0).unwrap(), Share::ALL);
        assert_eq!(Share::ALL.floor(u64::MAX), 0);
        assert_eq!(Share::new(1e-9).unwrap().millionths(), 1, "a tiny share keeps one millionth");
        for bad in [0.0, -0.5, 1.0000001, f64::NAN, f64::INFINITY] {
            assert!(Share::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_floor_holds_the_reserved_part_on_every_algorithm() {
        let batch = Share::new(0.7).unwrap();
        for kind in [Kind::TokenBucket, Kind::LeakyBucket, Kind::FixedWindow, Kind::SlidingWindow] {
            let q = quota(kind, "100/hour");
            let mut state = 0;
            let mut admitted = 0;
            for _ in 0..200 {
                let (next, d) = step_share(&q, state, NANOS, 1, batch);
                if d.allowed {
                    state = next;
                    admitted += 1;
                    assert_eq!(d.limit, 70, "{kind:?}: the class sees its part");
                }
            }
            assert_eq!(admitted, 70, "{kind:?}");
            let (_, denied) = step_share(&q, state, NANOS, 1, batch);
            assert!(!denied.allowed && denied.remaining == 0 && denied.retry_after.unwrap() > 0, "{kind:?}");
            // The top class takes the 30 held back, and no more.
            let mut top = 0;
            for _ in 0..100 {
                let (next, d) = step_share(&q, state, NANOS, 1, Share::ALL);
                if d.allowed {
                    state = next;
                    top += 1;
                }
            }
            assert_eq!(top, 30, "{kind:?}");
        }
    }

    #[test]
    fn the_class_view_of_a_decision() {
        let q = quota(Kind::TokenBucket, "100/minute");
        let half = Share::new(0.5).unwrap();
        let (state, d) = step_share(&q, 0, 0, 10, half);
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (50, 40));
        assert_eq!(d.reset_after, 6 * NANOS, "the real state's reset: 10 units at 100/minute");
        let (_, d) = step_share(&q, state, 0, 45, half);
        assert!(!d.allowed);
        // 90 free of 100, 50 held back: 40 for the class; 45 fits once 5 more refill.
        assert_eq!((d.remaining, d.retry_after), (40, Some(3 * NANOS)));
        let (_, never) = step_share(&q, state, 0, 51, half);
        assert_eq!(never.retry_after, None, "above the class's part of the limit");
        let (_, never) = step_share(&q, state, 0, 101, Share::ALL);
        assert_eq!(never.retry_after, None);
    }

    #[test]
    fn priority_counts_per_class_and_validates() {
        let clock = ManualClock::new(0);
        let limiter = Arc::new(
            Limiter::new(quota(Kind::FixedWindow, "10/minute"), Clock::Manual(clock.clone()), 3600.0, None).unwrap(),
        );
        let classes = vec![("interactive".to_string(), Share::ALL), ("batch".to_string(), Share::new(0.6).unwrap())];
        let p = Priority::new(Arc::clone(&limiter), classes).unwrap();
        let (top, batch) = (p.class("interactive").unwrap(), p.class("batch").unwrap());
        assert_eq!(p.lowest(), batch);
        let k = fp("k");
        assert_eq!((0..10).filter(|_| p.check(&k, 1, batch).decision.allowed).count(), 6);
        assert_eq!((0..10).filter(|_| p.check(&k, 1, top).decision.allowed).count(), 4);
        assert!(!p.peek(&k, 0, top).allowed || p.peek(&k, 0, top).remaining == 0);
        let stats = p.stats();
        assert_eq!((stats[0].2.allowed, stats[0].2.denied, stats[1].2.allowed, stats[1].2.denied), (4, 6, 6, 4));
        assert_eq!(limiter.stats().counters.allowed, 10);
        limiter.set_shadow(true);
        let shadowed = p.check(&k, 1, batch);
        assert!(shadowed.decision.allowed && shadowed.shadowed.is_some());
        assert_eq!(p.stats()[1].2.shadow_denied, 1);
        assert!(p.class("nope").unwrap_err().to_string().contains("\"interactive\", \"batch\""));
        let l = || Arc::clone(&limiter);
        assert!(Priority::new(l(), vec![]).is_err());
        assert!(Priority::new(l(), vec![("a".into(), Share::new(0.5).unwrap())]).is_err(), "no class has it all");
        assert!(Priority::new(l(), vec![("a".into(), Share::ALL), ("a".into(), Share::ALL)]).is_err());
        assert!(Priority::new(l(), vec![("".into(), Share::ALL)]).is_err());
    }

    #[test]
    fn a_key_with_its_own_quota_keeps_the_same_share() {
        let clock = ManualClock::new(0);
        let limiter = Arc::new(
            Limiter::new(quota(Kind::FixedWindow, "10/minute"), Clock::Manual(clock.clone()), 3600.0, None).unwrap(),
        );
        let p = Priority::new(
            Arc::clone(&limiter),
            vec![("top".into(), Share::ALL), ("low".into(), Share::new(0.5).unwrap())],
        )
        .unwrap();
        let k = fp("big");
        limiter.set_quota(&k, quota(Kind::FixedWindow, "40/minute")).unwrap();
        assert_eq!((0..40).filter(|_| p.check(&k, 1, 1).decision.allowed).count(), 20);
    }
}
