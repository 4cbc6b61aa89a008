//! The in-process keyed store: a sharded concurrent map from key fingerprint to
//! algorithm state, with idle-key expiry and an optional bound on the number of keys.
//!
//! - Each of the [`SHARDS`] shards is a `hashbrown` table behind its own mutex, padded
//!   to its own cache line; a check locks one shard for a few nanoseconds. Nothing
//!   depends on the GIL.
//! - A tracked key costs one 32-byte slot: state (16), fingerprint (12), last-seen
//!   second (4), plus the table's control byte and free space.
//! - Idle keys are swept one shard at a time, never all at once: a shard is swept when
//!   a new key is inserted into it and its sweep is due (every `ttl / 4`, at most every
//!   60 s), or on demand by [`Store::sweep`]. No background thread is needed, because
//!   only inserts grow memory.
//! - With `max_keys`, a new key that finds the store full makes its shard drop the keys
//!   that are back at their fresh state (which never changes a decision); if none can
//!   be dropped, the new key is refused and its call denied. Keys already tracked keep
//!   their limits whatever the flood of new keys.

pub mod shm;

use crate::algorithms::State;
use crate::clock::NANOS;
use crate::key::Fingerprint;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Number of shards (a power of two).
pub const SHARDS: usize = 64;

/// The shortest time between two reclaims when the store is full, so a flood of new
/// keys cannot turn every call into a scan.
const RECLAIM_INTERVAL_NS: u64 = 1_000_000;
/// How many slots one reclaim looks at (whole shards, at least one).
const RECLAIM_BUDGET: usize = 8_192;

static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

/// One tracked key.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub state: State,
    pub fp: [u32; 3],
    /// The clock's second at the key's last update.
    pub seen: u32,
}

/// One shard: its table and what the store's owner keeps per shard (`E`, e.g. the
/// quotas and counters of a limiter), locked together.
pub struct Shard<E> {
    table: HashTable<Slot>,
    next_sweep: u32,
    pub extra: E,
}

/// Tells whether a slot is back at its fresh state, given its shard's `extra`.
pub type Fresh<'a, E> = &'a dyn Fn(&E, &Slot) -> bool;

pub struct Store<E = ()> {
    shards: Box<[CachePadded<Mutex<Shard<E>>>]>,
    len: AtomicUsize,
    max_keys: usize,
    ttl_secs: AtomicU32,
    evicted: AtomicU64,
    id: u64,
    /// When the last reclaim ran (`u64::MAX`: never) and the shard it goes on from.
    last_reclaim: AtomicU64,
    reclaim_cursor: AtomicUsize,
}

/// The second a nanosecond time falls in, as stored in a slot.
#[inline]
pub fn second_of(now: u64) -> u32 {
    let s = now / NANOS;
    if s > u32::MAX as u64 {
        u32::MAX
    } else {
        s as u32
    }
}

fn ttl_secs_of(ttl_ns: u64) -> u32 {
    ttl_ns.div_ceil(NANOS).min(u32::MAX as u64) as u32
}

impl<E> Store<E> {
    /// `ttl_ns`: idle time after which a key is evicted; `max_keys`: bound on tracked
    /// keys; `extra`: makes each shard's `extra`.
    pub fn new(ttl_ns: u64, max_keys: Option<usize>, extra: impl Fn() -> E) -> Store<E> {
        let shards = (0..SHARDS)
            .map(|_| CachePadded::new(Mutex::new(Shard { table: HashTable::new(), next_sweep: 0, extra: extra() })))
            .collect();
        Store {
            shards,
            len: AtomicUsize::new(0),
            max_keys: max_keys.unwrap_or(usize::MAX),
            ttl_secs: AtomicU32::new(ttl_secs_of(ttl_ns)),
            evicted: AtomicU64::new(0),
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            last_reclaim: AtomicU64::new(u64::MAX),
            reclaim_cursor: AtomicUsize::new(0),
        }
    }

