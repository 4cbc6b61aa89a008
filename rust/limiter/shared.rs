//! A limiter's states in a shared-memory store, which every process of the host maps.
//! The table ([`ShmTable`]) is shared by every limiter built on it, in every process:
//! a limiter salts its keys with its quota, so limiters that count differently never
//! share a key, and limiters built alike in two processes share all of theirs.

use crate::clock::{ns_to_secs, Clock, NANOS};
use crate::decision::Decision;
use crate::error::{Error, Result};
use crate::key::{fingerprint_with, Fingerprint, Fingerprinter, KeyKind};
use crate::priority::{step_share, Share};
use crate::quota::Quota;
use crate::report::AtomicCounters;
use crate::store::shm::ShmTable;
use crossbeam_utils::CachePadded;
use std::sync::Arc;

/// Refuses a quota whose keys the store would forget before they are fresh again.
pub fn check_store_ttl(quota: &Quota, table: &ShmTable) -> Result<()> {
    let need = quota.time_to_fresh();
    if need > table.ttl_secs.saturating_mul(NANOS) {
        return Err(Error::InvalidArgument(format!(
            "this limiter needs {}s to forget a key but the store's ttl is {}s: open the store with ttl >= {}",
            ns_to_secs(need),
            table.ttl_secs,
            ns_to_secs(need).ceil()
        )));
    }
    Ok(())
}

pub(super) struct OnSharedMemory {
    pub table: Arc<ShmTable>,
    /// Fixed for the limiter's life: it is part of its keys' identity in the store.
    pub quota: Quota,
    /// Checks of this process.
    pub counters: CachePadded<AtomicCounters>,
}

impl OnSharedMemory {
    /// The limiter's states on `table`, and how it fingerprints its keys there.
    pub fn new(quota: Quota, clock: &Clock, table: Arc<ShmTable>) -> Result<(OnSharedMemory, Fingerprinter)> {
        check_store_ttl(&quota, &table)?;
        // Windows are read with the store's epoch offset, the same in every process.
        let quota = quota.bound(if clock.is_manual() { 0 } else { table.epoch_offset });
        let salt = fingerprint_with(table.k0, table.k1, KeyKind::Bytes, quota.shared_memory_id().as_bytes()).0;
        let fingerprinter = Fingerprinter::new(table.k0, table.k1, salt);
        Ok((OnSharedMemory { table, quota, counters: Default::default() }, fingerprinter))
    }

    /// Steps the quota and keeps the new state if admitted. None when the key is new,
    /// admitted, and its probe window has no slot for it.
    #[inline]
    pub fn step(&self, fp: &Fingerprint, now: u64, cost: u64) -> Option<Decision> {
        self.table.check(fp, self.quota.algorithm(), now, cost, true)
    }

    pub fn peek(&self, fp: &Fingerprint, now: u64, cost: u64) -> Decision {
        // A check that charges nothing always finds an answer, room or not.
        self.table.check(fp, self.quota.algorithm(), now, cost, false).unwrap_or_else(|| self.quota.full())
    }

    /// [`step`](Self::step) for a priority class: `share` of the quota is all it may use.
    pub fn step_share(&self, fp: &Fingerprint, now: u64, cost: u64, share: Share, charge: bool) -> Option<Decision> {
        let q = &self.quota;
        self.table.check_by(fp, q.algorithm(), now, charge, |state| step_share(q, state, now, cost, share))
    }
}
