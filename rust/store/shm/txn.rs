//! Several keys of a shared-memory store changed as one: all of them or none.
//!
//! A single key needs no lock (its slot is one compare-and-swap), but a check that
//! charges several keys at once (the levels of a [`crate::hierarchy`] path) must see
//! them all unchanged between its reads and its writes, and must never leave half of
//! its writes behind. Both come from two things kept in the header's spare space
//! (zeros in a store made by an older build, so the layout version stays 2):
//!
//! - a POSIX robust, process-shared mutex. Every multi-key check of the store holds it
//!   from its reads to its last write. When a process dies holding it, the kernel hands
//!   it to the next process that asks, telling it the owner died (`EOWNERDEAD`): nothing
//!   stays locked.
//! - a redo journal: before its first write, a check records every write it is about to
//!   make (key and new state), then makes them, then clears the record. The process
//!   that inherits the mutex of a dead owner replays a record it finds (each write sets
//!   an absolute state, so replaying twice is harmless): a check killed at any
//!   instruction is either not applied at all or applied in full.
//!
//! Only checks made under the mutex write the keys they cover (their fingerprints are
//! salted apart from every single-key limiter's); the lock-free side of the store may
//! still free one of those slots when it has been idle past the ttl, which only ever
//! happens to a key back at its fresh state, and a write then claims a slot again.

use super::{decode, encode, mask_of, pack_fp, stamp, ShmTable, FP_MASK, HEADER, TOMB};
use crate::algorithms::State;
use crate::error::{Error, Result};
use crate::key::Fingerprint;
use portable_atomic::AtomicU128;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the transaction area starts in the header (after the header fields, well clear
/// of them).
const AREA: usize = 1024;
/// Says the area was set up (the mutex initialised) by a build that knows it.
const MARKER: u64 = u64::from_le_bytes(*b"NXTXN001");
/// The longest a transaction waits for the store's lock. Holders keep it for
/// microseconds; one that died hands it over at once (EOWNERDEAD).
pub const LOCK_WAIT_S: i64 = 5;

/// `seconds` from now on CLOCK_REALTIME, the clock `pthread_mutex_timedlock` measures.
fn deadline(seconds: i64) -> libc::timespec {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    libc::timespec { tv_sec: now.tv_sec.saturating_add(seconds), tv_nsec: now.tv_nsec }
}
const MUTEX_AT: usize = AREA + 64;
const COUNT_AT: usize = AREA + 128;
const ENTRIES_AT: usize = AREA + 144;
/// The most writes one transaction makes.
pub const MAX_WRITES: usize = 64;
const ENTRY: usize = 32;
/// Set in a journal entry's key word when the write removes the key.
const REMOVE: u128 = 1 << 100;
/// Set in a journal entry's key word when the write pins the key.
const PIN: u128 = 1 << 101;
/// The last-seen second of a pinned key: never idle, so never swept nor claimed by
/// another key (see [`Write::Pin`]).
const PINNED: u32 = u32::MAX;

const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= COUNT_AT - MUTEX_AT);
const _: () = assert!(ENTRIES_AT + MAX_WRITES * ENTRY <= HEADER);
const _: () = assert!(ENTRIES_AT % 16 == 0 && MUTEX_AT % 16 == 0);

/// One write of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The key's new state.
    Set(Fingerprint, State),
    /// The key's new state, kept until removed: a pinned key is never idle, so neither
    /// sweeps nor other keys take its slot (for settings, such as a node's own quota,
    /// that must outlive the store's ttl). Its state must not be 0.
    Pin(Fingerprint, State),
    /// The key forgotten.
    Remove(Fingerprint),
}

impl Write {
    fn parts(&self) -> (u128, Op) {
        match *self {
            Write::Set(fp, s) => (pack_fp(&fp), Op::Set(s)),
            Write::Pin(fp, s) => (pack_fp(&fp), Op::Pin(s)),
            Write::Remove(fp) => (pack_fp(&fp), Op::Remove),
        }
    }
}

