//! The hierarchy's tests: both engines, classes, leases, quota changes.

use super::*;
use crate::clock::{ManualClock, NANOS};
use crate::store::shm::Location;

fn rate(s: &str) -> Option<Rate> {
    Some(Rate::parse(s).unwrap())
}

fn level(name: &str, requests: Option<Rate>, tokens: Option<Rate>, concurrency: Option<u64>) -> LevelSpec {
    LevelSpec { name: name.into(), rates: [requests, tokens, None, None], concurrency }
}

fn path(elements: &[&str]) -> Path {
    let mut p = Path::new();
    for e in elements {
        p.push(KeyKind::Str, e.as_bytes());
    }
    p
}

fn three(clock: &ManualClock, store: Option<Arc<ShmTable>>) -> Hierarchy {
    let levels = vec![
        level("org", rate("10/minute"), rate("1000/minute"), None),
        level("team", rate("6/minute"), None, Some(2)),
        level("key", rate("4/minute"), None, Some(1)),
    ];
    Hierarchy::new(levels, store, "", Clock::Manual(clock.clone()), 3600.0, None, 60.0).unwrap()
}

fn one(requests: u64) -> Amounts {
    Amounts { requests, ..Amounts::default() }
}

fn shm(name: &str) -> (Arc<ShmTable>, String) {
    let p = std::env::temp_dir().join(format!("nl-hier-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let p = p.to_string_lossy().into_owned();
    (Arc::new(ShmTable::open(Location::Path(&p), Some(4096), Some(3600)).unwrap()), p)
}

#[test]
fn every_level_is_charged_or_none() {
    for store in [None, Some(shm("levels"))] {
        let clock = ManualClock::new(0);
        let h = three(&clock, store.as_ref().map(|s| Arc::clone(&s.0)));
        let (a, b) = (path(&["acme", "search", "k1"]), path(&["acme", "search", "k2"]));
        assert_eq!((0..5).filter(|_| h.check(&a, one(1), true).unwrap().allowed).count(), 4);
        let refused = h.check(&a, one(1), true).unwrap();
        assert_eq!(refused.refused, Some(Refusal { level: 2, unit: Some(Unit::Requests) }));
        assert_eq!(refused.decision.retry_after, Some(15 * NANOS), "the key frees up first in 15 s");
        // The team has 2 of its 6 left: k2 gets 2, then the team refuses, and the key
        // refused was charged nowhere.
        assert_eq!((0..3).filter(|_| h.check(&b, one(1), true).unwrap().allowed).count(), 2);
        let team = h.check(&b, one(1), true).unwrap();
        assert_eq!(team.refused.unwrap().level, 1);
        let k2 = h.peek(&b, Amounts::default()).unwrap();
        assert_eq!(k2.parts[h.find_part(2, Unit::Requests).unwrap()].remaining, 2, "k2 spent 2 of 4");
        let org = h.peek(&a, Amounts::default()).unwrap();
        assert_eq!(org.parts[h.find_part(0, Unit::Requests).unwrap()].remaining, 4, "the org spent 6 of 10");
        // A path with the wrong number of elements names the levels.
        let err = h.check(&path(&["acme"]), one(1), true).unwrap_err().to_string();
        assert!(err.contains("org > team > key") && err.contains("expected 3 elements, got 1"), "{err}");
        let stats = h.stats();
        assert_eq!((stats.counters.allowed, stats.counters.denied, stats.refused_by.clone()), (6, 4, vec![0, 2, 2]));
        if let Some((_, p)) = store {
            std::fs::remove_file(p).unwrap();
        }
    }
}

/// A node's (limit, leases held), whatever the store.
fn leases(h: &Hierarchy, node: &[&str]) -> (u64, u64) {
    h.inspect(&path(node)).unwrap().1.unwrap()
}

#[test]
fn reservations_take_a_lease_at_every_level_and_settle_every_level() {
    for store in [None, Some(shm("reserve"))] {
        let clock = ManualClock::new(0);
        let h = three(&clock, store.as_ref().map(|s| Arc::clone(&s.0)));
        let k = path(&["acme", "search", "k1"]);
        let tokens = |t| Amounts { requests: 1, tokens: t, ..Amounts::default() };
        let r = h.reserve(&k, tokens(600)).unwrap();
        assert!(r.allowed);
        assert!(r.leases[0].is_none() && r.leases[1].is_some() && r.leases[2].is_some());
        let busy = h.reserve(&k, tokens(1)).unwrap();
        assert_eq!(busy.refused, Some(Refusal { level: 2, unit: None }), "the key's one lease is held");
        assert!(busy.leases.iter().all(Option::is_none), "no lease is kept by a refused reservation");
        assert_eq!(leases(&h, &["acme", "search"]), (2, 1));
        assert_eq!(h.stats().concurrency[1].unwrap().held, 1);
        // The org's tokens: 600 reserved of 1000; settled at 100, 500 come back.
        let settled = h.settle(&k, Deltas { tokens: -500, ..Deltas::default() }, r.charged_at, &r.leases).unwrap();
        assert!(settled);
        let org_tokens = h.find_part(0, Unit::Tokens).unwrap();
        assert_eq!(h.peek(&k, Amounts::default()).unwrap().parts[org_tokens].remaining, 900);
        assert_eq!(leases(&h, &["acme", "search", "k1"]), (1, 0));
        assert_eq!(h.stats().concurrency[2].unwrap().held, 0);
        // Another key of the team takes the team's two leases; a third key waits for the team.
        let (k2, k3) = (path(&["acme", "search", "k2"]), path(&["acme", "search", "k3"]));
        let r1 = h.reserve(&k, tokens(1)).unwrap();
        let r2 = h.reserve(&k2, tokens(1)).unwrap();
        assert!(r1.allowed && r2.allowed);
        let third = h.reserve(&k3, tokens(1)).unwrap();
        assert_eq!(third.refused, Some(Refusal { level: 1, unit: None }));
        assert!(third.concurrency[2].unwrap().allowed, "the key's lease is told, not taken");
        assert_eq!(leases(&h, &["acme", "search", "k3"]), (1, 0));
        let org_requests = h.find_part(0, Unit::Requests).unwrap();
        assert_eq!(third.parts[org_requests].remaining, 6, "told, charging nothing: 3 of 10 used, 1 asked");
        // Cancelled: the request and its tokens come back at every level.
        assert!(h.settle(&k2, Deltas { requests: -1, tokens: -1, spend: 0 }, r2.charged_at, &r2.leases).unwrap());
        assert_eq!(h.peek(&k, Amounts::default()).unwrap().parts[org_requests].remaining, 8);
        assert_eq!(leases(&h, &["acme", "search"]), (2, 1));
        // Past lease_ttl a reservation stands as charged, and its leases have ended.
        clock.advance(61 * NANOS);
        assert!(!h.settle(&k, Deltas { tokens: -1, ..Deltas::default() }, r1.charged_at, &r1.leases).unwrap());
        assert_eq!(leases(&h, &["acme", "search"]), (2, 0));
        assert_eq!(h.stats().concurrency[1].unwrap().held, 0);
        if let Some((_, p)) = store {
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn shared_leases_are_seen_by_every_process_and_end_with_lease_ttl() {
    let (table, p) = shm("shared-leases");
    let clock = ManualClock::new(0);
    // Two hierarchies on one store: two processes of a host.
    let (a, b) = (three(&clock, Some(Arc::clone(&table))), three(&clock, Some(Arc::clone(&table))));
    let (k1, k2, k3) = (path(&["o", "t", "k1"]), path(&["o", "t", "k2"]), path(&["o", "t", "k3"]));
    let one = Amounts { requests: 1, ..Amounts::default() };
    let held = a.reserve(&k1, one).unwrap();
    assert!(held.allowed);
    let same_key = b.reserve(&k1, one).unwrap();
    assert_eq!(same_key.refused, Some(Refusal { level: 2, unit: None }), "a's lease is seen by b");
    assert_eq!(same_key.decision.retry_after, Some(60 * NANOS), "it ends with its lease_ttl at the latest");
    let other = b.reserve(&k2, one).unwrap();
    assert!(other.allowed);
    let team_full = b.reserve(&k3, one).unwrap();
    assert_eq!(team_full.refused, Some(Refusal { level: 1, unit: None }));
    let requests = |h: &Hierarchy, node: &[&str]| h.inspect(&path(node)).unwrap().0[0].1.used;
    assert_eq!(requests(&a, &["o", "t"]), 2, "refused for leases: charged nowhere");
    assert_eq!((a.stats().concurrency[1].unwrap().held, b.stats().concurrency[1].unwrap().held), (1, 1));
    // a's process dies holding its lease: it ends after lease_ttl, for everyone.
    drop(a);
    clock.advance(30 * NANOS);
    assert!(b.settle(&k2, Deltas::default(), other.charged_at, &other.leases).unwrap());
    assert_eq!(leases(&b, &["o", "t"]), (2, 1));
    assert!(!b.reserve(&k1, one).unwrap().allowed);
    clock.advance(30 * NANOS + 1);
    assert_eq!(leases(&b, &["o", "t"]), (2, 0));
    let again = b.reserve(&k1, one).unwrap();
    assert!(again.allowed, "the dead holder's lease ran out");
    // A node's own limit is kept in the store; a reset ends the node's leases.
    b.set_quota(&path(&["o", "t"]), [None; 4], Some(3)).unwrap();
    assert_eq!(b.concurrency_of(&path(&["o", "t"])).unwrap(), Some((3, true)));
    assert_eq!(b.concurrency_max(1), Some(2));
    b.reset(&path(&["o", "t"])).unwrap();
    assert_eq!((leases(&b, &["o", "t"]), b.stats().concurrency[1].unwrap().held), ((3, 0), 0));
    assert!(b.release(&k1, &again.leases).unwrap() == 1, "the key's lease was not the team's");
    assert!(b.clear_quota(&path(&["o", "t"])).unwrap());
    assert_eq!(b.stats().concurrency.iter().map(|c| c.map(|c| c.held)).collect::<Vec<_>>(), [None, Some(0), Some(0)]);
    std::fs::remove_file(p).unwrap();
}

/// A node in debt keeps it when given the quota it has (a reload of an unchanged
/// config): converting the state would cap the debt at two bursts.
#[test]
fn an_unchanged_quota_keeps_a_debt() {
    for store in [None, Some(shm("unchanged"))] {
        let clock = ManualClock::new(0);
        let h = three(&clock, store.as_ref().map(|s| Arc::clone(&s.0)));
        let k = path(&["acme", "search", "k1"]);
        let r = h.reserve(&k, Amounts { requests: 1, tokens: 10, ..Amounts::default() }).unwrap();
        // 100,000 tokens over the org's 1,000/minute: 100 minutes of debt.
        assert!(h.settle(&k, Deltas { tokens: 99_990, ..Deltas::default() }, r.charged_at, &r.leases).unwrap());
        let tokens = h.find_part(0, Unit::Tokens).unwrap();
        let wait = |h: &Hierarchy| h.peek(&k, Amounts::default()).unwrap().parts[tokens].retry_after;
        let debt = wait(&h);
        assert_eq!(debt, Some(99 * 60 * NANOS), "paid back when under the burst again");
        let org = path(&["acme"]);
        h.set_quota(&org, [None, rate("1000/minute"), None, None], None).unwrap();
        assert_eq!(wait(&h), debt, "set_quota to the same quota");
        assert!(h.quota_of(&org, tokens).unwrap().1, "the node's own now");
        assert!(h.clear_quota(&org).unwrap() && !h.quota_of(&org, tokens).unwrap().1);
        assert_eq!(wait(&h), debt, "clear_quota back to the same quota");
        if store.is_none() {
            h.set_default(0, [None, rate("1000/minute"), None, None], None).unwrap();
            assert_eq!(wait(&h), debt, "set_default to the same quota");
        }
        // Another quota converts the state (and caps the debt at two bursts).
        h.set_quota(&org, [None, rate("2000/minute"), None, None], None).unwrap();
        assert_eq!(wait(&h), Some(60 * NANOS), "4,000 tokens of debt at the most: 1 min to fall under 2,000");
        if let Some((_, p)) = store {
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn node_quotas_change_at_run_time() {
    let clock = ManualClock::new(0);
    let h = three(&clock, None);
    let acme = path(&["acme"]);
    let k = path(&["acme", "search", "k1"]);
    assert!(h.check(&k, one(3), true).unwrap().allowed);
    h.set_quota(&acme, [rate("4/minute"), None, None, None], None).unwrap();
    let d = h.check(&k, one(1), true).unwrap();
    assert!(d.allowed, "3 of the org's new 4 were used");
    let d = h.check(&k, one(1), true).unwrap();
    assert_eq!(d.refused, Some(Refusal { level: 0, unit: Some(Unit::Requests) }));
    let (q, own) = h.quota_of(&acme, h.find_part(0, Unit::Requests).unwrap()).unwrap();
    assert!(own && q.limit() == 4);
    // Another org keeps the level's quota.
    assert!(h.check(&path(&["other", "t", "k"]), one(4), true).unwrap().allowed);
    let err = h.set_quota(&acme, [None, None, None, rate("5/day")], None).unwrap_err().to_string();
    assert_eq!(err, "level \"org\" has no spend quota to change");
    assert!(h.set_quota(&acme, [None; 4], Some(3)).unwrap_err().to_string().contains("no concurrency limit"));
    h.set_quota(&path(&["acme", "search"]), [None; 4], Some(5)).unwrap();
    assert_eq!(h.concurrency_of(&path(&["acme", "search"])).unwrap(), Some((5, true)));
    assert!(h.clear_quota(&acme).unwrap() && !h.clear_quota(&acme).unwrap());
    h.set_default(h.level("key").unwrap(), [rate("100/minute"), None, None, None], Some(2)).unwrap();
    // The key has used 4 of the level's new 100; its team has 2 of 6 left.
    assert!(h.check(&k, one(2), true).unwrap().allowed, "the key level was raised");
    assert_eq!(h.check(&k, one(1), true).unwrap().refused.unwrap().level, 1);
    assert!(h.level("nope").unwrap_err().to_string().contains("\"org\", \"team\", \"key\""));
    h.reset(&acme).unwrap();
    assert_eq!(h.inspect(&acme).unwrap().0[0].1.used, 0);
    assert!(h.inspect(&path(&["a", "b", "c", "d"])).is_err());
}

#[test]
fn decisions_made_elsewhere_combine_alike() {
    let clock = ManualClock::new(0);
    let h = three(&clock, None);
    let k = path(&["acme", "search", "k1"]);
    for _ in 0..4 {
        h.check(&k, one(1), true).unwrap();
    }
    let here = h.peek(&k, one(1)).unwrap();
    let there = h.combine(here.parts.clone(), here.concurrency.clone(), false).unwrap();
    assert_eq!((there.decision, there.refused), (here.decision, here.refused));
    let shadowed = h.combine(here.parts.clone(), here.concurrency.clone(), true).unwrap();
    assert!(shadowed.allowed && shadowed.shadow && shadowed.refused.unwrap().level == 2);
    assert!(h.combine(vec![], here.concurrency, false).is_err());
    assert_eq!(h.stats().counters.allowed, 4, "combining counts nothing");
}

#[test]
fn node_quotas_in_shared_memory_are_kept_in_the_store() {
    let (table, p) = shm("node-quotas");
    let clock = ManualClock::new(0);
    let build = || three(&clock, Some(Arc::clone(&table)));
    let (h, other) = (build(), build());
    let acme = path(&["acme"]);
    let k = path(&["acme", "search", "k1"]);
    assert!(h.check(&k, one(3), true).unwrap().allowed);
    h.set_quota(&acme, [rate("4/minute"), None, None, None], None).unwrap();
    // Another process (here another Hierarchy on the same store) sees it.
    assert!(other.check(&k, one(1), true).unwrap().allowed, "3 of acme's new 4 were used");
    assert_eq!(other.check(&k, one(1), true).unwrap().refused, Some(Refusal { level: 0, unit: Some(Unit::Requests) }));
    let requests = h.find_part(0, Unit::Requests).unwrap();
    let (q, own) = other.quota_of(&acme, requests).unwrap();
    assert!(own && q.limit() == 4);
    assert!(other.inspect(&acme).unwrap().0[0].1.own_quota);
    // The own quota outlives the store's ttl; the node's usage does not.
    table.sweep(10 * 3600 * NANOS);
    assert!(h.quota_of(&acme, requests).unwrap().1);
    assert!(other.clear_quota(&acme).unwrap() && !h.clear_quota(&acme).unwrap());
    assert!(!h.quota_of(&acme, requests).unwrap().1);
    assert!(h.set_quota(&acme, [None, None, None, rate("1/s")], None).is_err(), "no spend quota at the org");
    let err = h.set_default(0, [rate("1/s"), None, None, None], None).unwrap_err().to_string();
    assert!(err.contains("set_default_quota is not available with a SharedMemoryStore"), "{err}");
    std::fs::remove_file(p).unwrap();
}

#[test]
fn classes_keep_a_reserve_at_every_level() {
    for store in [None, Some(shm("classes"))] {
        let clock = ManualClock::new(0);
        let levels = vec![level("org", rate("10/hour"), None, None), level("key", rate("100/hour"), None, Some(5))];
        let classes = vec![("interactive".to_string(), Share::ALL), ("batch".to_string(), Share::new(0.7).unwrap())];
        let table = store.as_ref().map(|s| Arc::clone(&s.0));
        let h = Hierarchy::with_classes(levels, table, "", Clock::Manual(clock), 3600.0, None, 60.0, classes, None)
            .unwrap();
        let (top, batch) = (h.class("interactive").unwrap(), h.class("batch").unwrap());
        assert_eq!(h.default_class(), Some(batch));
        let call = |class| Amounts { requests: 1, class: Some(class), ..Amounts::default() };
        let k = path(&["o", "k"]);
        let admitted = (0..10).filter(|_| h.check(&k, call(batch), true).unwrap().allowed).count();
        assert_eq!(admitted, 7, "batch stops at 70% of the org");
        let refused = h.check(&k, Amounts { requests: 1, ..Amounts::default() }, true).unwrap();
        assert_eq!(refused.refused, Some(Refusal { level: 0, unit: Some(Unit::Requests) }), "the default is batch");
        assert_eq!(refused.parts[0].limit, 7, "the class's view of the org");
        assert_eq!((0..10).filter(|_| h.check(&k, call(top), true).unwrap().allowed).count(), 3);
        let r = h.reserve(&path(&["p", "k"]), call(batch)).unwrap();
        assert!(r.allowed && r.leases[1].is_some());
        let stats = h.stats().classes;
        assert_eq!((stats[0].2.allowed, stats[1].2.allowed, stats[1].2.denied), (3, 8, 4));
        assert!(h.class("gold").unwrap_err().to_string().contains("\"interactive\", \"batch\""));
        if let Some((_, p)) = store {
            std::fs::remove_file(p).unwrap();
        }
    }
    let plain = three(&ManualClock::new(0), None);
    assert!(plain.class("batch").unwrap_err().to_string().contains("no priority classes"));
    assert_eq!(plain.default_class(), None);
}

#[test]
fn validation() {
    let clock = Clock::Manual(ManualClock::new(0));
    let new = |levels: Vec<LevelSpec>| Hierarchy::new(levels, None, "", clock.clone(), 60.0, None, 60.0);
    assert!(new(vec![]).is_err());
    assert!(new(vec![level("a", None, None, None)]).err().unwrap().to_string().contains("has no quota"));
    let twice = new(vec![level("a", rate("1/s"), None, None), level("a", rate("1/s"), None, None)]);
    assert!(twice.err().unwrap().to_string().contains("given twice"));
    assert!(new(vec![level("", rate("1/s"), None, None)]).is_err());
    let deep: Vec<LevelSpec> = (0..17).map(|i| level(&format!("l{i}"), rate("1/s"), None, None)).collect();
    assert!(new(deep).is_err());
    let (table, p) = shm("validation");
    let conc = |n, lease_ttl| {
        let levels = vec![level("a", None, None, Some(n))];
        Hierarchy::new(levels, Some(Arc::clone(&table)), "", clock.clone(), 60.0, None, lease_ttl)
    };
    assert!(conc(1, 3600.0).is_ok());
    assert!(conc(1, 3601.0).err().unwrap().to_string().contains("above the store's ttl"));
    assert!(conc(65_536, 60.0).err().unwrap().to_string().contains("from 1 to 65535"));
    // 16 levels: 32 rate quotas and 16 leases are 64 writes, the most a transaction takes.
    let many = |leased: usize| -> Vec<LevelSpec> {
        (0..16).map(|i| level(&format!("l{i}"), rate("1/s"), rate("1/s"), (i < leased).then_some(1))).collect()
    };
    assert!(Hierarchy::new(many(16), Some(Arc::clone(&table)), "", clock.clone(), 60.0, None, 60.0).is_ok());
    let mut many = many(16);
    many[0].rates[Unit::Spend as usize] = rate("1/s");
    let err = Hierarchy::new(many, Some(table), "", clock, 60.0, None, 60.0).err().unwrap().to_string();
    assert!(err.contains("twice its concurrency limits"), "{err}");
    std::fs::remove_file(p).unwrap();
    assert_eq!(Unit::parse("daily_tokens").unwrap(), Unit::DailyTokens);
    assert!(Unit::parse("dollars").is_err());
}

#[test]
fn shadow_mode_admits_and_names_the_level() {
    let clock = ManualClock::new(0);
    let h = three(&clock, None);
    let k = path(&["acme", "search", "k1"]);
    h.set_shadow(true);
    let outcomes: Vec<Outcome> = (0..5).map(|_| h.check(&k, one(1), true).unwrap()).collect();
    assert!(outcomes.iter().all(|o| o.allowed));
    assert!(outcomes[4].shadow && outcomes[4].refused.unwrap().level == 2);
    let c = h.stats().counters;
    assert_eq!((c.allowed, c.denied, c.shadow_denied), (4, 1, 1));
}

/// Threads on many keys of one team: no level ever admits past its quota, and every
/// admitted call is charged at every level.
fn exact_under_threads(store: Option<Arc<ShmTable>>) {
    let clock = ManualClock::new(0);
    let levels = vec![
        level("org", rate("300/hour"), None, None),
        level("team", rate("200/hour"), None, None),
        level("key", rate("30/hour"), None, None),
    ];
    let h = Arc::new(Hierarchy::new(levels, store, "t", Clock::Manual(clock), 3600.0, None, 60.0).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let h = Arc::clone(&h);
            std::thread::spawn(move || {
                let mut admitted = vec![0u64; 20];
                for i in 0..400 {
                    let k = (i * 7 + t) % 20;
                    let team = if k < 10 { "a" } else { "b" };
                    if h.check(&path(&["o", team, &format!("k{k}")]), one(1), true).unwrap().allowed {
                        admitted[k] += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let mut per_key = vec![0u64; 20];
    for handle in handles {
        for (k, n) in handle.join().unwrap().into_iter().enumerate() {
            per_key[k] += n;
        }
    }
    let (a, b): (u64, u64) = (per_key[..10].iter().sum(), per_key[10..].iter().sum());
    assert!(per_key.iter().all(|&n| n <= 30), "{per_key:?}");
    assert!(a <= 200 && b <= 200 && a + b == 300, "the org's 300 all went, no more: {a} + {b}");
    let peek = |p: &[&str], level: usize| {
        let d = h.peek(&path(p), Amounts::default()).unwrap();
        d.parts[h.find_part(level, Unit::Requests).unwrap()].remaining
    };
    assert_eq!(peek(&["o", "a", "k0"], 0), 0);
    assert_eq!(peek(&["o", "a", "k0"], 1), 200 - a, "the team was charged what its keys were");
    assert_eq!(peek(&["o", "b", "k10"], 2), 30 - per_key[10]);
}

#[test]
fn exact_under_threads_in_process() {
    exact_under_threads(None);
}

#[test]
fn exact_under_threads_in_shared_memory() {
    let (table, p) = shm("threads");
    exact_under_threads(Some(table));
    std::fs::remove_file(p).unwrap();
}

#[test]
fn a_full_store_refuses_the_whole_path() {
    let clock = Clock::Manual(ManualClock::new(0));
    let levels = vec![level("org", rate("10/minute"), None, None), level("key", rate("5/minute"), None, None)];
    let h = Hierarchy::new(levels, None, "", clock, 3600.0, Some(1), 60.0).unwrap();
    assert!(h.check(&path(&["o", "k1"]), one(1), true).unwrap().allowed);
    let full = h.check(&path(&["o", "k2"]), one(1), true).unwrap();
    assert!(!full.allowed);
    assert_eq!(full.refused.unwrap().level, 1, "the key level's store is full");
    assert_eq!(h.peek(&path(&["o", "k1"]), Amounts::default()).unwrap().parts[0].remaining, 9);
}