    /// Raises the idle time after which keys are evicted (never lowers it).
    pub fn raise_ttl(&self, ttl_ns: u64) {
        self.ttl_secs.fetch_max(ttl_secs_of(ttl_ns), Ordering::Relaxed);
    }

    fn sweep_every(&self) -> u32 {
        (self.ttl_secs.load(Ordering::Relaxed) / 4).clamp(1, 60)
    }

    /// Keys evicted so far (idle, or reclaimed to make room).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Locks shard `index` (0..SHARDS), e.g. to walk every shard.
    pub fn lock_index(&self, index: usize) -> ShardGuard<'_, E> {
        ShardGuard { shard: self.shards[index].lock(), store: self, index }
    }

    /// A process-unique id; composites lock the shards of several stores in id order.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn max_keys(&self) -> Option<usize> {
        (self.max_keys != usize::MAX).then_some(self.max_keys)
    }

    /// Keys currently tracked (idle keys count until they are swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Locks the shard that holds `fp`.
    #[inline]
    pub fn lock(&self, fp: &Fingerprint) -> ShardGuard<'_, E> {
        let index = fp.shard(SHARDS);
        ShardGuard { shard: self.shards[index].lock(), store: self, index }
    }

    /// Forgets `fp` (back to fresh).
    pub fn remove(&self, fp: &Fingerprint) -> bool {
        let mut g = self.lock(fp);
        g.remove(fp)
    }

    /// Evicts every key idle for longer than the ttl (and fresh), one shard at a time.
    /// Returns how many were evicted.
    pub fn sweep(&self, now: u64, fresh: Fresh<'_, E>) -> usize {
        let mut evicted = 0;
        for (index, shard) in self.shards.iter().enumerate() {
            let mut g = ShardGuard { shard: shard.lock(), store: self, index };
            evicted += g.sweep(now, fresh, false);
        }
        evicted
    }

    /// Gives back a capacity reservation that was not used.
    pub fn unreserve(&self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    fn try_reserve(&self) -> bool {
        if self.max_keys == usize::MAX {
            self.len.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_keys).then_some(n + 1)).is_ok()
    }
}

/// A locked shard.
pub struct ShardGuard<'a, E> {
    shard: MutexGuard<'a, Shard<E>>,
    store: &'a Store<E>,
    index: usize,
}

#[inline]
fn matches(fp: &Fingerprint) -> impl Fn(&Slot) -> bool + '_ {
    move |s: &Slot| s.fp == fp.0
}

#[inline]
fn slot_hash(s: &Slot) -> u64 {
    Fingerprint(s.fp).table_hash()
}