/// What [`ShmTable::apply`] does to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Set(State),
    Pin(State),
    Remove,
}

impl Op {
    fn flags(self) -> u128 {
        match self {
            Op::Set(_) => 0,
            Op::Pin(_) => PIN,
            Op::Remove => REMOVE,
        }
    }

    fn state(self) -> State {
        match self {
            Op::Set(s) | Op::Pin(s) => s,
            Op::Remove => 0,
        }
    }

    fn from_journal(key: u128, state: State) -> Op {
        if key & REMOVE != 0 {
            Op::Remove
        } else if key & PIN != 0 {
            Op::Pin(state)
        } else {
            Op::Set(state)
        }
    }
}

impl ShmTable {
    fn at<T>(&self, offset: usize) -> *mut T {
        // SAFETY: every offset used is inside the header, which the mapping starts with.
        unsafe { self.base.add(offset) as *mut T }
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        self.at(MUTEX_AT)
    }

    fn journal_count(&self) -> &AtomicU64 {
        // SAFETY: 8-byte aligned, inside the header, only accessed atomically.
        unsafe { AtomicU64::from_ptr(self.at(COUNT_AT)) }
    }

    fn journal_entry(&self, i: usize) -> (&AtomicU128, &AtomicU128) {
        let p = self.at::<u128>(ENTRIES_AT + i * ENTRY);
        // SAFETY: 16-byte aligned words inside the header, only accessed atomically.
        unsafe { (AtomicU128::from_ptr(p), AtomicU128::from_ptr(p.add(1))) }
    }

