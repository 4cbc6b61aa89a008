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

use crate::algorithms::{State, FRESH};
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
    extra: E,
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

    fn try_reserve(&self) -> bool {
        if self.max_keys == usize::MAX {
            self.len.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.len.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_keys).then_some(n + 1)).is_ok()
    }
}

/// Room for one new key, counted in the store's size: given back when dropped unused.
/// Checks of several stores at once take room in each before writing to any, so a
/// check that finds one store full writes nothing.
pub struct Reservation<'a> {
    len: &'a AtomicUsize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.len.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where [`ShardGuard::upsert`] finds room for a key it has to insert.
pub enum Room<'a> {
    /// Look for room now: sweep the shard when its sweep is due, and when the store is
    /// full reclaim keys back at their fresh state first.
    Find,
    /// Look for room like `Find`, and take it even past `max_keys` when there is none:
    /// for a charge that must not be lost.
    Force,
    /// Room taken beforehand with [`ShardGuard::reserve`].
    Reserved(Reservation<'a>),
}

/// What [`ShardGuard::upsert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upserted {
    /// Nothing to write.
    Unchanged,
    Updated,
    Inserted,
    /// A new key to write, and no room for it: nothing was written.
    NoRoom,
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

impl<'a, E> ShardGuard<'a, E> {
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

    /// The key's state, if tracked.
    #[inline]
    pub fn lookup(&self, fp: &Fingerprint) -> Option<State> {
        self.shard.table.find(fp.table_hash(), matches(fp)).map(|s| s.state)
    }

    /// Takes room for one new key (see [`Room::Find`]); None when there is none.
    pub fn reserve(&mut self, now: u64, fresh: Fresh<'_, E>) -> Option<Reservation<'a>> {
        if second_of(now) >= self.shard.next_sweep {
            self.sweep(now, fresh, false);
        }
        if self.store.try_reserve() || (self.reclaim(now, fresh) > 0 && self.store.try_reserve()) {
            return Some(Reservation { len: &self.store.len });
        }
        None
    }

    /// How a check writes a key: `step` gets the shard's `extra`, the key's state (fresh
    /// when untracked) and whether it is tracked, and returns the state to keep (None:
    /// leave the key as it is) with an answer for the caller. A tracked key is updated in
    /// place; a new key is inserted if `room` has room for it. (Quota changes convert
    /// tracked states in place with `slot_and_extra` and `update_all`: they insert none.)
    #[inline(always)]
    pub fn upsert<T>(
        &mut self,
        fp: &Fingerprint,
        now: u64,
        fresh: Fresh<'_, E>,
        room: Room<'_>,
        step: impl FnOnce(&E, State, bool) -> (Option<State>, T),
    ) -> (T, Upserted) {
        let shard = &mut *self.shard;
        let slot = shard.table.find_mut(fp.table_hash(), matches(fp));
        let (state, tracked) = slot.as_ref().map_or((FRESH, false), |s| (s.state, true));
        // One call of `step`, so that it is inlined here.
        let (next, out) = step(&shard.extra, state, tracked);
        let state = match (slot, next) {
            (_, None) => return (out, Upserted::Unchanged),
            (Some(slot), Some(state)) => {
                slot.state = state;
                slot.seen = second_of(now);
                return (out, Upserted::Updated);
            }
            (None, Some(state)) => state,
        };
        let reservation = match room {
            Room::Reserved(r) => r,
            Room::Force => self.reserve(now, fresh).unwrap_or_else(|| {
                self.store.len.fetch_add(1, Ordering::Relaxed);
                Reservation { len: &self.store.len }
            }),
            Room::Find => match self.reserve(now, fresh) {
                Some(r) => r,
                None => return (out, Upserted::NoRoom),
            },
        };
        // The room is used: the key now counts in the store's size.
        std::mem::forget(reservation);
        let slot = Slot { state, fp: fp.0, seen: second_of(now) };
        self.shard.table.insert_unique(fp.table_hash(), slot, slot_hash);
        (out, Upserted::Inserted)
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
        let (_, done) = store.lock(f).upsert(f, now, &fresh, Room::Find, |_, _, _| (Some(state), ()));
        done != Upserted::NoRoom
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
        assert_eq!(store.lock(&fp(1)).lookup(&fp(1)), Some(42));
        assert_eq!(store.lock(&fp(3)).lookup(&fp(3)), None);
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
        assert_eq!(store.lock(&fp(1)).lookup(&fp(1)), Some(500));
        assert_eq!(store.lock(&fp(0)).lookup(&fp(0)), None);
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
    fn room_is_found_forced_or_reserved_and_given_back() {
        let store = Store::new(3600 * NANOS, Some(2), || ());
        let never = |_: &(), _: &Slot| false;
        let keep = |s: State| move |_: &(), _: State, _: bool| (Some(s), ());
        let (a, b, c) = (fp(1), fp(2), fp(3));
        let reserved = store.lock(&a).reserve(0, &never).unwrap();
        assert_eq!(store.len(), 1, "reserved room counts");
        drop(reserved);
        assert_eq!(store.len(), 0, "given back when dropped unused");
        let r = store.lock(&a).reserve(0, &never).unwrap();
        assert_eq!(store.lock(&a).upsert(&a, 0, &never, Room::Reserved(r), keep(5)).1, Upserted::Inserted);
        assert_eq!(store.len(), 1, "used room stays counted");
        assert_eq!(store.lock(&b).upsert(&b, 0, &never, Room::Find, keep(6)).1, Upserted::Inserted);
        assert_eq!(store.lock(&c).upsert(&c, 0, &never, Room::Find, keep(7)).1, Upserted::NoRoom);
        assert!(store.lock(&c).reserve(0, &never).is_none());
        assert_eq!(store.lock(&c).upsert(&c, 0, &never, Room::Force, keep(7)).1, Upserted::Inserted);
        assert_eq!((store.len(), store.lock(&c).lookup(&c)), (3, Some(7)), "forced past max_keys");
        let tracked = |_: &(), s: State, tracked: bool| (tracked.then_some(s + 1), tracked);
        assert_eq!(store.lock(&a).upsert(&a, 0, &never, Room::Find, tracked), (true, Upserted::Updated));
        assert_eq!(store.lock(&a).lookup(&a), Some(6));
        let untracked = fp(4);
        assert_eq!(
            store.lock(&untracked).upsert(&untracked, 0, &never, Room::Force, tracked),
            (false, Upserted::Unchanged)
        );
    }

    #[test]
    fn threads_share_the_store() {
        let store = Arc::new(Store::<()>::new(3600 * NANOS, None, || ()));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let f = fp(i);
                        let never = |_: &(), _: &Slot| false;
                        let step = |_: &(), state: State, _| (Some(state + 1), ());
                        let (_, done) = store.lock(&f).upsert(&f, 0, &never, Room::Find, step);
                        assert_ne!(done, Upserted::NoRoom);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.len(), 10_000);
        for i in 0..10_000u64 {
            assert_eq!(store.lock(&fp(i)).lookup(&fp(i)), Some(4));
        }
    }
}
