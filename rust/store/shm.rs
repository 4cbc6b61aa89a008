//! A store in shared memory for the processes of one host.
//!
//! The table is a memory-mapped file (POSIX shared memory, or any path): a 4 KiB
//! header, then `capacity` slots of 32 bytes, each two 16-byte words updated only with
//! 16-byte compare-and-swap (`cmpxchg16b`). No lock is ever taken on a check, so a
//! process killed at any instruction can leave nothing locked and no slot half-written.
//!
//! - Word `key`: the key's 96-bit fingerprint and the second it was last charged (+1).
//!   0 means the slot was never used. Once used, a slot's key word never goes back to
//!   0, so probe chains never break.
//! - Word `state`: the algorithm's state (the same `u128` the in-process store keeps),
//!   stored XOR a mask derived from the fingerprint. A slot whose key changed cannot
//!   be mistaken for the old key's slot by a compare-and-swap in flight (its stored
//!   word differs with probability 1 - 2^-128). `TOMB` marks a slot free to claim:
//!   its key was idle past the store's ttl (so fresh for every limiter), reset, or a
//!   duplicate merged away. Raw 0 is a fresh state.
//!
//! A key lives in the first slot of its probe window (`PROBE` slots from its hash)
//! whose key word matches and whose state is not `TOMB`. A new key claims the first
//! slot of its window that is unused, `TOMB`, or idle past the ttl. Two processes that
//! insert the same new key at the same time may claim two slots; each claimer looks
//! for another live slot of its key afterwards and merges the later one into the
//! earlier (adding the usage), so every charge is kept. When no slot of the window can
//! be claimed the store is full for that key: its call is denied.
//!
//! The clock is `CLOCK_MONOTONIC`, shared by every process of a host. It restarts at
//! boot, so the header keeps the boot id and a store opened after a reboot is cleared.
//! Windows start on Unix-time boundaries: the header keeps the epoch offset measured
//! when the store was created (or cleared after a reboot), and every process reads
//! windows with that one offset, so they all agree on every boundary, whatever each
//! process measured for itself.

use crate::algorithms::{Algorithm, Decision, State};
use crate::clock::NANOS;
use crate::error::{Error, Result};
use crate::key::Fingerprint;
use portable_atomic::AtomicU128;
use std::ffi::CString;
use std::sync::atomic::Ordering::SeqCst;

mod leases;
mod txn;
pub use leases::{Held, SharedLeases, MAX_SHARED_LEASES};
pub use txn::{Transaction, Write, MAX_WRITES};

pub const MAGIC: [u8; 8] = *b"NXLIMSHM";
/// 2: the header keeps the epoch offset, and windows start on Unix-time boundaries.
pub const VERSION: u32 = 2;
pub const HEADER: usize = 4096;
pub const SLOT: usize = 32;
/// Slots a key may live in, from its hash on.
pub const PROBE: usize = 32;
/// The state word of a slot free to claim.
pub const TOMB: u128 = u128::MAX;
/// The largest capacity accepted (2^32 slots: 128 GiB).
pub const MAX_CAPACITY: u64 = 1 << 32;

/// The header at the start of the file. Written once at creation, under `flock`.
#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u32,
    slot_size: u32,
    capacity: u64,
    k0: u64,
    k1: u64,
    ttl_secs: u64,
    boot_id: [u8; 16],
    /// Unix time minus `CLOCK_MONOTONIC`, in ns, measured at creation.
    epoch_offset: u64,
}

/// A mapped table.
pub struct ShmTable {
    base: *mut u8,
    len: usize,
    capacity: usize,
    pub k0: u64,
    pub k1: u64,
    pub ttl_secs: u64,
    /// Unix time minus `CLOCK_MONOTONIC` (ns), the same for every process of the store.
    pub epoch_offset: u64,
    pub path: String,
}

// SAFETY: the mapping lives as long as the table, and every access to the slots goes
// through atomics; the header is read-only after open.
unsafe impl Send for ShmTable {}
unsafe impl Sync for ShmTable {}

impl Drop for ShmTable {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

fn os_error(what: &str, path: &str) -> Error {
    Error::InvalidArgument(format!("{what} {path}: {}", std::io::Error::last_os_error()))
}

fn boot_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: String = text.trim().chars().filter(|c| c.is_ascii_hexdigit()).collect();
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
        }
    }
    out
}

