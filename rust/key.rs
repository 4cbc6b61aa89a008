//! Key fingerprints.
//!
//! Stores do not keep the user's key, only a 96-bit keyed SipHash-1-3 fingerprint of
//! it (with a type tag, so `"5"`, `b"5"` and `5` are different keys). The SipHash key
//! is random per process, so nobody can build keys that collide or that crowd one
//! shard; with 96 bits, the chance that any two of a billion keys share a fingerprint
//! is about 6e-12. Keeping 12 bytes instead of the key keeps a tracked key at 32 bytes.

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;
use std::sync::OnceLock;

/// The type of a key, mixed into its fingerprint.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub enum KeyKind {
    Str = 1,
    Bytes = 2,
    /// An int from -2^127 to 2^127 - 1, as its 16 bytes (two's complement, little-endian).
    Int = 3,
    /// An int from 2^127 to 2^128 - 1, as its 16 bytes (unsigned, little-endian). Its own
    /// kind, because those bytes are also the bytes of a negative `Int`.
    IntHigh = 4,
}

/// A key's fingerprint: 96 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Fingerprint(pub [u32; 3]);

impl std::hash::Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.table_hash());
    }
}

/// A hasher for maps keyed by [`Fingerprint`]: the fingerprint is already a keyed hash,
/// so it passes through.
#[derive(Default, Clone, Copy)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Builds [`FingerprintHasher`]s.
pub type FingerprintMap<V> =
    std::collections::HashMap<Fingerprint, V, std::hash::BuildHasherDefault<FingerprintHasher>>;

impl Fingerprint {
    /// The hash the tables probe with (the low 64 bits).
    #[inline]
    pub fn table_hash(&self) -> u64 {
        self.0[0] as u64 | (self.0[1] as u64) << 32
    }

    /// Picks a shard with bits the table hash does not use.
    #[inline]
    pub fn shard(&self, shards: usize) -> usize {
        (self.0[2] as usize) & (shards - 1)
    }
}

fn process_keys() -> &'static (u64, u64) {
    static KEYS: OnceLock<(u64, u64)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut buf = [0u8; 16];
        if getrandom::fill(&mut buf).is_err() {
            // No OS randomness: fall back to the std hasher's per-process random keys.
            use std::hash::BuildHasher;
            let rs = std::collections::hash_map::RandomState::new();
            let a = rs.hash_one(0x6e65_7875_u64);
            let b = rs.hash_one(0x6c69_6d69_u64);
            return (a, b);
        }
        (u64::from_le_bytes(buf[..8].try_into().unwrap()), u64::from_le_bytes(buf[8..].try_into().unwrap()))
    })
}

/// Fingerprints `bytes` of the given kind with this process's key.
#[inline]
pub fn fingerprint(kind: KeyKind, bytes: &[u8]) -> Fingerprint {
    let (k0, k1) = *process_keys();
    fingerprint_with(k0, k1, kind, bytes)
}

/// How one limiter fingerprints keys: a SipHash secret (this process's, or the one a
/// store shared between processes keeps) and a salt XORed in, which sets apart the keys
/// of limiters sharing a store.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprinter {
    k0: u64,
    k1: u64,
    salt: [u32; 3],
}

impl Fingerprinter {
    /// This process's secret, no salt: [`fingerprint`].
    pub fn process() -> Fingerprinter {
        let (k0, k1) = *process_keys();
        Fingerprinter { k0, k1, salt: [0; 3] }
    }

    /// A store's secret and a limiter's salt.
    pub fn new(k0: u64, k1: u64, salt: [u32; 3]) -> Fingerprinter {
        Fingerprinter { k0, k1, salt }
    }

    #[inline]
    pub fn fingerprint(&self, kind: KeyKind, bytes: &[u8]) -> Fingerprint {
        let f = fingerprint_with(self.k0, self.k1, kind, bytes).0;
        Fingerprint([f[0] ^ self.salt[0], f[1] ^ self.salt[1], f[2] ^ self.salt[2]])
    }
}

/// Fingerprints with explicit SipHash keys (a store shared between processes keeps its own).
#[inline]
pub fn fingerprint_with(k0: u64, k1: u64, kind: KeyKind, bytes: &[u8]) -> Fingerprint {
    let mut h = SipHasher13::new_with_keys(k0, k1);
    h.write_u8(kind as u8);
    h.write(bytes);
    let v = h.finish128();
    Fingerprint([v.h1 as u32, (v.h1 >> 32) as u32, v.h2 as u32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_bytes_separate_keys() {
        let a = fingerprint(KeyKind::Str, b"5");
        assert_eq!(a, fingerprint(KeyKind::Str, b"5"));
        assert_ne!(a, fingerprint(KeyKind::Bytes, b"5"));
        assert_ne!(a, fingerprint(KeyKind::Int, b"5"));
        assert_ne!(a, fingerprint(KeyKind::Str, b"6"));
        assert_ne!(fingerprint(KeyKind::Str, b""), fingerprint(KeyKind::Bytes, b""));
        // -1 and 2^128 - 1 have the same 16 bytes: the kind keeps them apart.
        let ones = u128::MAX.to_le_bytes();
        assert_eq!(ones, (-1i128).to_le_bytes());
        assert_ne!(fingerprint(KeyKind::Int, &ones), fingerprint(KeyKind::IntHigh, &ones));
    }

    #[test]
    fn no_collisions_among_many_keys() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..200_000u32 {
            assert!(seen.insert(fingerprint(KeyKind::Str, format!("key-{i}").as_bytes())));
        }
    }

    #[test]
    fn keys_change_the_fingerprint() {
        assert_ne!(fingerprint_with(1, 2, KeyKind::Str, b"x"), fingerprint_with(1, 3, KeyKind::Str, b"x"));
    }

    #[test]
    fn fingerprinters_salt_and_default_to_the_process_secret() {
        assert_eq!(Fingerprinter::process().fingerprint(KeyKind::Bytes, b"k"), fingerprint(KeyKind::Bytes, b"k"));
        let plain = Fingerprinter::new(1, 2, [0; 3]).fingerprint(KeyKind::Str, b"k");
        let salted = Fingerprinter::new(1, 2, [1, 2, 3]).fingerprint(KeyKind::Str, b"k");
        assert_eq!(plain, fingerprint_with(1, 2, KeyKind::Str, b"k"));
        assert_eq!(salted.0, [plain.0[0] ^ 1, plain.0[1] ^ 2, plain.0[2] ^ 3]);
    }
}
