//! Concurrency leases kept in a shared-memory store, so that every process of a host
//! counts the same calls in flight per key.
//!
//! A node's leases live in numbered lease slots (keys of the store derived from the
//! node and a slot number), each holding one lease as `expiry | id << 64`, and a
//! high-water key holding how many slot numbers may be in use. Every step runs inside
//! a [`Transaction`] of the store (its robust lock and redo journal), so taking a lease
//! together with the rate quotas of the same call is one all-or-nothing write, and a
//! process killed at any point leaves either all of it or none.
//!
//! A lease ends when released, or when its `lease_ttl` runs out: a process that dies
//! holding leases leaks nothing for longer than that, because a slot whose lease has
//! expired counts as free. The high-water key is rewritten by every lease taken, so it
//! is never idle for longer than the youngest lease it covers; with `lease_ttl` at most
//! the store's ttl, the store's idle sweep can only take it once every lease under it
//! has expired.

use super::{Transaction, Write};
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::key::Fingerprint;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a lease id that hold its slot number; the rest is a per-process nonce.
const SLOT_BITS: u32 = 16;
/// The highest concurrency limit a node may have in a shared-memory store: a lease id
/// names its slot in [`SLOT_BITS`] bits, and taking a lease reads every slot in use.
pub const MAX_SHARED_LEASES: u64 = (1 << SLOT_BITS) - 1;

/// A node's leases as read in a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The expiry (clock ns) of each live lease.
    pub live: Vec<u64>,
    /// The first slot free to take (below `high`), if any.
    free: Option<u64>,
    /// Slot numbers possibly in use: `0..high`.
    high: u64,
    /// The limit in force, and whether it is the node's own.
    pub limit: u64,
    pub own: bool,
}

/// A concurrency limit whose leases are kept in a shared-memory store (see the module's
/// documentation).
pub struct SharedLeases {
    max: u64,
    lease_ttl_ns: u64,
    /// Sets this limit's keys apart in the store (from its name and place).
    salt: [u32; 3],
    /// The same for the key holding a node's own limit.
    quota_salt: [u32; 3],
    /// Lease ids taken by this process: a random start, so processes do not collide.
    next: AtomicU64,
}

fn check_limit(max: u64) -> Result<u64> {
    if max == 0 || max > MAX_SHARED_LEASES {
        return Err(Error::InvalidArgument(format!(
            "a concurrency limit in a SharedMemoryStore is from 1 to {MAX_SHARED_LEASES}, got {max}"
        )));
    }
    Ok(max)
}

/// splitmix64: spreads a slot number over the bits of a key.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn salted(node: &Fingerprint, salt: [u32; 3], n: u64) -> Fingerprint {
    let m = mix(n);
    Fingerprint([node.0[0] ^ salt[0] ^ m as u32, node.0[1] ^ salt[1] ^ (m >> 32) as u32, node.0[2] ^ salt[2]])
}

/// A lease slot's state: its expiry and id. Never 0 (ids are not) nor the store's TOMB.
fn slot_state(expiry: u64, id: u64) -> u128 {
    expiry as u128 | (id as u128) << 64
}

