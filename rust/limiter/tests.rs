//! Tests of the limiter over either store.

use super::*;
use crate::clock::ManualClock;
use crate::composite::Composite;
use crate::key::{fingerprint, KeyKind};
use crate::quota::Kind;
use crate::rate::Rate;

fn fp(s: &str) -> Fingerprint {
    fingerprint(KeyKind::Str, s.as_bytes())
}

fn token_bucket(rate: &str, burst: u64, clock: &ManualClock) -> Limiter {
    let quota = Quota::new(Kind::TokenBucket, Rate::parse(rate).unwrap(), Some(burst), 0).unwrap();
    Limiter::new(quota, Clock::Manual(clock.clone()), 3600.0, None).unwrap()
}

#[test]
fn keys_are_isolated_and_denials_do_not_charge() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("2/s", 2, &clock);
    assert!(tb.hit(&fp("a"), 2).allowed);
    assert!(!tb.hit(&fp("a"), 1).allowed);
    assert!(tb.hit(&fp("b"), 2).allowed);
    assert_eq!(tb.len(), 2);
    clock.advance(NANOS / 2);
    assert!(tb.hit(&fp("a"), 1).allowed);
    assert!(!tb.peek(&fp("a"), 1).allowed);
    tb.reset(&fp("a"));
    assert_eq!(tb.peek(&fp("a"), 1).remaining, 1);
    assert_eq!(tb.len(), 1);
}

#[test]
fn ttl_is_raised_to_time_to_fresh() {
    let clock = ManualClock::new(0);
    let quota = Quota::new(Kind::FixedWindow, Rate::parse("5/day").unwrap(), None, 0).unwrap();
    let l = Limiter::new(quota, Clock::Manual(clock), 60.0, None).unwrap();
    assert_eq!(l.ttl_ns(), 86_400 * NANOS);
    assert!(effective_ttl(0.0, 1).is_err());
    assert!(effective_ttl(f64::NAN, 1).is_err());
    assert!(effective_ttl(-1.0, 1).is_err());
}

#[test]
fn sweep_never_changes_a_decision() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("1/s", 10, &clock);
    tb.hit(&fp("busy"), 10);
    tb.hit(&fp("idle"), 1);
    clock.advance(3601 * NANOS);
    assert_eq!(tb.sweep(), 2);
    assert_eq!(tb.len(), 0);
}

#[test]
fn max_keys_denies_new_keys_only() {
    let clock = ManualClock::new(0);
    let quota = Quota::new(Kind::TokenBucket, Rate::parse("1/minute").unwrap(), Some(5), 0).unwrap();
    let l = Limiter::new(quota, Clock::Manual(clock.clone()), 3600.0, Some(3)).unwrap();
    for k in ["a", "b", "c"] {
        assert!(l.hit(&fp(k), 5).allowed);
    }
    let d = l.hit(&fp("d"), 1);
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(300 * NANOS));
    // Denied and peeked calls of new keys take no room.
    assert!(!l.hit(&fp("e"), 6).allowed);
    assert_eq!(l.len(), 3);
    // Once the tracked keys are fresh again they make room.
    clock.advance(300 * NANOS);
    assert!(l.hit(&fp("d"), 1).allowed);
    assert!(l.len() <= 3);
}

#[test]
fn windows_start_on_unix_time_boundaries() {
    let day = Rate::parse("3/day").unwrap();
    // A manual clock reads Unix time: 2026-01-01T12:00:00Z.
    let noon = 1_767_268_800 * NANOS;
    let clock = ManualClock::new(noon);
    let fw =
        Limiter::new(Quota::new(Kind::FixedWindow, day, None, 0).unwrap(), Clock::Manual(clock.clone()), 60.0, None)
            .unwrap();
    let d = fw.hit(&fp("k"), 1);
    assert_eq!(d.reset_after, 12 * 3600 * NANOS, "the window ends at UTC midnight");
    // Aligned 5 hours later (midnight at UTC-5): the window ends at 05:00 UTC.
    let est = Quota::new(Kind::FixedWindow, day, None, 5 * 3600 * NANOS as i64).unwrap();
    let fw5 = Limiter::new(est.clone(), Clock::Manual(clock.clone()), 60.0, None).unwrap();
    assert_eq!(fw5.hit(&fp("k"), 1).reset_after, 17 * 3600 * NANOS);
    let est_neg = Quota::new(Kind::FixedWindow, day, None, -19 * 3600 * NANOS as i64).unwrap();
    let fw5n = Limiter::new(est_neg, Clock::Manual(clock.clone()), 60.0, None).unwrap();
    assert_eq!(fw5n.hit(&fp("k"), 1).reset_after, 17 * 3600 * NANOS, "-19 h is +5 h modulo a day");
    let sw = Limiter::new(
        Quota::new(Kind::SlidingWindow, day, None, 5 * 3600 * NANOS as i64).unwrap(),
        Clock::Manual(clock.clone()),
        60.0,
        None,
    )
    .unwrap();
    assert_eq!(sw.hit(&fp("k"), 3).retry_after, Some(0));
    assert_eq!(sw.hit(&fp("k"), 1).retry_after, Some(17 * 3600 * NANOS + 86_400 * NANOS / 3));
    // A quota set at run time keeps the limiter's clock and alignment.
    fw5.set_quota(&fp("q"), est).unwrap();
    assert_eq!(fw5.hit(&fp("q"), 1).reset_after, 17 * 3600 * NANOS);
    assert!(Quota::new(Kind::FixedWindow, day, None, i64::MAX).is_err());
    // On the monotonic clock, windows end where Unix time says.
    let real = Limiter::new(
        Quota::new(Kind::FixedWindow, Rate::parse("1/minute").unwrap(), None, 0).unwrap(),
        Clock::Monotonic,
        60.0,
        None,
    )
    .unwrap();
    let left = real.hit(&fp("k"), 1).reset_after;
    let want = 60 * NANOS - crate::clock::realtime_ns() % (60 * NANOS);
    assert!(left.abs_diff(want) < NANOS / 10, "{left} vs {want}");
}