    /// Sets up the transaction area of a store being opened, under the `flock` of
    /// `open`: when the store is new or cleared (`reset`), or was made by a build that
    /// did not know the area.
    pub(super) fn prepare_transactions(&self, reset: bool) -> Result<()> {
        // SAFETY: 8-byte aligned, inside the header; no other process touches the marker
        // while `open` holds the flock.
        let marker = unsafe { &*(self.at::<AtomicU64>(AREA)) };
        if !reset && marker.load(SeqCst) == MARKER {
            return Ok(());
        }
        // SAFETY: the attribute is initialised before use and destroyed after; the mutex
        // lives in shared memory, as PTHREAD_PROCESS_SHARED requires, and nobody uses it
        // before the marker says it is ready.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut rc = libc::pthread_mutexattr_init(&mut attr);
            if rc == 0 {
                rc = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            }
            if rc == 0 {
                rc = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            }
            if rc == 0 {
                std::ptr::write_bytes(self.mutex() as *mut u8, 0, COUNT_AT - MUTEX_AT);
                rc = libc::pthread_mutex_init(self.mutex(), &attr);
            }
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(Error::InvalidArgument(format!(
                    "cannot set up the lock of the shared-memory store {}: {}",
                    self.path,
                    std::io::Error::from_raw_os_error(rc)
                )));
            }
        }
        self.journal_count().store(0, SeqCst);
        marker.store(MARKER, SeqCst);
        Ok(())
    }

    /// Locks the store for a multi-key check. A journal left by a holder that died (or
    /// panicked) before its last write is replayed first.
    pub fn transaction(&self) -> Result<Transaction<'_>> {
        // SAFETY: the mutex was initialised by `prepare_transactions` when the store was
        // opened, and stays mapped as long as `self`.
        // Uncontended, trylock takes it without reading the clock the bounded wait needs.
        let rc = match unsafe { libc::pthread_mutex_trylock(self.mutex()) } {
            // SAFETY: as above.
            libc::EBUSY => unsafe { libc::pthread_mutex_timedlock(self.mutex(), &deadline(LOCK_WAIT_S)) },
            rc => rc,
        };
        match rc {
            0 => {
                // A holder that panicked between its journal and its last write unlocked
                // normally (unwinding), its journal still set: finish its writes.
                if self.journal_count().load(SeqCst) != 0 {
                    self.replay();
                }
            }
            libc::EOWNERDEAD => {
                self.replay();
                // SAFETY: this thread holds the mutex (EOWNERDEAD hands it over).
                unsafe { libc::pthread_mutex_consistent(self.mutex()) };
            }
            libc::ETIMEDOUT => {
                // A live holder never keeps the lock for more than microseconds: this one
                // was stopped (SIGSTOP, a debugger) while holding it. Waiting on would
                // hang every process of the host; a dead holder is handled above.
                return Err(Error::Timeout(format!(
                    "cannot lock the shared-memory store {}: another process has held its lock for {LOCK_WAIT_S} s \
                     (stopped while holding it?); the lock frees when that process resumes or dies",
                    self.path
                )));
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cannot lock the shared-memory store {}: {}",
                    self.path,
                    std::io::Error::from_raw_os_error(rc)
                )))
            }
        }
        Ok(Transaction { table: self })
    }

    /// Applies the journal of a transaction cut short, then clears it.
    fn replay(&self) {
        let n = self.journal_count().load(SeqCst) as usize;
        let now_s = stamp(crate::clock::monotonic_ns());
        for i in 0..n.min(MAX_WRITES) {
            let (key, state) = self.journal_entry(i);
            let (key, state) = (key.load(SeqCst), state.load(SeqCst));
            self.apply(key & FP_MASK, Op::from_journal(key, state), now_s);
        }
        self.journal_count().store(0, SeqCst);
    }

    /// Sets the key's state (claiming a slot if it has none), pins it, or removes it. A
    /// key that finds no slot free (only possible when replaying into a full store) is
    /// left out.
    fn apply(&self, fp: u128, op: Op, now_s: u32) {
        let m = mask_of(fp);
        let seen = if let Op::Pin(_) = op { PINNED } else { now_s };
        loop {
            let Some(i) = self.find(fp) else {
                if op == Op::Remove || self.claim(fp, now_s).is_none() {
                    return;
                }
                continue;
            };
            let (key, word) = self.words(i);
            // The key is seen before its state changes, so an idle sweep does not free the
            // slot under the new state. A pinned key stays pinned until removed.
            let k = key.load(SeqCst);
            let was = super::seen_of(k);
            if k & FP_MASK == fp && was != seen && was != PINNED {
                let _ = key.compare_exchange(k, fp | (seen as u128) << 96, SeqCst, SeqCst);
            }
            let raw = word.load(SeqCst);
            if raw == TOMB {
                continue;
            }
            let new = match op {
                Op::Set(s) | Op::Pin(s) => encode(s, m),
                Op::Remove => TOMB,
            };
            if word.compare_exchange(raw, new, SeqCst, SeqCst).is_ok() {
                if op == Op::Remove && was == PINNED {
                    // Unpinned, so the slot can be reused once free.
                    let _ =
                        key.compare_exchange(k | (PINNED as u128) << 96, fp | (now_s as u128) << 96, SeqCst, SeqCst);
                }
                return;
            }
        }
    }
}

/// The store locked for a multi-key check (see the module's documentation); unlocked
/// when dropped.
pub struct Transaction<'a> {
    table: &'a ShmTable,
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex in `transaction`.
        unsafe { libc::pthread_mutex_unlock(self.table.mutex()) };
    }
}