impl<E> ShardGuard<'_, E> {
    /// The shard's `extra`.
    #[inline]
    pub fn extra(&self) -> &E {
        &self.shard.extra
    }

    #[inline]
    pub fn extra_mut(&mut self) -> &mut E {
        &mut self.shard.extra
    }

    /// The key's slot and the shard's `extra`, borrowed together.
    #[inline]
    pub fn slot_and_extra(&mut self, fp: &Fingerprint) -> (Option<&mut Slot>, &mut E) {
        let shard = &mut *self.shard;
        (shard.table.find_mut(fp.table_hash(), matches(fp)), &mut shard.extra)
    }

    /// Every slot of this shard, for introspection.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.shard.table.iter()
    }

    /// Updates every slot of this shard in place.
    pub fn update_all(&mut self, mut f: impl FnMut(&E, &mut Slot)) {
        let shard = &mut *self.shard;
        for slot in shard.table.iter_mut() {
            f(&shard.extra, slot);
        }
    }

    /// The key's slot, if tracked.
    #[inline]
    pub fn slot(&mut self, fp: &Fingerprint) -> Option<&mut Slot> {
        self.shard.table.find_mut(fp.table_hash(), matches(fp))
    }

    /// The key's state (fresh when untracked).
    #[inline]
    pub fn state(&self, fp: &Fingerprint) -> State {
        self.shard.table.find(fp.table_hash(), matches(fp)).map_or(0, |s| s.state)
    }

    /// Reserves room for one new key: sweeps the shard when its sweep is due and, when
    /// the store is full, reclaims fresh keys first. False when there is no room.
    pub fn reserve(&mut self, now: u64, fresh: Fresh<'_, E>) -> bool {
        if second_of(now) >= self.shard.next_sweep {
            self.sweep(now, fresh, false);
        }
        if self.store.try_reserve() {
            return true;
        }
        self.reclaim(now, fresh) > 0 && self.store.try_reserve()
    }

    /// Drops keys back at their fresh state (never a decision changer), walking the
    /// shards from a shared cursor: whole shards until about `RECLAIM_BUDGET` slots were
    /// looked at, at most once per `RECLAIM_INTERVAL_NS`. Shards locked by someone else
    /// are skipped (waiting for them while holding this one could deadlock).
    fn reclaim(&mut self, now: u64, fresh: Fresh<'_, E>) -> usize {
        let store = self.store;
        let last = store.last_reclaim.load(Ordering::Relaxed);
        let due = last == u64::MAX || now < last || now - last >= RECLAIM_INTERVAL_NS;
        if !due || store.last_reclaim.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return 0;
        }
        let mut freed = 0;
        let mut looked = 0;
        for _ in 0..SHARDS {
            let index = store.reclaim_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
            if index == self.index {
                looked += self.shard.table.len();
                freed += self.sweep(now, fresh, true);
            } else if let Some(shard) = store.shards[index].try_lock() {
                let mut other = ShardGuard { shard, store, index };
                looked += other.shard.table.len();
                freed += other.sweep(now, fresh, true);
            }
            if looked >= RECLAIM_BUDGET {
                break;
            }
        }
        freed
    }

    /// Takes room for a new key even past `max_keys`: for charges that must not be lost.
    pub fn force_reserve(&mut self) {
        self.store.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Inserts a new key into room taken with [`reserve`](Self::reserve).
    #[inline]
    pub fn insert_reserved(&mut self, fp: &Fingerprint, state: State, now: u64) {
        let slot = Slot { state, fp: fp.0, seen: second_of(now) };
        self.shard.table.insert_unique(fp.table_hash(), slot, slot_hash);
    }

    pub fn remove(&mut self, fp: &Fingerprint) -> bool {
        match self.shard.table.find_entry(fp.table_hash(), matches(fp)) {
            Ok(entry) => {
                entry.remove();
                self.store.len.fetch_sub(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Drops the idle (or, with `reclaim`, merely fresh) keys of this shard.
    fn sweep(&mut self, now: u64, fresh: Fresh<'_, E>, reclaim: bool) -> usize {
        let now_s = second_of(now);
        let ttl = self.store.ttl_secs.load(Ordering::Relaxed);
        let shard = &mut *self.shard;
        let before = shard.table.len();
        let extra = &shard.extra;
        shard.table.retain(|s| {
            let idle = now_s.saturating_sub(s.seen) > ttl;
            !((reclaim || idle) && fresh(extra, s))
        });
        let evicted = before - self.shard.table.len();
        if evicted > 0 {
            self.store.len.fetch_sub(evicted, Ordering::Relaxed);
            self.store.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
            // Give memory back once the table is mostly empty.
            if self.shard.table.len() * 4 < self.shard.table.capacity() {
                self.shard.table.shrink_to_fit(slot_hash);
            }
        }
        self.shard.next_sweep = now_s.saturating_add(self.store.sweep_every());
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{fingerprint, KeyKind};
    use std::sync::Arc;

    fn fp(i: u64) -> Fingerprint {
        fingerprint(KeyKind::Int, &i.to_le_bytes())
    }

    fn put(store: &Store, f: &Fingerprint, state: State, now: u64, fresh: &dyn Fn(State) -> bool) -> bool {
        let fresh = |_: &(), s: &Slot| fresh(s.state);
        let mut g = store.lock(f);
        if let Some(s) = g.slot(f) {
            s.state = state;
            s.seen = second_of(now);
            return true;
        }
        if !g.reserve(now, &fresh) {
            return false;
        }
        g.insert_reserved(f, state, now);
        true
    }

    #[test]
    fn slot_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn insert_find_remove() {
        let store = Store::new(3600 * NANOS, None, || ());
        let never = |_: State| false;
        assert!(put(&store, &fp(1), 42, 0, &never));
        assert!(put(&store, &fp(2), 43, 0, &never));
        assert_eq!(store.len(), 2);
        assert_eq!(store.lock(&fp(1)).state(&fp(1)), 42);
        assert_eq!(store.lock(&fp(3)).state(&fp(3)), 0);
        assert!(store.remove(&fp(1)));
        assert!(!store.remove(&fp(1)));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn sweep_evicts_only_idle_fresh_keys() {
        let store = Store::new(10 * NANOS, None, || ());
        let fresh = |s: State| s < 100;
        for i in 0..1000 {
            put(&store, &fp(i), if i % 2 == 0 { 1 } else { 500 }, 0, &fresh);
        }
        assert_eq!(store.sweep(10 * NANOS, &|_, s| fresh(s.state)), 0, "idle for exactly ttl is kept");
        assert_eq!(store.sweep(11 * NANOS, &|_, s| fresh(s.state)), 500);
        assert_eq!(store.len(), 500);
        assert_eq!(store.lock(&fp(1)).state(&fp(1)), 500);
        assert_eq!(store.lock(&fp(0)).state(&fp(0)), 0);
    }

    #[test]
    fn inserts_sweep_their_shard_when_due() {
        let store = Store::new(4 * NANOS, None, || ());
        let fresh = |_: State| true;
        for i in 0..10_000 {
            put(&store, &fp(i), 1, 0, &fresh);
        }
        // Much later, new keys sweep the shards they land in.
        for i in 10_000..12_000 {
            put(&store, &fp(i), 1, 100 * NANOS, &fresh);
        }
        assert!(store.len() < 3_000, "{}", store.len());
    }

    #[test]
    fn max_keys_refuses_new_keys_but_keeps_tracked_ones() {
        let store = Store::new(3600 * NANOS, Some(100), || ());
        let fresh = |s: State| s == 7;
        for i in 0..100 {
            assert!(put(&store, &fp(i), 1, 0, &fresh));
        }
        assert!(!put(&store, &fp(1000), 1, 0, &fresh));
        assert_eq!(store.len(), 100);
        // Existing keys are still updated.
        assert!(put(&store, &fp(5), 2, 0, &fresh));
        // Keys back at their fresh state are reclaimed to make room.
        for i in 0..100 {
            put(&store, &fp(i), 7, 0, &fresh);
        }
        let mut admitted = 0;
        for i in 1000..1100 {
            if put(&store, &fp(i), 1, 10 * NANOS + i * RECLAIM_INTERVAL_NS, &fresh) {
                admitted += 1;
            }
        }
        assert!(admitted > 0);
        assert!(store.len() <= 100);
    }

    #[test]
    fn threads_share_the_store() {
        let store = Arc::new(Store::<()>::new(3600 * NANOS, None, || ()));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let f = fp(i);
                        let mut g = store.lock(&f);
                        match g.slot(&f) {
                            Some(s) => s.state += 1,
                            None => {
                                assert!(g.reserve(0, &|_, _| false));
                                g.insert_reserved(&f, 1, 0);
                            }
                        }
                        drop(g);
                        let _ = t;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.len(), 10_000);
        for i in 0..10_000u64 {
            assert_eq!(store.lock(&fp(i)).state(&fp(i)), 4);
        }
    }
}