#[test]
fn threads_admit_exactly_the_quota() {
    let clock = ManualClock::new(0);
    let tb = Arc::new(token_bucket("1000/hour", 1000, &clock));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let tb = Arc::clone(&tb);
            std::thread::spawn(move || (0..1000).filter(|_| tb.hit(&fp("hot"), 1).allowed).count())
        })
        .collect();
    let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(admitted, 1000);
}

#[test]
fn set_quota_keeps_usage_and_is_per_key() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("10/s", 10, &clock);
    assert!(tb.hit(&fp("a"), 8).allowed);
    assert!(tb.hit(&fp("b"), 8).allowed);
    // Shrinking: "a" has used 8 units, the new burst is 5: denied until 3 refilled+.
    let small = Quota::new(Kind::TokenBucket, Rate::parse("1/s").unwrap(), Some(5), 0).unwrap();
    tb.set_quota(&fp("a"), small.clone()).unwrap();
    let d = tb.peek(&fp("a"), 1);
    assert!(!d.allowed);
    assert_eq!(d.limit, 5);
    assert_eq!(d.retry_after, Some(4 * NANOS), "8 used of 5: 4 units must drain at 1/s");
    // "b" is untouched.
    assert_eq!(tb.peek(&fp("b"), 0).remaining, 2);
    let (own, is_own) = tb.quota_of(&fp("a"));
    assert_eq!((own.limit(), own.rate(), is_own), (small.limit(), small.rate(), true));
    // Growing back: 8 used of 10 again.
    assert!(tb.clear_quota(&fp("a")).unwrap());
    assert!(!tb.clear_quota(&fp("a")).unwrap());
    assert_eq!(tb.peek(&fp("a"), 0).remaining, 2);
    // A key with its own quota before its first call starts fresh under it.
    let big = Quota::new(Kind::TokenBucket, Rate::parse("100/s").unwrap(), Some(100), 0).unwrap();
    tb.set_quota(&fp("new"), big).unwrap();
    assert_eq!(tb.hit(&fp("new"), 50).remaining, 50);
    assert_eq!(tb.stats().overrides, 1);
    // Another algorithm is refused.
    let fixed = Quota::new(Kind::FixedWindow, Rate::parse("5/s").unwrap(), None, 0).unwrap();
    assert!(tb.set_quota(&fp("a"), fixed.clone()).is_err());
    assert!(tb.set_default(fixed).is_err());
}

#[test]
fn set_default_converts_every_key_without_its_own_quota() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("10/minute", 10, &clock);
    for i in 0..1000 {
        tb.hit(&fp(&i.to_string()), 4);
    }
    let own = Quota::new(Kind::TokenBucket, Rate::parse("1/minute").unwrap(), Some(100), 0).unwrap();
    tb.set_quota(&fp("7"), own).unwrap();
    tb.set_default(Quota::new(Kind::TokenBucket, Rate::parse("20/minute").unwrap(), Some(20), 0).unwrap()).unwrap();
    for i in 0..1000 {
        let d = tb.peek(&fp(&i.to_string()), 0);
        if i == 7 {
            assert_eq!((d.limit, d.remaining), (100, 96));
        } else {
            assert_eq!((d.limit, d.remaining), (20, 16), "key {i}");
        }
    }
    // Fresh keys get the new default.
    assert_eq!(tb.hit(&fp("fresh"), 1).remaining, 19);
    // The ttl grows with a quota that takes longer to refill.
    tb.set_default(Quota::new(Kind::TokenBucket, Rate::parse("1/day").unwrap(), Some(1), 0).unwrap()).unwrap();
    assert_eq!(tb.ttl_ns(), 86_400 * NANOS);
}