/// Where a store lives: a POSIX shared memory name or a file path.
pub enum Location<'a> {
    Name(&'a str),
    Path(&'a str),
}

/// Releases an `flock` and closes the descriptor when dropped.
struct Locked(libc::c_int);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by `open` and is closed once, here.
        unsafe {
            libc::flock(self.0, libc::LOCK_UN);
            libc::close(self.0);
        }
    }
}

impl ShmTable {
    /// Opens (creating it with mode 0600 if needed) the store at `location`.
    /// `capacity`: slots wanted (rounded up to a power of two); `None` accepts an
    /// existing store's. `ttl_secs` (default 3600) is recorded at creation; `None` accepts
    /// an existing store's, another value is an error.
    pub fn open(location: Location<'_>, capacity: Option<u64>, ttl: Option<u64>) -> Result<ShmTable> {
        let ttl_secs = ttl.unwrap_or(3600);
        let asked = capacity;
        if let Some(c) = capacity {
            if c == 0 || c > MAX_CAPACITY {
                return Err(Error::InvalidArgument(format!("capacity must be from 1 to {MAX_CAPACITY}, got {c}")));
            }
        }
        if !AtomicU128::is_lock_free() {
            return Err(Error::InvalidArgument(
                "this CPU has no 16-byte compare-and-swap (cmpxchg16b): a shared-memory store cannot work here".into(),
            ));
        }
        let (fd, path) = match location {
            Location::Name(name) => {
                let shm_name = format!("/nexus-limits.{name}");
                let c = CString::new(shm_name.clone()).map_err(|_| Error::InvalidArgument("name has a NUL".into()))?;
                // SAFETY: a valid C string; the flags and mode are plain integers.
                let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o600) };
                (fd, format!("/dev/shm{shm_name}"))
            }
            Location::Path(p) => {
                let c = CString::new(p).map_err(|_| Error::InvalidArgument("path has a NUL".into()))?;
                // SAFETY: as above.
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o600) };
                (fd, p.to_string())
            }
        };
        if fd < 0 {
            return Err(os_error("cannot open the shared-memory store", &path));
        }
        // Only one process creates or checks the header at a time. The kernel drops the
        // lock if that process dies, so nothing stays locked.
        // SAFETY: `fd` is open.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            let err = os_error("cannot lock", &path);
            // SAFETY: `fd` is open.
            unsafe { libc::close(fd) };
            return Err(err);
        }
        let locked = Locked(fd);
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` writable.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(os_error("cannot stat", &path));
        }
        let size = st.st_size as u64;
        let fresh = size == 0;
        let capacity = if fresh {
            let c = capacity.unwrap_or(1_000_000).next_power_of_two().max(PROBE as u64);
            let len = HEADER as u64 + c * SLOT as u64;
            // SAFETY: `fd` is open for writing.
            if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                return Err(os_error("cannot size", &path));
            }
            c
        } else {
            if size < HEADER as u64 {
                return Err(Error::InvalidArgument(format!(
                    "{path} is not a nexus-limits shared-memory store ({size} bytes, shorter than its header)"
                )));
            }
            (size - HEADER as u64) / SLOT as u64
        };
        let len = HEADER + capacity as usize * SLOT;
        // SAFETY: mapping `len` bytes of a file at least that long, shared and writable.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(os_error("cannot map", &path));
        }
        let mut table = ShmTable {
            base: base as *mut u8,
            len,
            capacity: capacity as usize,
            k0: 0,
            k1: 0,
            ttl_secs,
            epoch_offset: 0,
            path,
        };
        // SAFETY: the mapping starts with HEADER bytes, page-aligned, and only this
        // process touches the header while it holds the lock.
        let header = unsafe { &mut *(table.base as *mut Header) };
        let unfinished = header.magic == [0; 8] && capacity.is_power_of_two() && size == len as u64;
        let mut cleared = fresh || unfinished;
        if fresh || unfinished {
            // New, or a creator died before finishing: (re)initialise under the lock.
            let mut keys = [0u8; 16];
            getrandom::fill(&mut keys).map_err(|e| Error::InvalidArgument(format!("no randomness: {e}")))?;
            header.version = VERSION;
            header.slot_size = SLOT as u32;
            header.capacity = capacity;
            header.k0 = u64::from_le_bytes(keys[..8].try_into().unwrap());
            header.k1 = u64::from_le_bytes(keys[8..].try_into().unwrap());
            header.ttl_secs = ttl_secs;
            header.boot_id = boot_id();
            header.epoch_offset = crate::clock::measure_epoch_offset();
            table.clear_slots();
            std::sync::atomic::fence(SeqCst);
            header.magic = MAGIC;
        } else {
            if header.magic != MAGIC {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a nexus-limits shared-memory store",
                    table.path
                )));
            }
            if header.version != VERSION || header.slot_size != SLOT as u32 {
                return Err(Error::InvalidArgument(format!(
                    "{} has layout version {} (slots of {} bytes); this nexus-limits reads version {VERSION} \
                     (slots of {SLOT} bytes): remove it or open it with the matching version",
                    table.path, header.version, header.slot_size
                )));
            }
            if header.capacity != capacity || size != len as u64 {
                return Err(Error::InvalidArgument(format!(
                    "{} is damaged: its header says {} slots but the file holds {capacity}",
                    table.path, header.capacity
                )));
            }
            if let Some(c) = asked {
                let want = c.next_power_of_two().max(PROBE as u64);
                if want != header.capacity {
                    return Err(Error::InvalidArgument(format!(
                        "{} exists with capacity {}; open it with that capacity (or none), or remove it to \
                         make one of {want}",
                        table.path, header.capacity
                    )));
                }
            }
            if let Some(t) = ttl {
                if t != header.ttl_secs {
                    return Err(Error::InvalidArgument(format!(
                        "{} exists with ttl {} s; open it with that ttl (or none), or remove it to make one \
                         with ttl {t} s",
                        table.path, header.ttl_secs
                    )));
                }
            }
            if header.boot_id != boot_id() {
                // States are times on the monotonic clock, which restarted at boot.
                table.clear_slots();
                header.boot_id = boot_id();
                header.epoch_offset = crate::clock::measure_epoch_offset();
                cleared = true;
            }
            table.ttl_secs = header.ttl_secs;
        }
        // The lock of multi-key checks: set up when the slots are (a lock held before a
        // reboot belongs to nobody now), or once in a store made by an older build.
        table.prepare_transactions(cleared)?;
        table.k0 = header.k0;
        table.k1 = header.k1;
        table.epoch_offset = header.epoch_offset;
        drop(locked);
        Ok(table)
    }

    fn clear_slots(&self) {
        // SAFETY: the slots follow the header inside the mapping.
        unsafe { std::ptr::write_bytes(self.base.add(HEADER), 0, self.capacity * SLOT) };
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[inline]
    fn words(&self, i: usize) -> (&AtomicU128, &AtomicU128) {
        // SAFETY: `i < capacity`; each slot is 32 bytes, 16-byte aligned (the mapping is
        // page-aligned and HEADER a multiple of 16), and only accessed atomically.
        unsafe {
            let p = self.base.add(HEADER + i * SLOT) as *mut u128;
            (AtomicU128::from_ptr(p), AtomicU128::from_ptr(p.add(1)))
        }
    }

    /// Slots holding a live key now.
    pub fn count(&self) -> usize {
        (0..self.capacity)
            .filter(|&i| {
                let (key, state) = self.words(i);
                key.load(SeqCst) != 0 && state.load(SeqCst) != TOMB
            })
            .count()
    }

    /// Frees every slot idle for longer than the ttl; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        let now_s = stamp(now);
        let mut freed = 0;
        for i in 0..self.capacity {
            let (key, state) = self.words(i);
            let k = key.load(SeqCst);
            if k != 0 && self.idle(k, now_s) {
                let s = state.load(SeqCst);
                if s != TOMB && state.compare_exchange(s, TOMB, SeqCst, SeqCst).is_ok() {
                    freed += 1;
                }
            }
        }
        freed
    }

    #[inline]
    fn idle(&self, key: u128, now_s: u32) -> bool {
        (now_s as u64).saturating_sub(seen_of(key) as u64) > self.ttl_secs
    }

    /// The first live slot of the key (fingerprint `fp`), if any.
    #[inline]
    fn find(&self, fp: u128) -> Option<usize> {
        let mask = self.capacity - 1;
        let mut i = home(fp, mask);
        for _ in 0..PROBE {
            let (key, state) = self.words(i);
            let k = key.load(SeqCst);
            if k == 0 {
                return None;
            }
            if k & FP_MASK == fp && state.load(SeqCst) != TOMB {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Claims a slot for a new key: the first of its window that is unused, free
    /// (`TOMB`) or idle past the ttl. None when the window has none: the store is full
    /// for this key.
    fn claim(&self, fp: u128, now_s: u32) -> Option<usize> {
        let mask = self.capacity - 1;
        let mut i = home(fp, mask);
        let mine = fp | (now_s as u128) << 96;
        for _ in 0..PROBE {
            let (key, state) = self.words(i);
            let k = key.load(SeqCst);
            if k == 0 {
                match key.compare_exchange(0, mine, SeqCst, SeqCst) {
                    Ok(_) => return Some(i),
                    Err(now_k) if now_k & FP_MASK == fp => return Some(i),
                    Err(_) => {}
                }
            } else if k & FP_MASK == fp && state.load(SeqCst) != TOMB {
                return Some(i); // someone else inserted it meanwhile
            } else {
                let s = state.load(SeqCst);
                let free =
                    s == TOMB || (self.idle(k, now_s) && state.compare_exchange(s, TOMB, SeqCst, SeqCst).is_ok());
                if free && key.compare_exchange(k, mine, SeqCst, SeqCst).is_ok() {
                    // Only the claimer of the key word turns its TOMB back into fresh.
                    let _ = state.compare_exchange(TOMB, 0, SeqCst, SeqCst);
                    return Some(i);
                }
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// After claiming slot `at` for `fp`: merges any other live slot of the same key
    /// into the earliest one, so two processes inserting the key at once lose nothing.
    fn dedupe(&self, fp: u128, algo: &Algorithm, now: u64) {
        let mask = self.capacity - 1;
        let mut i = home(fp, mask);
        let mut first: Option<usize> = None;
        for _ in 0..PROBE {
            let (key, state) = self.words(i);
            let k = key.load(SeqCst);
            if k == 0 {
                return;
            }
            if k & FP_MASK == fp {
                match first {
                    None => {
                        if state.load(SeqCst) != TOMB {
                            first = Some(i);
                        }
                    }
                    Some(f) => self.merge_into(f, i, fp, algo, now),
                }
            }
            i = (i + 1) & mask;
        }
    }

    fn merge_into(&self, into: usize, from: usize, fp: u128, algo: &Algorithm, now: u64) {
        let m = mask_of(fp);
        let (_, from_state) = self.words(from);
        let taken = loop {
            let s = from_state.load(SeqCst);
            if s == TOMB {
                return;
            }
            if from_state.compare_exchange(s, TOMB, SeqCst, SeqCst).is_ok() {
                break decode(s, m);
            }
        };
        let (_, into_state) = self.words(into);
        loop {
            let s = into_state.load(SeqCst);
            if s == TOMB {
                return; // the earlier slot went too: nothing left to merge into
            }
            let merged = encode(algo.merge(decode(s, m), taken, now), m);
            if into_state.compare_exchange(s, merged, SeqCst, SeqCst).is_ok() {
                return;
            }
        }
    }

    /// Decides and, if admitted, charges `cost` for the key `fp` (already salted with
    /// the limiter's id). `None` when a new key finds no room (the store is full).
    #[inline]
    pub fn check(&self, fp: &Fingerprint, algo: &Algorithm, now: u64, cost: u64, charge: bool) -> Option<Decision> {
        let fp = pack_fp(fp);
        let m = mask_of(fp);
        let now_s = stamp(now);
        loop {
            match self.find(fp) {
                Some(i) => {
                    let (key, state) = self.words(i);
                    let raw = state.load(SeqCst);
                    if raw == TOMB {
                        continue;
                    }
                    let (next, d) = algo.step(decode(raw, m), now, cost);
                    if !d.allowed || !charge {
                        return Some(d);
                    }
                    if state.compare_exchange(raw, encode(next, m), SeqCst, SeqCst).is_ok() {
                        let k = key.load(SeqCst);
                        if k & FP_MASK == fp && seen_of(k) != now_s {
                            let _ = key.compare_exchange(k, fp | (now_s as u128) << 96, SeqCst, SeqCst);
                        }
                        return Some(d);
                    }
                }
                None => {
                    let (_, d) = algo.step(0, now, cost);
                    if !d.allowed || !charge {
                        return Some(d);
                    }
                    self.claim(fp, now_s)?;
                    self.dedupe(fp, algo, now);
                }
            }
        }
    }

    /// [`check`](Self::check) deciding with `step` (the key's state to its next state and
    /// decision) instead of `algo`'s own step of one cost (a priority class's floor);
    /// `algo` still merges duplicates. The same loop as `check`, which keeps its own
    /// copy: the hot path measured about 10 ns slower going through this generic one.
    #[inline]
    pub fn check_by(
        &self,
        fp: &Fingerprint,
        algo: &Algorithm,
        now: u64,
        charge: bool,
        step: impl Fn(State) -> (State, Decision),
    ) -> Option<Decision> {
        let fp = pack_fp(fp);
        let m = mask_of(fp);
        let now_s = stamp(now);
        loop {
            match self.find(fp) {
                Some(i) => {
                    let (key, state) = self.words(i);
                    let raw = state.load(SeqCst);
                    if raw == TOMB {
                        continue;
                    }
                    let (next, d) = step(decode(raw, m));
                    if !d.allowed || !charge {
                        return Some(d);
                    }
                    if state.compare_exchange(raw, encode(next, m), SeqCst, SeqCst).is_ok() {
                        let k = key.load(SeqCst);
                        if k & FP_MASK == fp && seen_of(k) != now_s {
                            let _ = key.compare_exchange(k, fp | (now_s as u128) << 96, SeqCst, SeqCst);
                        }
                        return Some(d);
                    }
                }
                None => {
                    let (_, d) = step(0);
                    if !d.allowed || !charge {
                        return Some(d);
                    }
                    self.claim(fp, now_s)?;
                    self.dedupe(fp, algo, now);
                }
            }
        }
    }

    /// Forgets a key (its slot becomes free).
    pub fn remove(&self, fp: &Fingerprint) -> bool {
        let fp = pack_fp(fp);
        while let Some(i) = self.find(fp) {
            let (_, state) = self.words(i);
            let s = state.load(SeqCst);
            if s != TOMB && state.compare_exchange(s, TOMB, SeqCst, SeqCst).is_ok() {
                return true;
            }
        }
        false
    }
}

const FP_MASK: u128 = (1 << 96) - 1;

/// The second of `now` plus one, so a used key word is never 0.
#[inline]
fn stamp(now: u64) -> u32 {
    ((now / NANOS).min(u32::MAX as u64 - 1) + 1) as u32
}

#[inline]
fn seen_of(key: u128) -> u32 {
    (key >> 96) as u32
}

#[inline]
fn pack_fp(fp: &Fingerprint) -> u128 {
    fp.0[0] as u128 | (fp.0[1] as u128) << 32 | (fp.0[2] as u128) << 64
}

#[inline]
fn home(fp: u128, mask: usize) -> usize {
    (fp as u64 as usize) & mask
}

/// A 128-bit mask from the fingerprint (splitmix64 of each half).
#[inline]
fn mask_of(fp: u128) -> u128 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let lo = mix(fp as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let hi = mix((fp >> 64) as u64 ^ lo);
    (hi as u128) << 64 | lo as u128
}

#[inline]
fn decode(raw: u128, mask: u128) -> State {
    if raw == 0 {
        0
    } else {
        raw ^ mask
    }
}

#[inline]
fn encode(state: State, mask: u128) -> u128 {
    if state == 0 {
        0
    } else {
        state ^ mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::{FixedWindow, Gcra};
    use crate::key::{fingerprint, KeyKind};
    use crate::rate::Rate;
    use std::sync::Arc;

    fn path(name: &str) -> String {
        let p = std::env::temp_dir().join(format!("nl-shm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p.to_string_lossy().into_owned()
    }

    fn fp(i: u64) -> Fingerprint {
        fingerprint(KeyKind::Int, &i.to_le_bytes())
    }

    fn bucket(rate: &str, burst: u64) -> Algorithm {
        Algorithm::TokenBucket(Gcra::new(Rate::parse(rate).unwrap(), burst).unwrap())
    }

    #[test]
    fn threads_admit_exactly_the_quota() {
        let p = path("threads");
        let table = Arc::new(ShmTable::open(Location::Path(&p), Some(4096), Some(3600)).unwrap());
        let algo = bucket("100/day", 100);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (table, algo) = (Arc::clone(&table), algo.clone());
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for i in 0..2000u64 {
                        let now = 1_000 * NANOS;
                        if table.check(&fp(i % 8), &algo, now, 1, true).unwrap().allowed {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 8 * 100);
        assert_eq!(table.count(), 8);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn new_keys_raced_by_threads_are_admitted_once() {
        let p = path("race");
        let table = Arc::new(ShmTable::open(Location::Path(&p), Some(1 << 16), Some(3600)).unwrap());
        let algo = bucket("1/day", 1);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (table, algo) = (Arc::clone(&table), algo.clone());
                std::thread::spawn(move || {
                    (0..5000u64).filter(|&i| table.check(&fp(i), &algo, NANOS, 1, true).unwrap().allowed).count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 5000, "every key admitted exactly once");
        assert_eq!(table.count(), 5000, "duplicates were merged away");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn merge_keeps_both_charges() {
        let p = path("merge");
        let table = ShmTable::open(Location::Path(&p), Some(64), Some(3600)).unwrap();
        let algo = Algorithm::FixedWindow(FixedWindow::new(Rate::parse("10/minute").unwrap()).unwrap());
        let f = pack_fp(&fp(1));
        let mask = table.capacity - 1;
        let h = home(f, mask);
        // Two slots of one key, as two racing inserters would leave them.
        for (i, used) in [(h, 3u64), ((h + 1) & mask, 4u64)] {
            let (key, state) = table.words(i);
            key.store(f | 1u128 << 96, SeqCst);
            state.store(encode(used as u128, mask_of(f)), SeqCst); // window 0, `used` units
        }
        table.dedupe(f, &algo, 0);
        assert_eq!(table.count(), 1);
        let d = table.check(&fp(1), &algo, 0, 0, false).unwrap();
        assert_eq!(d.remaining, 3, "3 + 4 used of 10");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn full_window_denies_new_keys_until_idle_slots_expire() {
        let p = path("full");
        let table = ShmTable::open(Location::Path(&p), Some(32), Some(2)).unwrap();
        let algo = bucket("10/s", 10);
        let admitted = (0..200u64).filter(|&i| table.check(&fp(i), &algo, NANOS, 1, true).is_some()).count();
        assert_eq!(admitted, 32, "32 slots");
        assert!(table.check(&fp(0), &algo, NANOS, 1, true).unwrap().allowed, "tracked keys keep working");
        // 3 s later every key is idle past the 2 s ttl: its slot goes to a new key.
        assert!(table.check(&fp(1000), &algo, 4 * NANOS, 1, true).is_some());
        assert_eq!(table.sweep(10 * NANOS), 32);
        assert_eq!(table.count(), 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn reopening_checks_the_header() {
        let p = path("header");
        {
            let table = ShmTable::open(Location::Path(&p), Some(100), Some(60)).unwrap();
            assert_eq!(table.capacity(), 128);
            assert!(table.check(&fp(1), &bucket("1/minute", 1), NANOS, 1, true).unwrap().allowed);
        }
        assert!(ShmTable::open(Location::Path(&p), None, Some(3600)).is_err(), "another ttl");
        let again = ShmTable::open(Location::Path(&p), None, None).unwrap();
        assert_eq!((again.capacity(), again.ttl_secs), (128, 60), "the file's own capacity and ttl");
        assert!(!again.check(&fp(1), &bucket("1/minute", 1), 2 * NANOS, 1, true).unwrap().allowed, "state kept");
        assert!(ShmTable::open(Location::Path(&p), Some(1000), Some(60)).is_err());
        // The epoch offset recorded at creation is the one every opener uses.
        assert!(again.epoch_offset.abs_diff(crate::clock::measure_epoch_offset()) < NANOS / 10);
        drop(again);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[64..72].copy_from_slice(&12_345u64.to_ne_bytes());
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(ShmTable::open(Location::Path(&p), None, None).unwrap().epoch_offset, 12_345);
        bytes[8] = 9; // version
        std::fs::write(&p, &bytes).unwrap();
        let err = ShmTable::open(Location::Path(&p), None, None).err().unwrap().to_string();
        assert!(err.contains("layout version 9"), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(ShmTable::open(Location::Path(&p), None, None).is_err());
        std::fs::remove_file(p).unwrap();
    }
}