impl Transaction<'_> {
    /// The key's state, or None when the store does not track it (a fresh key).
    pub fn read(&self, fp: &Fingerprint) -> Option<State> {
        let fp = pack_fp(fp);
        loop {
            let i = self.table.find(fp)?;
            let raw = self.table.words(i).1.load(SeqCst);
            if raw != TOMB {
                return Some(decode(raw, mask_of(fp)));
            }
        }
    }

    /// Makes every write, or none: false (nothing written) when a key to insert finds no
    /// room in the store. At most [`MAX_WRITES`].
    pub fn write(&mut self, writes: &[Write], now: u64) -> bool {
        assert!(writes.len() <= MAX_WRITES, "a transaction makes at most {MAX_WRITES} writes");
        let t = self.table;
        let now_s = stamp(now);
        // Room first: a slot for every new key before anything is written. A slot claimed
        // holds the fresh state, which changes no decision if the check stops here.
        let mut claimed = [0usize; MAX_WRITES];
        let mut n_claimed = 0;
        for write in writes {
            let (fp, op) = write.parts();
            if op != Op::Remove && t.find(fp).is_none() {
                match t.claim(fp, now_s) {
                    Some(i) => {
                        claimed[n_claimed] = i;
                        n_claimed += 1;
                    }
                    None => {
                        for &i in &claimed[..n_claimed] {
                            let _ = t.words(i).1.compare_exchange(0, TOMB, SeqCst, SeqCst);
                        }
                        return false;
                    }
                }
            }
        }
        for (i, write) in writes.iter().enumerate() {
            let (fp, op) = write.parts();
            let (key, word) = t.journal_entry(i);
            key.store(fp | op.flags(), SeqCst);
            word.store(op.state(), SeqCst);
        }
        t.journal_count().store(writes.len() as u64, Ordering::SeqCst);
        for write in writes {
            let (fp, op) = write.parts();
            t.apply(fp, op, now_s);
        }
        t.journal_count().store(0, Ordering::SeqCst);
        true
    }

    /// For tests: records `writes` in the journal as a check would, and stops there, as
    /// if the process died before making them.
    #[cfg(test)]
    pub fn journal_only(&mut self, writes: &[Write]) {
        for (i, write) in writes.iter().enumerate() {
            let (fp, op) = write.parts();
            let (key, word) = self.table.journal_entry(i);
            key.store(fp | op.flags(), SeqCst);
            word.store(op.state(), SeqCst);
        }
        self.table.journal_count().store(writes.len() as u64, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Location;
    use super::*;
    use crate::clock::NANOS;
    use crate::key::{fingerprint, KeyKind};
    use std::sync::Arc;

    fn path(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("nl-txn-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p.to_string_lossy().into_owned()
    }

    fn fp(i: u64) -> Fingerprint {
        fingerprint(KeyKind::Int, &i.to_le_bytes())
    }

    #[test]
    fn a_lock_held_past_its_bound_is_an_error_not_a_hang() {
        // The holder here is this thread (as a stopped process would be: alive, never
        // releasing); another thread asking for the lock gets a Timeout after
        // LOCK_WAIT_S, then the lock once it is released.
        let p = path("held");
        let table = ShmTable::open(Location::Path(&p), Some(32), Some(3600)).unwrap();
        let held = table.transaction().unwrap();
        let started = std::time::Instant::now();
        let waited = std::thread::scope(|s| s.spawn(|| table.transaction().map(|_| ())).join().unwrap());
        let err = waited.unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(err.to_string().contains("held its lock"), "{err}");
        assert!(started.elapsed().as_secs_f64() >= LOCK_WAIT_S as f64 - 0.1);
        drop(held);
        assert!(table.transaction().is_ok());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn writes_all_or_nothing_and_reads_back() {
        let p = path("rw");
        let table = ShmTable::open(Location::Path(&p), Some(32), Some(3600)).unwrap();
        let mut t = table.transaction().unwrap();
        assert_eq!(t.read(&fp(1)), None);
        assert!(t.write(&[Write::Set(fp(1), 5), Write::Set(fp(2), 7)], NANOS));
        assert_eq!((t.read(&fp(1)), t.read(&fp(2))), (Some(5), Some(7)));
        assert!(t.write(&[Write::Remove(fp(1)), Write::Set(fp(2), 8)], NANOS));
        assert_eq!((t.read(&fp(1)), t.read(&fp(2))), (None, Some(8)));
        drop(t);
        // A store of 32 slots has room for 32 keys: a write of two new keys when only one
        // slot is left writes neither.
        let mut t = table.transaction().unwrap();
        for i in 10..41 {
            assert!(t.write(&[Write::Set(fp(i), 1)], NANOS), "{i}");
        }
        assert_eq!(table.count(), 32);
        let before = table.count();
        assert!(!t.write(&[Write::Set(fp(2), 9), Write::Set(fp(100), 1), Write::Set(fp(101), 1)], NANOS));
        assert_eq!(t.read(&fp(2)), Some(8), "an existing key is not written either");
        assert_eq!(table.count(), before);
        drop(t);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_dead_owners_journal_is_replayed() {
        let p = path("dead");
        let table = ShmTable::open(Location::Path(&p), Some(64), Some(3600)).unwrap();
        assert!(table.transaction().unwrap().write(&[Write::Set(fp(1), 3)], NANOS));
        // A thread dies holding the lock, its writes journaled but not made: the robust
        // mutex goes to the next locker, which makes them.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut t = table.transaction().unwrap();
                t.journal_only(&[Write::Set(fp(1), 11), Write::Pin(fp(2), 12)]);
                std::mem::forget(t);
            });
        });
        let t = table.transaction().unwrap();
        assert_eq!((t.read(&fp(1)), t.read(&fp(2))), (Some(11), Some(12)), "replayed in full");
        assert_eq!(table.journal_count().load(SeqCst), 0);
        drop(t);
        drop(table);
        // Reopened, the area is kept (a store made by an older build is set up once).
        let again = ShmTable::open(Location::Path(&p), None, None).unwrap();
        assert_eq!(again.transaction().unwrap().read(&fp(2)), Some(12));
        assert_eq!(again.sweep(1_000_000 * NANOS), 1, "the pinned key outlives the ttl, the other does not");
        assert_eq!(again.transaction().unwrap().read(&fp(2)), Some(12));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_pinned_key_is_never_idle_until_removed() {
        let p = path("pin");
        let table = ShmTable::open(Location::Path(&p), Some(32), Some(1)).unwrap();
        let mut t = table.transaction().unwrap();
        assert!(t.write(&[Write::Pin(fp(1), 7), Write::Set(fp(2), 8)], NANOS));
        drop(t);
        // Much later, every slot of the store is claimed by new keys but the pinned one.
        let algo = crate::algorithms::Algorithm::FixedWindow(
            crate::algorithms::FixedWindow::new(crate::rate::Rate::parse("5/s").unwrap()).unwrap(),
        );
        let later = 100 * NANOS;
        let placed = (100..200).filter(|&i| table.check(&fp(i), &algo, later, 1, true).is_some()).count();
        assert_eq!(placed, 31);
        let mut t = table.transaction().unwrap();
        assert_eq!((t.read(&fp(1)), t.read(&fp(2))), (Some(7), None));
        assert!(t.write(&[Write::Pin(fp(1), 9)], later));
        assert_eq!(t.read(&fp(1)), Some(9));
        assert!(t.write(&[Write::Remove(fp(1))], later));
        assert_eq!(t.read(&fp(1)), None);
        drop(t);
        assert!(table.check(&fp(500), &algo, 200 * NANOS, 1, true).is_some(), "its slot is free again");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_journal_left_behind_by_a_panic_is_replayed() {
        let p = path("panic");
        let table = ShmTable::open(Location::Path(&p), Some(64), Some(3600)).unwrap();
        let mut t = table.transaction().unwrap();
        t.journal_only(&[Write::Set(fp(3), 33)]);
        drop(t); // unlocked normally, as unwinding does
        assert_eq!(table.transaction().unwrap().read(&fp(3)), Some(33));
        assert_eq!(table.journal_count().load(SeqCst), 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn threads_take_turns() {
        let p = path("turns");
        let table = Arc::new(ShmTable::open(Location::Path(&p), Some(64), Some(3600)).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let mut t = table.transaction().unwrap();
                        let (a, b) = (t.read(&fp(1)).unwrap_or(0), t.read(&fp(2)).unwrap_or(0));
                        assert!(t.write(&[Write::Set(fp(1), a + 1), Write::Set(fp(2), b + 2)], NANOS));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let t = table.transaction().unwrap();
        assert_eq!((t.read(&fp(1)), t.read(&fp(2))), (Some(8000), Some(16000)));
        drop(t);
        std::fs::remove_file(p).unwrap();
    }
}