#[test]
fn window_quotas_carry_the_current_count() {
    let clock = ManualClock::new(0);
    let quota = Quota::new(Kind::FixedWindow, Rate::parse("10/minute").unwrap(), None, 0).unwrap();
    let l = Limiter::new(quota, Clock::Manual(clock.clone()), 3600.0, None).unwrap();
    clock.advance(10 * NANOS);
    assert!(l.hit(&fp("k"), 6).allowed);
    let same_period = Quota::new(Kind::FixedWindow, Rate::parse("5/minute").unwrap(), None, 0).unwrap();
    l.set_quota(&fp("k"), same_period).unwrap();
    assert!(!l.peek(&fp("k"), 1).allowed, "6 used of 5");
    let hourly = Quota::new(Kind::FixedWindow, Rate::parse("100/hour").unwrap(), None, 0).unwrap();
    l.set_quota(&fp("k"), hourly).unwrap();
    assert_eq!(l.peek(&fp("k"), 0).remaining, 94);
    let sliding = |r: &str| Quota::new(Kind::SlidingWindow, Rate::parse(r).unwrap(), None, 0).unwrap();
    let sw = Limiter::new(sliding("10/minute"), Clock::Manual(clock.clone()), 3600.0, None).unwrap();
    assert!(sw.hit(&fp("k"), 6).allowed);
    clock.advance(60 * NANOS); // 6 now in the previous window, weighted by 5/6 (50 s left of 60)
    sw.set_quota(&fp("k"), sliding("10/hour")).unwrap();
    assert_eq!(sw.peek(&fp("k"), 0).remaining, 5, "ceil(6 * 50/60) = 5 used");
}

#[test]
fn shadow_mode_admits_and_counts() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("2/minute", 2, &clock);
    tb.set_shadow(true);
    let mut shadowed = 0;
    for i in 0..5 {
        let c = tb.check(&fp("a"), 1);
        assert!(c.decision.allowed);
        if let Some(denied) = c.shadowed {
            shadowed += 1;
            assert!(!denied.allowed);
            assert_eq!(c.decision.retry_after, Some(0));
            // 2/minute: the third call would wait 30 s, the next ones too.
            assert_eq!(denied.retry_after, Some(30 * NANOS), "call {i}");
        }
    }
    assert_eq!(shadowed, 3);
    let st = tb.stats();
    assert_eq!((st.counters.allowed, st.counters.denied, st.counters.shadow_denied), (2, 3, 3));
    assert_eq!(st.counters.near_limit, 1, "0 of 2 left is near the limit, 1 of 2 is not");
    tb.set_shadow(false);
    assert!(!tb.hit(&fp("a"), 1).allowed);
}

#[test]
fn top_lists_the_most_used_keys() {
    let clock = ManualClock::new(0);
    let tb = token_bucket("100/day", 100, &clock);
    for i in 1..=50u64 {
        tb.hit(&fp(&i.to_string()), i);
    }
    let top = tb.top(3).unwrap();
    assert_eq!(top.iter().map(|t| t.1).collect::<Vec<_>>(), vec![50, 49, 48]);
    assert_eq!(top[0].0, fp("50"));
    assert!(tb.top(0).unwrap().is_empty());
    assert_eq!(tb.top(100).unwrap().len(), 50);
}