impl SharedLeases {
    /// At most `max` leases per node, each ending after `lease_ttl_ns` at the latest;
    /// `salt` and `quota_salt` set its keys apart in the store. `store_ttl_secs`: the
    /// store's ttl, which a lease must not outlive (else the store could forget it).
    pub fn new(
        max: u64,
        lease_ttl_ns: u64,
        store_ttl_secs: u64,
        salt: [u32; 3],
        quota_salt: [u32; 3],
    ) -> Result<SharedLeases> {
        check_limit(max)?;
        if lease_ttl_ns > store_ttl_secs.saturating_mul(crate::clock::NANOS) {
            return Err(Error::InvalidArgument(format!(
                "lease_ttl ({} s) is above the store's ttl ({store_ttl_secs} s): the store would forget leases \
                 still held; open the SharedMemoryStore with ttl >= {}",
                crate::clock::ns_to_secs(lease_ttl_ns),
                crate::clock::ns_to_secs(lease_ttl_ns).ceil()
            )));
        }
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| Error::InvalidArgument(format!("no randomness: {e}")))?;
        Ok(SharedLeases {
            max,
            lease_ttl_ns: lease_ttl_ns.max(1),
            salt,
            quota_salt,
            next: AtomicU64::new(u64::from_le_bytes(seed)),
        })
    }

    /// The limit of nodes without one of their own (this process's setting).
    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn lease_ttl_ns(&self) -> u64 {
        self.lease_ttl_ns
    }

    fn slot_key(&self, node: &Fingerprint, slot: u64) -> Fingerprint {
        salted(node, self.salt, slot)
    }

    fn high_key(&self, node: &Fingerprint) -> Fingerprint {
        salted(node, self.salt, u64::MAX)
    }

    fn own_key(&self, node: &Fingerprint) -> Fingerprint {
        salted(node, self.quota_salt, 0)
    }

    /// The node's leases (`node`: its fingerprint in the store).
    pub fn read(&self, txn: &Transaction<'_>, node: &Fingerprint, now: u64) -> Held {
        let own = txn.read(&self.own_key(node)).map(|n| n as u64).filter(|&n| n > 0);
        let high = txn.read(&self.high_key(node)).map_or(0, |h| (h as u64).min(MAX_SHARED_LEASES));
        let mut held = Held { high, limit: own.unwrap_or_else(|| self.max()), own: own.is_some(), ..Held::default() };
        for slot in 0..high {
            match txn.read(&self.slot_key(node, slot)) {
                Some(s) if s as u64 > now => held.live.push(s as u64),
                _ => {
                    held.free.get_or_insert(slot);
                }
            }
        }
        held
    }

    /// Whether one more lease fits next to those `held`.
    pub fn decide(&self, held: &Held, now: u64) -> Decision {
        let n = held.live.len() as u64;
        let allowed = n < held.limit;
        let first = held.live.iter().copied().min().unwrap_or(now);
        let last = held.live.iter().copied().max().unwrap_or(now);
        Decision {
            allowed,
            limit: held.limit,
            remaining: held.limit.saturating_sub(if allowed { n + 1 } else { n }),
            reset_after: if allowed { self.lease_ttl_ns } else { last.saturating_sub(now) },
            retry_after: Some(if allowed { 0 } else { first.saturating_sub(now) }),
            delay: 0,
        }
    }

    /// The answer when the store has no room for a lease: refused until keys expire.
    pub fn full(&self, held: &Held) -> Decision {
        Decision {
            allowed: false,
            limit: held.limit,
            remaining: 0,
            reset_after: 0,
            retry_after: Some(self.lease_ttl_ns),
            delay: 0,
        }
    }

    /// The writes that take a lease (one fits: see [`decide`](Self::decide)); returns
    /// its id.
    pub fn take(&self, held: &Held, node: &Fingerprint, now: u64, writes: &mut Vec<Write>) -> u64 {
        let slot = held.free.unwrap_or(held.high);
        let nonce = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed) & (u64::MAX >> SLOT_BITS);
            if n != 0 {
                break n;
            }
        };
        let id = nonce << SLOT_BITS | slot;
        writes.push(Write::Set(self.slot_key(node, slot), slot_state(now.saturating_add(self.lease_ttl_ns), id)));
        // Rewritten even when unchanged: the store sees it in use as long as a lease is.
        writes.push(Write::Set(self.high_key(node), held.high.max(slot + 1) as u128));
        id
    }

    /// The writes that end the lease `id` of the node; false (none) when it had already
    /// ended (released, expired or reset).
    pub fn release(
        &self,
        txn: &Transaction<'_>,
        node: &Fingerprint,
        id: u64,
        now: u64,
        writes: &mut Vec<Write>,
    ) -> bool {
        let slot = id & MAX_SHARED_LEASES;
        let key = self.slot_key(node, slot);
        let live = matches!(txn.read(&key), Some(s) if (s >> 64) as u64 == id && s as u64 > now);
        if !live {
            return false;
        }
        writes.push(Write::Remove(key));
        // Slot numbers at the top that hold no live lease are given up.
        let mut high = txn.read(&self.high_key(node)).map_or(0, |h| (h as u64).min(MAX_SHARED_LEASES));
        while high > 0 {
            let top = high - 1;
            let in_use = top != slot && matches!(txn.read(&self.slot_key(node, top)), Some(s) if s as u64 > now);
            if in_use {
                break;
            }
            high -= 1;
        }
        writes.push(if high == 0 {
            Write::Remove(self.high_key(node))
        } else {
            Write::Set(self.high_key(node), high as u128)
        });
        true
    }

    /// Every key of the node's leases, for a reset: its slots, then its high-water key.
    pub fn keys(&self, txn: &Transaction<'_>, node: &Fingerprint) -> Vec<Fingerprint> {
        let high = txn.read(&self.high_key(node)).map_or(0, |h| (h as u64).min(MAX_SHARED_LEASES));
        let mut out: Vec<Fingerprint> = (0..high).map(|s| self.slot_key(node, s)).collect();
        out.push(self.high_key(node));
        out
    }

    /// The write giving the node a limit of its own (kept in the store until cleared).
    pub fn set_own(&self, node: &Fingerprint, max: u64) -> Result<Write> {
        Ok(Write::Pin(self.own_key(node), check_limit(max)? as u128))
    }

    /// The write putting the node back on the default limit, if it had one of its own.
    pub fn clear_own(&self, txn: &Transaction<'_>, node: &Fingerprint) -> Option<Write> {
        let key = self.own_key(node);
        txn.read(&key).map(|_| Write::Remove(key))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Location, ShmTable};
    use super::*;
    use crate::clock::NANOS;
    use crate::key::{fingerprint, KeyKind};

    fn table(name: &str) -> (ShmTable, String) {
        let p = std::env::temp_dir().join(format!("nl-leases-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let p = p.to_string_lossy().into_owned();
        (ShmTable::open(Location::Path(&p), Some(256), Some(3600)).unwrap(), p)
    }

    fn node(s: &str) -> Fingerprint {
        fingerprint(KeyKind::Str, s.as_bytes())
    }

    fn acquire(l: &SharedLeases, t: &ShmTable, n: &Fingerprint, now: u64) -> (Decision, Option<u64>) {
        let mut txn = t.transaction().unwrap();
        let held = l.read(&txn, n, now);
        let d = l.decide(&held, now);
        if !d.allowed {
            return (d, None);
        }
        let mut writes = Vec::new();
        let id = l.take(&held, n, now, &mut writes);
        assert!(txn.write(&writes, now));
        (d, Some(id))
    }

    fn release(l: &SharedLeases, t: &ShmTable, n: &Fingerprint, id: u64, now: u64) -> bool {
        let mut txn = t.transaction().unwrap();
        let mut writes = Vec::new();
        let done = l.release(&txn, n, id, now, &mut writes);
        assert!(txn.write(&writes, now));
        done
    }

    #[test]
    fn at_most_the_limit_and_slots_are_reused() {
        let (t, p) = table("limit");
        let l = SharedLeases::new(2, 10 * NANOS, 3600, [1, 2, 3], [4, 5, 6]).unwrap();
        let k = node("k");
        let (d1, a) = acquire(&l, &t, &k, NANOS);
        assert!(d1.allowed && d1.remaining == 1 && d1.reset_after == 10 * NANOS);
        let (_, b) = acquire(&l, &t, &k, 2 * NANOS);
        let (refused, none) = acquire(&l, &t, &k, 3 * NANOS);
        assert!(!refused.allowed && none.is_none());
        assert_eq!((refused.retry_after, refused.reset_after), (Some(8 * NANOS), 9 * NANOS), "the first ends at 11 s");
        assert!(release(&l, &t, &k, a.unwrap(), 4 * NANOS));
        assert!(!release(&l, &t, &k, a.unwrap(), 4 * NANOS), "released once");
        let (_, c) = acquire(&l, &t, &k, 5 * NANOS);
        assert_eq!(c.unwrap() & MAX_SHARED_LEASES, 0, "slot 0 again");
        assert!(release(&l, &t, &k, b.unwrap(), 5 * NANOS) && release(&l, &t, &k, c.unwrap(), 5 * NANOS));
        let txn = t.transaction().unwrap();
        assert_eq!(l.read(&txn, &k, 5 * NANOS), Held { limit: 2, ..Held::default() }, "nothing left behind");
        drop(txn);
        assert_eq!(t.count(), 0);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn an_expired_lease_frees_its_place_and_cannot_be_released() {
        let (t, p) = table("expiry");
        let l = SharedLeases::new(1, 10 * NANOS, 3600, [1, 2, 3], [4, 5, 6]).unwrap();
        let k = node("k");
        let (_, a) = acquire(&l, &t, &k, 0);
        assert!(!acquire(&l, &t, &k, 9 * NANOS).0.allowed);
        let (d, b) = acquire(&l, &t, &k, 11 * NANOS);
        assert!(d.allowed && b.is_some(), "the holder vanished: its lease ran out");
        assert!(!release(&l, &t, &k, a.unwrap(), 11 * NANOS), "an expired lease is not released again");
        assert!(release(&l, &t, &k, b.unwrap(), 11 * NANOS));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn own_limits_and_validation() {
        let (t, p) = table("own");
        let l = SharedLeases::new(1, NANOS, 3600, [1, 2, 3], [4, 5, 6]).unwrap();
        let k = node("k");
        assert!(t.transaction().unwrap().write(&[l.set_own(&k, 3).unwrap()], 0));
        assert_eq!((0..5).filter(|_| acquire(&l, &t, &k, 0).0.allowed).count(), 3);
        let w = l.clear_own(&t.transaction().unwrap(), &k).unwrap();
        assert!(t.transaction().unwrap().write(&[w], 0));
        let txn = t.transaction().unwrap();
        let held = l.read(&txn, &k, 0);
        assert_eq!((held.limit, held.own, held.live.len()), (1, false, 3));
        assert_eq!(l.keys(&txn, &k).len(), 4);
        drop(txn);
        assert!(l.set_own(&k, 0).is_err() && l.set_own(&k, MAX_SHARED_LEASES + 1).is_err());
        let err = SharedLeases::new(1, 7200 * NANOS, 3600, [0; 3], [0; 3]).err().unwrap().to_string();
        assert!(err.contains("above the store's ttl"), "{err}");
        std::fs::remove_file(p).unwrap();
    }
}