fn table(name: &str, capacity: u64, ttl_secs: u64) -> (Arc<ShmTable>, String) {
    use crate::store::shm::Location;
    let p = std::env::temp_dir().join(format!("nl-limiter-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let path = p.to_string_lossy().into_owned();
    (Arc::new(ShmTable::open(Location::Path(&path), Some(capacity), Some(ttl_secs)).unwrap()), path)
}

fn quota(kind: Kind, rate: &str) -> Quota {
    Quota::new(kind, Rate::parse(rate).unwrap(), None, 0).unwrap()
}

#[test]
fn shared_memory_limiters_decide_count_and_shadow_like_in_process_ones() {
    let (t, path) = table("alike", 1024, 3600);
    let clock = Clock::Manual(ManualClock::new(NANOS));
    let shared =
        Limiter::on_shared_memory(quota(Kind::TokenBucket, "2/minute"), clock.clone(), Arc::clone(&t)).unwrap();
    let local = Limiter::new(quota(Kind::TokenBucket, "2/minute"), clock.clone(), 3600.0, None).unwrap();
    for l in [&shared, &local] {
        let k = l.fingerprint(KeyKind::Str, b"k");
        let answers: Vec<bool> = (0..3).map(|_| l.hit(&k, 1).allowed).collect();
        assert_eq!(answers, [true, true, false]);
        l.set_shadow(true);
        let c = l.check(&k, 1);
        assert!(c.decision.allowed && c.shadowed.unwrap().retry_after == Some(30 * NANOS));
        l.set_shadow(false);
        let s = l.stats();
        assert_eq!(
            (s.counters.allowed, s.counters.denied, s.counters.shadow_denied, s.counters.near_limit),
            (2, 2, 1, 1)
        );
        assert_eq!(l.get_limit(&k), (false, 0));
        let i = l.inspect(&k);
        assert_eq!((i.algorithm, i.used, i.allowed, i.tracked, i.own_quota), ("token bucket", 2, false, true, false));
        assert_eq!(i.retry_after, Some(30 * NANOS));
        l.reset(&k);
        assert_eq!(l.peek(&k, 0).remaining, 2);
    }
    assert_eq!((shared.max_keys(), shared.ttl_ns(), shared.store_path()), (None, 3600 * NANOS, Some(path.as_str())));
    assert!(shared.is_shared() && !local.is_shared());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn limiters_sharing_a_table_share_keys_only_when_they_count_alike() {
    let (t, path) = table("salt", 1024, 86_400);
    let clock = Clock::Manual(ManualClock::new(NANOS));
    let on = |q: Quota| Limiter::on_shared_memory(q, clock.clone(), Arc::clone(&t)).unwrap();
    let (a, twin) = (on(quota(Kind::FixedWindow, "5/minute")), on(quota(Kind::FixedWindow, "5/minute")));
    let other = on(quota(Kind::SlidingWindow, "5/minute"));
    let k = a.fingerprint(KeyKind::Str, b"k");
    assert_eq!(k, twin.fingerprint(KeyKind::Str, b"k"));
    assert_ne!(k, other.fingerprint(KeyKind::Str, b"k"));
    assert!(a.hit(&k, 5).allowed);
    assert!(!twin.hit(&k, 1).allowed, "the twin (another process, say) sees the charge");
    assert!(other.hit(&other.fingerprint(KeyKind::Str, b"k"), 1).allowed);
    assert_eq!((a.len(), a.stats().keys), (2, 2), "the table's keys, every limiter's");
    let err = Limiter::on_shared_memory(quota(Kind::TokenBucket, "1/week"), clock.clone(), Arc::clone(&t));
    assert!(err.err().unwrap().to_string().contains("needs 604800s to forget a key but the store's ttl is 86400s"));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn shared_memory_quotas_are_fixed() {
    let (t, path) = table("fixed", 64, 3600);
    let l = Limiter::on_shared_memory(quota(Kind::TokenBucket, "1/s"), Clock::Monotonic, t).unwrap();
    let k = l.fingerprint(KeyKind::Int, &5i128.to_le_bytes());
    for err in [
        l.set_quota(&k, quota(Kind::TokenBucket, "2/s")).unwrap_err(),
        l.clear_quota(&k).unwrap_err(),
        l.set_default(quota(Kind::TokenBucket, "2/s")).unwrap_err(),
        l.top(3).unwrap_err(),
    ] {
        assert!(err.to_string().contains("is not available with a SharedMemoryStore"), "{err}");
    }
    assert_eq!(l.quota_of(&k), (quota(Kind::TokenBucket, "1/s"), false));
    assert!(Composite::new(vec![Arc::new(l)]).err().unwrap().to_string().contains("in-process"));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_full_store_answers_and_counts_alike() {
    let (t, path) = table("full", 32, 3600);
    let clock = Clock::Manual(ManualClock::new(NANOS));
    let q = Quota::new(Kind::TokenBucket, Rate::parse("1/minute").unwrap(), Some(5), 0).unwrap();
    let shared = Limiter::on_shared_memory(q.clone(), clock.clone(), t).unwrap();
    let local = Limiter::new(q.clone(), clock, 3600.0, Some(32)).unwrap();
    for l in [&shared, &local] {
        let admitted =
            (0..100u32).filter(|i| l.hit(&l.fingerprint(KeyKind::Bytes, &i.to_le_bytes()), 1).allowed).count();
        assert_eq!(admitted, 32);
        let d = l.hit(&l.fingerprint(KeyKind::Str, b"late"), 1);
        assert_eq!(d, q.full());
        assert_eq!(l.stats().store_full, 69);
    }
    std::fs::remove_file(path).unwrap();
}
