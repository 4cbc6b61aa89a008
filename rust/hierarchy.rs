//! Hierarchical quotas: a call is charged at every level of its path (org > team > key,
//! any depth), all or nothing.
//!
//! Each level has its own quotas: requests, tokens, daily tokens and spend (token
//! buckets whose burst is their rate's count, like a [`crate::budget::Budget`]'s) and a
//! concurrency limit. A path names one node per level (`("acme", "search", "sk-1")`: the
//! org `acme`, its team `search`, the team's key `sk-1`), and a call is decided on every
//! node of its path as one step: admitted only if every quota of every level admits
//! it, and then charged to all of them; refused, it is charged nowhere.
//!
//! - In this process every (level, quota) pair is a [`Limiter`] with a store of its
//!   own, and a check is a [`Group`] check over them with one key per part (the part's
//!   node): the shards are locked in one global order (store id), so concurrent calls
//!   can neither deadlock nor overspend. Concurrency leases are taken under the
//!   leases' locks, level by level from the top, around the rate check: a lease is taken
//!   only if every level has one free and every rate quota admits.
//! - In a shared-memory store the check runs as one [`Transaction`] of the store (a
//!   robust process-shared lock and a redo journal): every process of the host sees the
//!   whole path change at once, and a process killed mid-check leaves it applied in full
//!   or not at all. Concurrency leases live there too ([`SharedLeases`]): taken in the
//!   same transaction as the rate quotas (a lease only if every level has one free and
//!   every rate quota admits), ended by the transaction that settles, and a lease whose
//!   holder died ends after `lease_ttl`.
//!
//! A node's quotas can be changed at run time, keeping what it has used: for one node
//! (in this process, or kept in the shared-memory store for every process) or, in this
//! process, for a whole level.

use crate::algorithms::State;
use crate::clock::Clock;
use crate::composite::{Group, MAX_PARTS};
use crate::concurrency::{Concurrency, ConcurrencyStats};
use crate::decision::{finish, fold, Decision};
use crate::error::{Error, Result};
use crate::key::{fingerprint_with, Fingerprint, Fingerprinter, KeyKind};
use crate::limiter::{Limiter, Stats};
use crate::priority::{check_classes, step_share, Share};
use crate::quota::{Kind, Quota};
use crate::rate::Rate;
use crate::report::{AtomicCounters, Counters, Inspection};
use crate::store::shm::{Held, SharedLeases, ShmTable, Transaction, Write, MAX_WRITES};
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The most levels a hierarchy has.
pub const MAX_LEVELS: usize = 16;

/// What a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    Requests = 0,
    Tokens = 1,
    DailyTokens = 2,
    /// Money, in whatever whole unit the caller counts it (micro-dollars, say).
    Spend = 3,
}

impl Unit {
    pub const ALL: [Unit; 4] = [Unit::Requests, Unit::Tokens, Unit::DailyTokens, Unit::Spend];

    /// `"requests"`, `"tokens"`, `"daily_tokens"` or `"spend"`.
    pub fn name(self) -> &'static str {
        ["requests", "tokens", "daily_tokens", "spend"][self as usize]
    }

    pub fn parse(name: &str) -> Result<Unit> {
        Unit::ALL.into_iter().find(|u| u.name() == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a quota is one of 'requests', 'tokens', 'daily_tokens', 'spend', 'concurrency', got {name:?}"
            ))
        })
    }
}

/// What one call costs: requests, tokens (on the token and daily-token quotas) and spend;
/// and its priority class, when the hierarchy has classes (None: the default class).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    pub requests: u64,
    pub tokens: u64,
    pub spend: u64,
    pub class: Option<usize>,
}

impl Amounts {
    pub fn of(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Requests => self.requests,
            Unit::Tokens | Unit::DailyTokens => self.tokens,
            Unit::Spend => self.spend,
        }
    }
}

/// Charges (positive) or refunds (negative) of a settlement, by unit as in [`Amounts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deltas {
    pub requests: i64,
    pub tokens: i64,
    pub spend: i64,
}

impl Deltas {
    pub fn of(&self, unit: Unit) -> i64 {
        match unit {
            Unit::Requests => self.requests,
            Unit::Tokens | Unit::DailyTokens => self.tokens,
            Unit::Spend => self.spend,
        }
    }
}

/// A rate per [`Unit`], any of them absent.
pub type Rates = [Option<Rate>; 4];

/// One level as given: its name and quotas.
#[derive(Clone, Debug)]
pub struct LevelSpec {
    pub name: String,
    pub rates: Rates,
    pub concurrency: Option<u64>,
}

/// A path's nodes, as bytes: the bytes of the node of level `i` are a prefix of those of
/// level `i + 1`, and no two paths share a node's bytes unless they share the whole
/// prefix (each element is written with its kind and length).
#[derive(Clone, Debug, Default)]
pub struct Path {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Path {
    pub fn new() -> Path {
        Path { bytes: b"nl-hierarchy\0".to_vec(), ends: Vec::new() }
    }

    /// Appends the next element (a key as the limiters take it).
    pub fn push(&mut self, kind: KeyKind, bytes: &[u8]) {
        self.bytes.push(kind as u8);
        self.bytes.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(bytes);
        self.ends.push(self.bytes.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The node of level `level`.
    pub fn node(&self, level: usize) -> &[u8] {
        &self.bytes[..self.ends[level]]
    }
}

/// A (level, quota) pair whose state lives in a shared-memory store.
struct StoredQuota {
    quota: Quota,
    /// XORed into the node's fingerprint: sets this part's keys apart in the store.
    salt: [u32; 3],
    /// The same for the key holding a node's own quota (see [`Hierarchy::set_quota`]).
    quota_salt: [u32; 3],
    counters: CachePadded<AtomicCounters>,
}

impl StoredQuota {
    /// The quota in force for a node whose own-quota key reads `own`, and whether it is
    /// the node's own.
    fn quota_for(&self, own: Option<State>) -> (Quota, bool) {
        match own.and_then(decode_quota) {
            Some(q) => (q, true),
            None => (self.quota.clone(), false),
        }
    }
}

/// A node's own quota as a shared-memory state: a bucket's count and period (its burst
/// is its count). Never 0.
fn encode_quota(q: &Quota) -> State {
    let rate = q.rate();
    rate.count as u128 | (rate.period_ns as u128) << 64
}

fn decode_quota(state: State) -> Option<Quota> {
    Rate::new(state as u64, (state >> 64) as u64).and_then(bucket).ok()
}

enum Parts {
    InProcess(Group),
    SharedMemory { table: Arc<ShmTable>, parts: Vec<StoredQuota> },
}

struct Level {
    name: String,
    /// The parts of this level, by index.
    parts: Vec<usize>,
    concurrency: Option<Arc<Concurrency>>,
    /// The level's concurrency limit when its leases live in a shared-memory store.
    shared_leases: Option<SharedLeases>,
    /// The leases of `shared_leases` this process took and has not ended, by id: (node,
    /// expiry). Only for [`Hierarchy::stats`] (the store has no count of a level's leases).
    mine: Mutex<HashMap<u64, (Fingerprint, u64)>>,
}

impl Level {
    /// Forgets this process's lease `id` of this level (ended, or given up).
    fn forget(&self, id: u64) {
        if self.shared_leases.is_some() {
            self.mine.lock().remove(&id);
        }
    }

    /// Notes a lease this process took. Leases never ended (their reservations
    /// dropped) are forgotten once expired, every so often, so the map stays bounded.
    fn remember(&self, id: u64, node: Fingerprint, now: u64, expiry: u64) {
        let mut mine = self.mine.lock();
        mine.insert(id, (node, expiry));
        if mine.len() % 1024 == 0 {
            mine.retain(|_, (_, expiry)| *expiry > now);
        }
    }

    /// How many of this process's leases of this level are live at `now` (those that
    /// have expired are forgotten).
    fn held_here(&self, now: u64) -> u64 {
        let mut mine = self.mine.lock();
        mine.retain(|_, (_, expiry)| *expiry > now);
        mine.len() as u64
    }
}

/// The rate quotas of a call stepped inside a transaction, not yet written.
struct Stepped {
    /// The quotas' combined decision (None: the hierarchy has none).
    decision: Option<Decision>,
    each: Vec<Decision>,
    /// What charging them writes (nothing unless charged and admitted).
    writes: Vec<Write>,
    /// The part a full store answers for (the first new key admitted), and its answer.
    full: Option<(usize, Decision)>,
}

impl Stepped {
    /// The store had no room for a key to write: the call is refused as the limiters
    /// refuse a new key in a full store.
    fn refuse_full(&mut self) {
        if let (Some((i, full)), Some(d)) = (self.full, self.decision) {
            self.each[i] = full;
            self.decision = Some(Decision { limit: d.limit, ..full });
        }
    }
}

/// Which quota refused a call: a unit's, or (None) the level's concurrency limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub level: usize,
    pub unit: Option<Unit>,
}

/// The answer to a check or a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Every quota's decision combined (see [`crate::decision::combine`]).
    pub decision: Decision,
    /// Admitted although a quota would have refused (shadow mode).
    pub shadow: bool,
    /// Each part's own decision, by part index (see [`Hierarchy::part`]).
    pub parts: Vec<Decision>,
    /// Each level's concurrency decision (None: no limit, or not asked).
    pub concurrency: Vec<Option<Decision>>,
    /// The lease taken at each level with a concurrency limit.
    pub leases: Vec<Option<u64>>,
    /// The quota that refused (or, in shadow mode, would have): the one whose
    /// `retry_after` is the longest, the highest level of those tied.
    pub refused: Option<Refusal>,
    /// When the call was charged (the hierarchy's clock, ns): settling needs it.
    pub charged_at: u64,
}

/// One node as [`Hierarchy::inspect`] reports it: each rate quota of its level, and its
/// leases as (limit, held) when the level has a concurrency limit.
pub type NodeInspection = (Vec<(Unit, Inspection)>, Option<(u64, u64)>);

/// A hierarchy's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HierarchyStats {
    pub counters: Counters,
    /// Calls refused, by the level that refused them.
    pub refused_by: Vec<u64>,
    /// Each part's stats (its counters count its own decisions).
    pub parts: Vec<Stats>,
    pub concurrency: Vec<Option<ConcurrencyStats>>,
    /// Each priority class's name, share and counters.
    pub classes: Vec<(String, Share, Counters)>,
}

/// Quotas charged at every level of a path (see the module's documentation).
pub struct Hierarchy {
    levels: Vec<Level>,
    /// (level, unit) of each part.
    part_of: Vec<(usize, Unit)>,
    parts: Parts,
    clock: Clock,
    lease_ttl_ns: u64,
    shadow: AtomicBool,
    counters: CachePadded<AtomicCounters>,
    refused_by: Vec<AtomicU64>,
    /// Priority classes (see [`crate::priority`]): each may use its share of every rate
    /// quota of every level. None: every call may use all of them.
    classes: Vec<HierarchyClass>,
    /// The class of a call that names none.
    default_class: usize,
}

/// One priority class of a hierarchy: its name, share and counters.
struct HierarchyClass {
    name: String,
    share: Share,
    counters: CachePadded<AtomicCounters>,
}

fn bucket(rate: Rate) -> Result<Quota> {
    Quota::new(Kind::TokenBucket, rate, None, 0)
}

/// The salt of a part in a shared-memory store: what it is (so hierarchies, levels and
/// quotas that count differently never share a key) under the store's secret.
fn shm_salt(table: &ShmTable, name: &str, level: usize, spec: &LevelSpec, unit: Unit, quota: &Quota) -> [u32; 3] {
    let id = format!("hierarchy|{name}|{level}|{}|{}|{}", spec.name, unit.name(), quota.shared_memory_id());
    fingerprint_with(table.k0, table.k1, KeyKind::Bytes, id.as_bytes()).0
}

#[inline]
fn salted(fp: Fingerprint, salt: [u32; 3]) -> Fingerprint {
    Fingerprint([fp.0[0] ^ salt[0], fp.0[1] ^ salt[1], fp.0[2] ^ salt[2]])
}

impl Hierarchy {
    /// `levels` from the top (1 to [`MAX_LEVELS`], names unique and not empty, each with
    /// at least one quota, at most [`MAX_PARTS`] rate quotas in all). In this process
    /// (`store` None) each rate quota keeps its nodes with `ttl_secs` and `max_keys` as a
    /// [`Limiter`]'s; in a shared-memory store the nodes (their rate quotas and their
    /// leases) are set apart from those of other hierarchies by `name`, and a lease must
    /// not outlive the store's ttl. A reservation stands (and its leases live)
    /// `lease_ttl_secs`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        levels: Vec<LevelSpec>,
        store: Option<Arc<ShmTable>>,
        name: &str,
        clock: Clock,
        ttl_secs: f64,
        max_keys: Option<usize>,
        lease_ttl_secs: f64,
    ) -> Result<Hierarchy> {
        Hierarchy::with_classes(levels, store, name, clock, ttl_secs, max_keys, lease_ttl_secs, Vec::new(), None)
    }

    /// [`new`](Self::new) with priority classes, as a [`crate::priority::Priority`]
    /// takes them (none: no classes), and the class of a call that names none (by
    /// default the one with the smallest share).
    #[allow(clippy::too_many_arguments)]
    pub fn with_classes(
        levels: Vec<LevelSpec>,
        store: Option<Arc<ShmTable>>,
        name: &str,
        clock: Clock,
        ttl_secs: f64,
        max_keys: Option<usize>,
        lease_ttl_secs: f64,
        classes: Vec<(String, Share)>,
        default_class: Option<&str>,
    ) -> Result<Hierarchy> {
        if !classes.is_empty() {
            check_classes(&classes)?;
        }
        let default_class = match default_class {
            None => crate::priority::lowest(classes.iter().map(|c| c.1)),
            Some(d) => classes
                .iter()
                .position(|c| c.0 == d)
                .ok_or_else(|| Error::InvalidArgument(format!("default class {d:?} is not one of the classes")))?,
        };
        let classes = classes
            .into_iter()
            .map(|(name, share)| HierarchyClass { name, share, counters: Default::default() })
            .collect();
        if levels.is_empty() || levels.len() > MAX_LEVELS {
            return Err(Error::InvalidArgument(format!(
                "a Hierarchy has from 1 to {MAX_LEVELS} levels, got {}",
                levels.len()
            )));
        }
        if !(lease_ttl_secs.is_finite() && lease_ttl_secs > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "lease_ttl must be a finite number of seconds above 0, got {lease_ttl_secs}"
            )));
        }
        let mut part_of = Vec::new();
        let mut built = Vec::new();
        for (i, spec) in levels.iter().enumerate() {
            if spec.name.is_empty() {
                return Err(Error::InvalidArgument("a level name must not be empty".into()));
            }
            if levels[..i].iter().any(|l| l.name == spec.name) {
                return Err(Error::InvalidArgument(format!("level {:?} is given twice", spec.name)));
            }
            if spec.rates.iter().all(Option::is_none) && spec.concurrency.is_none() {
                return Err(Error::InvalidArgument(format!(
                    "level {:?} has no quota: give it at least one of requests, tokens, daily_tokens, spend, \
                     concurrency",
                    spec.name
                )));
            }
            for unit in Unit::ALL {
                if let Some(rate) = spec.rates[unit as usize] {
                    part_of.push((i, unit));
                    built.push(bucket(rate)?);
                }
            }
        }
        if built.len() > MAX_PARTS.min(MAX_WRITES) {
            return Err(Error::InvalidArgument(format!(
                "a Hierarchy has at most {} rate quotas in all, got {}",
                MAX_PARTS.min(MAX_WRITES),
                built.len()
            )));
        }
        // A reservation in a store writes each rate quota and two keys per lease taken.
        let leased = levels.iter().filter(|l| l.concurrency.is_some()).count();
        if store.is_some() && built.len() + 2 * leased > MAX_WRITES {
            return Err(Error::InvalidArgument(format!(
                "with a SharedMemoryStore a Hierarchy has at most {MAX_WRITES} rate quotas and twice its \
                 concurrency limits in all, got {} and {leased}",
                built.len()
            )));
        }
        let parts = match store {
            None => {
                let limiters = built
                    .into_iter()
                    .map(|q| Limiter::new(q, clock.clone(), ttl_secs, max_keys).map(Arc::new))
                    .collect::<Result<Vec<_>>>()?;
                Parts::InProcess(Group::new(limiters)?)
            }
            Some(table) => {
                let mut parts = Vec::with_capacity(built.len());
                for (quota, &(level, unit)) in built.into_iter().zip(&part_of) {
                    crate::limiter::check_store_ttl(&quota, &table)?;
                    let quota = quota.bound(if clock.is_manual() { 0 } else { table.epoch_offset });
                    let salt = shm_salt(&table, name, level, &levels[level], unit, &quota);
                    let quota_salt =
                        shm_salt(&table, &format!("{name}|own quota"), level, &levels[level], unit, &quota);
                    parts.push(StoredQuota { quota, salt, quota_salt, counters: Default::default() });
                }
                Parts::SharedMemory { table, parts }
            }
        };
        let lease_ttl_ns = crate::clock::secs_to_ns(lease_ttl_secs).max(1);
        let table = match &parts {
            Parts::SharedMemory { table, .. } => Some(Arc::clone(table)),
            Parts::InProcess(_) => None,
        };
        let levels = levels
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let (mut concurrency, mut leases) = (None, None);
                if let Some(n) = spec.concurrency {
                    match &table {
                        None => concurrency = Some(Arc::new(Concurrency::new(n, lease_ttl_secs, clock.clone())?)),
                        Some(t) => {
                            let salt = |what: &str| {
                                let id = format!("hierarchy|{name}|{i}|{}|{what}", spec.name);
                                fingerprint_with(t.k0, t.k1, KeyKind::Bytes, id.as_bytes()).0
                            };
                            let (s, own) = (salt("concurrency"), salt("own concurrency"));
                            leases = Some(SharedLeases::new(n, lease_ttl_ns, t.ttl_secs, s, own)?);
                        }
                    }
                }
                let parts = (0..part_of.len()).filter(|&p| part_of[p].0 == i).collect();
                Ok(Level { name: spec.name, parts, concurrency, shared_leases: leases, mine: Default::default() })
            })
            .collect::<Result<Vec<_>>>()?;
        let refused_by = (0..levels.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Hierarchy {
            levels,
            part_of,
            parts,
            clock,
            lease_ttl_ns,
            shadow: AtomicBool::new(false),
            counters: Default::default(),
            refused_by,
            classes,
            default_class,
        })
    }

    /// The priority classes as (name, share), none when the hierarchy has none.
    pub fn classes(&self) -> Vec<(String, Share)> {
        self.classes.iter().map(|c| (c.name.clone(), c.share)).collect()
    }

    /// The class named `name`, or an error naming the classes.
    pub fn class(&self, name: &str) -> Result<usize> {
        if self.classes.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "this Hierarchy has no priority classes (build it with classes=) and was given class {name:?}"
            )));
        }
        self.classes.iter().position(|c| c.name == name).ok_or_else(|| {
            let names: Vec<String> = self.classes.iter().map(|c| format!("{:?}", c.name)).collect();
            Error::InvalidArgument(format!("unknown class {name:?}: the classes are {}", names.join(", ")))
        })
    }

    /// The class of a call that names none, if the hierarchy has classes.
    pub fn default_class(&self) -> Option<usize> {
        (!self.classes.is_empty()).then_some(self.default_class)
    }

    /// The class a call of `amounts` is decided as, and its share.
    fn share_of(&self, amounts: &Amounts) -> (Option<usize>, Share) {
        if self.classes.is_empty() {
            return (None, Share::ALL);
        }
        let c = amounts.class.filter(|&c| c < self.classes.len()).unwrap_or(self.default_class);
        (Some(c), self.classes[c].share)
    }

    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    pub fn level_name(&self, level: usize) -> &str {
        &self.levels[level].name
    }

    /// The level named `name`, or an error naming the levels.
    pub fn level(&self, name: &str) -> Result<usize> {
        self.levels.iter().position(|l| l.name == name).ok_or_else(|| {
            let names: Vec<String> = self.levels.iter().map(|l| format!("{:?}", l.name)).collect();
            Error::InvalidArgument(format!("unknown level {name:?}: the levels are {}", names.join(", ")))
        })
    }

    /// The number of rate quotas (parts) over all levels.
    pub fn n_parts(&self) -> usize {
        self.part_of.len()
    }

    /// Part `i`'s level and unit.
    pub fn part(&self, i: usize) -> (usize, Unit) {
        self.part_of[i]
    }

    /// The part of `level` counting `unit`, if the level has that quota.
    pub fn find_part(&self, level: usize, unit: Unit) -> Option<usize> {
        self.levels[level].parts.iter().copied().find(|&p| self.part_of[p].1 == unit)
    }

    /// The level's concurrency limit in this process, if it has one (see
    /// [`concurrency_max`](Self::concurrency_max) for any store).
    pub fn concurrency(&self, level: usize) -> Option<&Arc<Concurrency>> {
        self.levels[level].concurrency.as_ref()
    }

    /// The level's concurrency limit for nodes without one of their own, if it has one.
    pub fn concurrency_max(&self, level: usize) -> Option<u64> {
        let level = &self.levels[level];
        level.concurrency.as_ref().map(|c| c.max()).or_else(|| level.shared_leases.as_ref().map(|s| s.max()))
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn lease_ttl_ns(&self) -> u64 {
        self.lease_ttl_ns
    }

    pub fn is_shared(&self) -> bool {
        matches!(self.parts, Parts::SharedMemory { .. })
    }

    pub fn store_path(&self) -> Option<&str> {
        match &self.parts {
            Parts::SharedMemory { table, .. } => Some(&table.path),
            Parts::InProcess(_) => None,
        }
    }

    pub fn shadow(&self) -> bool {
        self.shadow.load(Ordering::Relaxed)
    }

    /// Shadow mode for the rate quotas (leases stay real): calls are decided, counted and
    /// charged as usual but never refused; the outcome says when one would have been.
    pub fn set_shadow(&self, on: bool) {
        self.shadow.store(on, Ordering::Relaxed);
        if let Parts::InProcess(group) = &self.parts {
            for p in group.parts() {
                p.set_shadow(on);
            }
        }
    }

    fn check_path(&self, path: &Path) -> Result<()> {
        if path.len() != self.levels.len() {
            return Err(self.path_error(path.len(), "a path names one node per level"));
        }
        Ok(())
    }

    /// The level of a node: its path from the top, 1 to `depth` elements.
    pub fn node_level(&self, node: &Path) -> Result<usize> {
        if node.is_empty() || node.len() > self.levels.len() {
            return Err(self.path_error(node.len(), "a node is named by its path from the top, one element or more"));
        }
        Ok(node.len() - 1)
    }

    fn path_error(&self, got: usize, what: &str) -> Error {
        let names: Vec<&str> = self.levels.iter().map(|l| l.name.as_str()).collect();
        Error::InvalidArgument(format!(
            "{what} ({}): expected {} element{}, got {got}",
            names.join(" > "),
            self.levels.len(),
            if self.levels.len() == 1 { "" } else { "s" },
        ))
    }

    /// The nodes of `path` as a shared-memory store fingerprints them, by level.
    fn shared_nodes(table: &ShmTable, path: &Path) -> Vec<Fingerprint> {
        (0..path.len()).map(|l| fingerprint_with(table.k0, table.k1, KeyKind::Bytes, path.node(l))).collect()
    }

    /// In a shared-memory store, each part's key holding the own quota of its node of
    /// `path` (levels `0..path.len()`); none in this process.
    fn quota_keys(&self, path: &Path) -> Vec<Fingerprint> {
        let Parts::SharedMemory { table, parts } = &self.parts else {
            return Vec::new();
        };
        let levels = Self::shared_nodes(table, path);
        parts
            .iter()
            .zip(&self.part_of)
            .map(|(p, &(l, _))| levels.get(l).map_or_else(Fingerprint::default, |&fp| salted(fp, p.quota_salt)))
            .collect()
    }

    /// Each part's key for the nodes of `path` (levels `0..path.len()`).
    fn keys(&self, path: &Path) -> Vec<Fingerprint> {
        match &self.parts {
            Parts::InProcess(_) => {
                let f = Fingerprinter::process();
                let levels: Vec<Fingerprint> =
                    (0..path.len()).map(|l| f.fingerprint(KeyKind::Bytes, path.node(l))).collect();
                self.part_of.iter().map(|&(l, _)| levels.get(l).copied().unwrap_or_default()).collect()
            }
            Parts::SharedMemory { table, parts } => {
                let levels = Self::shared_nodes(table, path);
                parts
                    .iter()
                    .zip(&self.part_of)
                    .map(|(p, &(l, _))| levels.get(l).map_or_else(Fingerprint::default, |&fp| salted(fp, p.salt)))
                    .collect()
            }
        }
    }

    /// The node's key in this process (for the concurrency limits).
    fn process_key(path: &Path, level: usize) -> Fingerprint {
        Fingerprinter::process().fingerprint(KeyKind::Bytes, path.node(level))
    }

    fn costs(&self, amounts: &Amounts) -> Vec<u64> {
        self.part_of.iter().map(|&(_, unit)| amounts.of(unit)).collect()
    }

    /// Decides a call costing `amounts` on every node of `path` and, with `charge`,
    /// charges every rate quota or none. Takes no lease (see [`reserve`](Self::reserve)).
    pub fn check(&self, path: &Path, amounts: Amounts, charge: bool) -> Result<Outcome> {
        self.check_path(path)?;
        let (keys, quota_keys) = (self.keys(path), self.quota_keys(path));
        let now = self.clock.now();
        let (class, share) = self.share_of(&amounts);
        let (rates, parts) = self.check_rates(&keys, &quota_keys, &self.costs(&amounts), share, charge)?;
        let n = self.levels.len();
        let o = self.outcome(rates, parts, vec![None; n], vec![None; n], now, charge);
        if charge {
            self.count_class(class, &o);
        }
        Ok(o)
    }

    /// What [`reserve`](Self::reserve) would decide now, charging nothing and taking no
    /// lease.
    pub fn peek(&self, path: &Path, amounts: Amounts) -> Result<Outcome> {
        self.check_path(path)?;
        let (keys, quota_keys) = (self.keys(path), self.quota_keys(path));
        let (_, share) = self.share_of(&amounts);
        if let Parts::SharedMemory { table, parts } = &self.parts {
            return self.reserve_shared(table, parts, path, &keys, &quota_keys, &self.costs(&amounts), share, false);
        }
        let (rates, parts) = self.check_rates(&keys, &quota_keys, &self.costs(&amounts), share, false)?;
        let concurrency = self
            .levels
            .iter()
            .enumerate()
            .map(|(l, level)| level.concurrency.as_ref().map(|c| c.peek(&Self::process_key(path, l))))
            .collect();
        Ok(self.outcome(rates, parts, concurrency, vec![None; self.levels.len()], 0, false))
    }

    /// Reserves `amounts` on every node of `path` with a lease at every level that has a
    /// concurrency limit: all of it, or nothing. A lease is taken only if every level has
    /// one free and every rate quota admits.
    pub fn reserve(&self, path: &Path, amounts: Amounts) -> Result<Outcome> {
        self.check_path(path)?;
        let (keys, quota_keys) = (self.keys(path), self.quota_keys(path));
        let costs = self.costs(&amounts);
        let (class, share) = self.share_of(&amounts);
        if let Parts::SharedMemory { table, parts } = &self.parts {
            let o = self.reserve_shared(table, parts, path, &keys, &quota_keys, &costs, share, true)?;
            self.count_class(class, &o);
            return Ok(o);
        }
        let now = self.clock.now();
        let limited: Vec<(usize, &Concurrency, Fingerprint)> = self
            .levels
            .iter()
            .enumerate()
            .filter_map(|(l, level)| level.concurrency.as_deref().map(|c| (l, c, Self::process_key(path, l))))
            .collect();
        let n = self.levels.len();
        let (mut concurrency, mut leases) = (vec![None; n], vec![None; n]);
        let mut rates: Option<Result<(Option<Decision>, Vec<Decision>)>> = None;
        let mut inner = || {
            let r = self.check_rates(&keys, &quota_keys, &costs, share, true);
            let ok = matches!(&r, Ok((d, _)) if d.is_none_or(|d| d.allowed));
            rates = Some(r);
            ok
        };
        Self::nest(&limited, &mut concurrency, &mut leases, &mut inner);
        // The levels below one that had no lease free were not asked: they are told,
        // taking nothing, so the answer says when each level frees up.
        for (l, c, fp) in &limited {
            if concurrency[*l].is_none() {
                concurrency[*l] = Some(c.peek(fp));
            }
        }
        // Not run (a level had no lease free): the rate quotas are told, charging nothing.
        let (rates, parts) = match rates {
            Some(r) => r?,
            None => self.check_rates(&keys, &quota_keys, &costs, share, false)?,
        };
        let o = self.outcome(rates, parts, concurrency, leases, now, true);
        self.count_class(class, &o);
        Ok(o)
    }

    /// Takes the leases of `limited` (level, limit, node) from the first on, each under
    /// its node's lock, and runs `inner` inside the last one: a lease is taken only if
    /// every deeper one was and `inner` agreed. Fills each level's decision and lease.
    fn nest(
        limited: &[(usize, &Concurrency, Fingerprint)],
        decisions: &mut [Option<Decision>],
        leases: &mut [Option<u64>],
        inner: &mut dyn FnMut() -> bool,
    ) -> bool {
        let Some(((level, c, fp), rest)) = limited.split_first() else {
            return inner();
        };
        let (lease, d, _) = c.acquire_if(fp, || {
            let ok = Self::nest(rest, decisions, leases, inner);
            (ok, ())
        });
        decisions[*level] = Some(d);
        leases[*level] = lease;
        lease.is_some()
    }

    /// The rate quotas' combined decision (None when there is none) and each one's.
    fn check_rates(
        &self,
        keys: &[Fingerprint],
        quota_keys: &[Fingerprint],
        costs: &[u64],
        share: Share,
        charge: bool,
    ) -> Result<(Option<Decision>, Vec<Decision>)> {
        match &self.parts {
            Parts::InProcess(group) => {
                if group.is_empty() {
                    return Ok((None, Vec::new()));
                }
                let mut each = Vec::with_capacity(keys.len());
                let step = |q: &Quota, state, now, cost| step_share(q, state, now, cost, share);
                let d = group.check_with(|i| keys[i], costs, charge, Some(&mut each), step);
                Ok((Some(d), each))
            }
            Parts::SharedMemory { table, parts } => {
                self.check_shared(table, parts, keys, quota_keys, costs, share, charge)
            }
        }
    }

    /// The rate quotas in a shared-memory store, as one transaction.
    #[allow(clippy::too_many_arguments)]
    fn check_shared(
        &self,
        table: &ShmTable,
        parts: &[StoredQuota],
        keys: &[Fingerprint],
        quota_keys: &[Fingerprint],
        costs: &[u64],
        share: Share,
        charge: bool,
    ) -> Result<(Option<Decision>, Vec<Decision>)> {
        let mut txn = table.transaction()?;
        // Read under the lock: checks are then ordered in time as they are by the lock.
        let now = self.clock.now();
        let mut stepped = self.step_shared(&txn, parts, keys, quota_keys, costs, share, charge, now);
        if !txn.write(&stepped.writes, now) {
            // A node new to the store found no room: nothing was written.
            stepped.refuse_full();
        }
        Ok((stepped.decision, stepped.each))
    }

    /// Steps the rate quotas of a call inside `txn`, writing nothing yet.
    #[allow(clippy::too_many_arguments)]
    fn step_shared(
        &self,
        txn: &Transaction<'_>,
        parts: &[StoredQuota],
        keys: &[Fingerprint],
        quota_keys: &[Fingerprint],
        costs: &[u64],
        share: Share,
        charge: bool,
        now: u64,
    ) -> Stepped {
        let shadow = self.shadow();
        let mut steps: Vec<(Option<State>, State, Decision, Quota)> = Vec::with_capacity(parts.len());
        let mut whole: Option<Decision> = None;
        for (i, p) in parts.iter().enumerate() {
            let state = txn.read(&keys[i]);
            let (quota, _) = p.quota_for(txn.read(&quota_keys[i]));
            let (next, d) = step_share(&quota, state.unwrap_or(0), now, costs[i], share);
            let effective = if !d.allowed && shadow { d.shadow_admitted() } else { d };
            whole = Some(whole.map_or(effective, |w| fold(w, &effective)));
            if charge {
                p.counters.count_check(d, shadow);
            }
            steps.push((state, next, d, quota));
        }
        let each: Vec<Decision> = steps.iter().map(|s| s.2).collect();
        let decision = whole.map(finish);
        let mut writes = Vec::new();
        if charge && decision.is_some_and(|d| d.allowed) {
            writes = steps
                .iter()
                .enumerate()
                .filter(|(_, (state, next, d, quota))| d.allowed && (state.is_some() || !quota.is_fresh(*next, now)))
                .map(|(i, (_, next, _, _))| Write::Set(keys[i], *next))
                .collect();
        }
        let i = steps.iter().position(|s| s.0.is_none() && s.2.allowed).unwrap_or(0);
        let full = steps.get(i).map(|s| (i, s.3.full()));
        Stepped { decision, each, writes, full }
    }

    /// A reservation (`take`) or a peek in a shared-memory store: the leases of every
    /// level with a concurrency limit and the rate quotas, decided and written as one
    /// transaction. As in this process, the rate quotas are charged only if every level
    /// has a lease free, and the leases are taken only if the rate quotas admit.
    #[allow(clippy::too_many_arguments)]
    fn reserve_shared(
        &self,
        table: &ShmTable,
        parts: &[StoredQuota],
        path: &Path,
        keys: &[Fingerprint],
        quota_keys: &[Fingerprint],
        costs: &[u64],
        share: Share,
        take: bool,
    ) -> Result<Outcome> {
        let n = self.levels.len();
        let nodes = Self::shared_nodes(table, path);
        let mut txn = table.transaction()?;
        let now = self.clock.now();
        let mut concurrency = vec![None; n];
        let mut held: Vec<Option<Held>> = vec![None; n];
        for (l, level) in self.levels.iter().enumerate() {
            if let Some(leases) = &level.shared_leases {
                let h = leases.read(&txn, &nodes[l], now);
                concurrency[l] = Some(leases.decide(&h, now));
                held[l] = Some(h);
            }
        }
        let free = concurrency.iter().flatten().all(|d| d.allowed);
        let mut stepped = self.step_shared(&txn, parts, keys, quota_keys, costs, share, take && free, now);
        let mut leases = vec![None; n];
        if take && free && stepped.decision.is_none_or(|d| d.allowed) {
            for (l, level) in self.levels.iter().enumerate() {
                if let (Some(shared), Some(h)) = (&level.shared_leases, &held[l]) {
                    leases[l] = Some(shared.take(h, &nodes[l], now, &mut stepped.writes));
                }
            }
            if !txn.write(&stepped.writes, now) {
                // No room in the store for a key to write: nothing was written.
                leases = vec![None; n];
                if stepped.full.is_some() {
                    stepped.refuse_full();
                } else if let Some(l) = held.iter().position(Option::is_some) {
                    let shared = self.levels[l].shared_leases.as_ref().expect("a level with leases");
                    concurrency[l] = Some(shared.full(held[l].as_ref().expect("read above")));
                }
            }
            for (l, id) in leases.iter().enumerate() {
                if let Some(id) = id {
                    self.levels[l].remember(*id, nodes[l], now, now.saturating_add(self.lease_ttl_ns));
                }
            }
        }
        drop(txn);
        let charged_at = if take { now } else { 0 };
        Ok(self.outcome(stepped.decision, stepped.each, concurrency, leases, charged_at, take))
    }

    /// Counts a call's outcome in its class's counters.
    fn count_class(&self, class: Option<usize>, o: &Outcome) {
        if let Some(c) = class {
            let real = Decision { allowed: o.allowed && !o.shadow, ..o.decision };
            self.classes[c].counters.count_check(real, o.shadow);
        }
    }

    /// The outcome of decisions made elsewhere (by the Redis script): each part's and
    /// each level's concurrency decision, combined as a check here combines them (a
    /// part's denial admitted in `shadow` mode). Not counted.
    pub fn combine(&self, parts: Vec<Decision>, concurrency: Vec<Option<Decision>>, shadow: bool) -> Result<Outcome> {
        if parts.len() != self.part_of.len() || concurrency.len() != self.levels.len() {
            return Err(Error::InvalidArgument(format!(
                "expected {} quota decisions and {} concurrency decisions, got {} and {}",
                self.part_of.len(),
                self.levels.len(),
                parts.len(),
                concurrency.len()
            )));
        }
        let rates = parts
            .iter()
            .map(|d| if !d.allowed && shadow { d.shadow_admitted() } else { *d })
            .reduce(|w, d| fold(w, &d));
        let leases = vec![None; self.levels.len()];
        Ok(self.outcome(rates.map(finish), parts, concurrency, leases, 0, false))
    }

    fn outcome(
        &self,
        rates: Option<Decision>,
        parts: Vec<Decision>,
        concurrency: Vec<Option<Decision>>,
        leases: Vec<Option<u64>>,
        charged_at: u64,
        count: bool,
    ) -> Outcome {
        let mut all: Option<Decision> = rates;
        for d in concurrency.iter().flatten() {
            all = Some(all.map_or(*d, |w| fold(w, d)));
        }
        // A hierarchy with concurrency limits only, checked without a lease: nothing limits.
        let decision = finish(all.unwrap_or(Decision {
            allowed: true,
            limit: u64::MAX,
            remaining: u64::MAX,
            reset_after: 0,
            retry_after: Some(0),
            delay: 0,
        }));
        let refused = self.refusal(&parts, &concurrency);
        // Admitted although a part said no: that part is in shadow mode.
        let shadow = decision.allowed && parts.iter().any(|d| !d.allowed);
        if count {
            // Counted as the limiters count: a shadow admission is a denial and a shadow denial.
            self.counters.count_check(Decision { allowed: decision.allowed && !shadow, ..decision }, shadow);
            if !decision.allowed || shadow {
                if let Some(r) = refused {
                    self.refused_by[r.level].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Outcome {
            allowed: decision.allowed,
            decision,
            shadow,
            parts,
            concurrency,
            leases,
            refused: if decision.allowed && !shadow { None } else { refused },
            charged_at,
        }
    }

    /// Each level's decision: its rate quotas' and its concurrency limit's combined
    /// (None for a level with nothing decided, such as a concurrency-only level checked
    /// without a lease).
    pub fn level_decisions(&self, o: &Outcome) -> Vec<Option<Decision>> {
        self.levels
            .iter()
            .enumerate()
            .map(|(l, level)| {
                let own = level.parts.iter().filter_map(|&p| o.parts.get(p)).chain(o.concurrency[l].as_ref());
                own.fold(None, |w: Option<Decision>, d| Some(w.map_or(*d, |w| fold(w, d)))).map(finish)
            })
            .collect()
    }

    /// The quota that refused: the longest `retry_after` (never is longest), the highest
    /// level of those tied; concurrency after the rate quotas of its level.
    fn refusal(&self, parts: &[Decision], concurrency: &[Option<Decision>]) -> Option<Refusal> {
        let mut best: Option<(Refusal, Option<u64>)> = None;
        let mut consider = |r: Refusal, d: &Decision| {
            if d.allowed {
                return;
            }
            let longer = match (&best, d.retry_after) {
                (None, _) => true,
                (Some((_, None)), _) => false,
                (Some(_), None) => true,
                (Some((_, Some(b))), Some(a)) => a > *b,
            };
            if longer {
                best = Some((r, d.retry_after));
            }
        };
        for (l, level) in self.levels.iter().enumerate() {
            for &p in &level.parts {
                if let Some(d) = parts.get(p) {
                    consider(Refusal { level: l, unit: Some(self.part_of[p].1) }, d);
                }
            }
            if let Some(d) = &concurrency[l] {
                consider(Refusal { level: l, unit: None }, d);
            }
        }
        best.map(|b| b.0)
    }

    /// True when a reservation charged at `charged_at` has outlived `lease_ttl`: it stands
    /// as charged.
    pub fn expired(&self, charged_at: u64) -> bool {
        self.clock.now() > charged_at.saturating_add(self.lease_ttl_ns)
    }

    /// Charges (positive) or refunds (negative) `deltas` on every node of `path` for a
    /// call charged at `charged_at`. A charge is never lost in this process (a node the
    /// store has no room for is tracked anyway).
    pub fn adjust(&self, path: &Path, deltas: Deltas, charged_at: u64) -> Result<()> {
        self.check_path(path)?;
        if deltas == Deltas::default() {
            return Ok(());
        }
        let (keys, quota_keys) = (self.keys(path), self.quota_keys(path));
        let by_part: Vec<i64> = self.part_of.iter().map(|&(_, u)| deltas.of(u)).collect();
        match &self.parts {
            Parts::InProcess(group) => group.adjust_keys(|i| keys[i], &by_part, charged_at),
            Parts::SharedMemory { table, parts } => {
                let mut txn = table.transaction()?;
                let now = self.clock.now();
                let (writes, tracked) = Self::adjust_writes(&txn, parts, &keys, &quota_keys, &by_part, charged_at, now);
                // With no room for a new node, the nodes already tracked are still settled.
                if !txn.write(&writes, now) {
                    txn.write(&tracked, now);
                }
            }
        }
        Ok(())
    }

    /// The writes adjusting each part by `by_part` in a shared-memory store, and those of
    /// them that need no room (the nodes the store tracks already).
    fn adjust_writes(
        txn: &Transaction<'_>,
        parts: &[StoredQuota],
        keys: &[Fingerprint],
        quota_keys: &[Fingerprint],
        by_part: &[i64],
        charged_at: u64,
        now: u64,
    ) -> (Vec<Write>, Vec<Write>) {
        let mut writes: Vec<Write> = Vec::new();
        let mut tracked: Vec<Write> = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if by_part[i] == 0 {
                continue;
            }
            let state = txn.read(&keys[i]);
            let (quota, _) = p.quota_for(txn.read(&quota_keys[i]));
            let next = quota.adjust(state.unwrap_or(0), now, by_part[i], charged_at);
            if state.is_some() {
                tracked.push(Write::Set(keys[i], next));
                writes.push(Write::Set(keys[i], next));
            } else if !quota.is_fresh(next, now) {
                writes.push(Write::Set(keys[i], next));
            }
        }
        (writes, tracked)
    }

    /// The writes ending the shared-memory leases of a reservation (by level) at the
    /// nodes of `path`; how many were still held.
    fn release_writes(
        &self,
        txn: &Transaction<'_>,
        table: &ShmTable,
        path: &Path,
        leases: &[Option<u64>],
        now: u64,
        writes: &mut Vec<Write>,
    ) -> usize {
        let mut nodes: Option<Vec<Fingerprint>> = None;
        let mut released = 0;
        for (l, level) in self.levels.iter().enumerate() {
            if let (Some(shared), Some(Some(id))) = (&level.shared_leases, leases.get(l)) {
                let nodes = nodes.get_or_insert_with(|| Self::shared_nodes(table, path));
                released += shared.release(txn, &nodes[l], *id, now, writes) as usize;
                level.forget(*id);
            }
        }
        released
    }

    /// Ends a reservation charged at `charged_at`: adjusts it by `deltas` and ends its
    /// leases. Settling at the actual count is `tokens = actual - estimate`; cancelling
    /// refunds it all (`requests = -1`, `tokens = -estimate`...). False, doing nothing,
    /// once the reservation has expired: it stands as charged.
    pub fn settle(&self, path: &Path, deltas: Deltas, charged_at: u64, leases: &[Option<u64>]) -> Result<bool> {
        self.check_path(path)?;
        if self.expired(charged_at) {
            // Its leases have ended with it.
            for (level, id) in self.levels.iter().zip(leases) {
                if let Some(id) = id {
                    level.forget(*id);
                }
            }
            return Ok(false);
        }
        if let Parts::SharedMemory { table, parts } = &self.parts {
            // The charge and the end of the leases as one transaction.
            let (keys, quota_keys) = (self.keys(path), self.quota_keys(path));
            let by_part: Vec<i64> = self.part_of.iter().map(|&(_, u)| deltas.of(u)).collect();
            let mut txn = table.transaction()?;
            let now = self.clock.now();
            let (mut writes, mut tracked) =
                Self::adjust_writes(&txn, parts, &keys, &quota_keys, &by_part, charged_at, now);
            let mut ends = Vec::new();
            self.release_writes(&txn, table, path, leases, now, &mut ends);
            writes.extend_from_slice(&ends);
            tracked.extend_from_slice(&ends);
            if !txn.write(&writes, now) {
                txn.write(&tracked, now);
            }
            return Ok(true);
        }
        self.adjust(path, deltas, charged_at)?;
        self.release(path, leases)?;
        Ok(true)
    }

    /// Ends the leases of a reservation (by level); how many were still held.
    pub fn release(&self, path: &Path, leases: &[Option<u64>]) -> Result<usize> {
        self.check_path(path)?;
        if let Parts::SharedMemory { table, .. } = &self.parts {
            let mut txn = table.transaction()?;
            let now = self.clock.now();
            let mut writes = Vec::new();
            let released = self.release_writes(&txn, table, path, leases, now, &mut writes);
            // Removals and updates of tracked keys need no room.
            txn.write(&writes, now);
            return Ok(released);
        }
        let mut released = 0;
        for (l, level) in self.levels.iter().enumerate() {
            if let (Some(c), Some(Some(id))) = (&level.concurrency, leases.get(l)) {
                released += c.release(&Self::process_key(path, l), *id) as usize;
            }
        }
        Ok(released)
    }

    /// Puts one node (not the nodes below it) back to its fresh state, its leases ended.
    pub fn reset(&self, node: &Path) -> Result<()> {
        let level = self.node_level(node)?;
        let keys = self.keys(node);
        let level_parts = &self.levels[level].parts;
        match &self.parts {
            Parts::InProcess(group) => {
                for &p in level_parts {
                    group.parts()[p].reset(&keys[p]);
                }
            }
            Parts::SharedMemory { table, .. } => {
                let mut txn = table.transaction()?;
                let mut removed: Vec<Fingerprint> = level_parts.iter().map(|&p| keys[p]).collect();
                if let Some(shared) = &self.levels[level].shared_leases {
                    // Its lease slots, then the key that says how many there are.
                    let fp = Self::shared_nodes(table, node)[level];
                    removed.extend(shared.keys(&txn, &fp));
                    self.levels[level].mine.lock().retain(|_, (node, _)| *node != fp);
                }
                let now = self.clock.now();
                for chunk in removed.chunks(MAX_WRITES) {
                    let writes: Vec<Write> = chunk.iter().map(|&k| Write::Remove(k)).collect();
                    txn.write(&writes, now);
                }
            }
        }
        if let Some(c) = &self.levels[level].concurrency {
            c.reset(&Self::process_key(node, level));
        }
        Ok(())
    }

    fn in_process(&self, what: &str) -> Result<&Group> {
        match &self.parts {
            Parts::InProcess(group) => Ok(group),
            Parts::SharedMemory { .. } => Err(Error::InvalidArgument(format!(
                "{what} is not available with a SharedMemoryStore: a level's quotas are part of its nodes' identity \
                 in the store; build the Hierarchy with the new quotas in every process (set_quota gives one node \
                 quotas of its own)"
            ))),
        }
    }

    /// The changes `rates` and `concurrency` make to `level`: each given quota must exist
    /// there.
    fn changes(&self, level: usize, rates: &Rates, concurrency: Option<u64>) -> Result<Vec<(usize, Quota)>> {
        let name = &self.levels[level].name;
        let mut out = Vec::new();
        for unit in Unit::ALL {
            if let Some(rate) = rates[unit as usize] {
                let Some(p) = self.find_part(level, unit) else {
                    return Err(Error::InvalidArgument(format!(
                        "level {name:?} has no {} quota to change",
                        unit.name()
                    )));
                };
                out.push((p, bucket(rate)?));
            }
        }
        let limited = self.levels[level].concurrency.is_some() || self.levels[level].shared_leases.is_some();
        if concurrency.is_some() && !limited {
            return Err(Error::InvalidArgument(format!("level {name:?} has no concurrency limit to change")));
        }
        if out.is_empty() && concurrency.is_none() {
            return Err(Error::InvalidArgument(
                "give at least one of requests, tokens, daily_tokens, spend, concurrency".into(),
            ));
        }
        Ok(out)
    }

    /// Gives one node quotas of its own (those given; the others stay), keeping what it
    /// has used. In a shared-memory store the node's own quotas are kept in the store (for
    /// every process, until cleared) and the change is one transaction.
    pub fn set_quota(&self, node: &Path, rates: Rates, concurrency: Option<u64>) -> Result<()> {
        let level = self.node_level(node)?;
        let changes = self.changes(level, &rates, concurrency)?;
        let keys = self.keys(node);
        let group = match &self.parts {
            Parts::InProcess(group) => group,
            Parts::SharedMemory { table, parts } => {
                let quota_keys = self.quota_keys(node);
                for (_, quota) in &changes {
                    crate::limiter::check_store_ttl(quota, table)?;
                }
                let mut txn = table.transaction()?;
                let now = self.clock.now();
                let mut writes = Vec::new();
                for (p, quota) in changes {
                    let (old, _) = parts[p].quota_for(txn.read(&quota_keys[p]));
                    // An unchanged quota keeps the state as it is: converting it would cap
                    // a debt (at two bursts), and a reload of the same config would forgive it.
                    if let (true, Some(state)) = (old != quota, txn.read(&keys[p])) {
                        writes.push(Write::Set(keys[p], old.convert(&quota, state, now)));
                    }
                    writes.push(Write::Pin(quota_keys[p], encode_quota(&quota)));
                }
                if let (Some(n), Some(shared)) = (concurrency, &self.levels[level].shared_leases) {
                    writes.push(shared.set_own(&Self::shared_nodes(table, node)[level], n)?);
                }
                if !txn.write(&writes, now) {
                    return Err(Error::InvalidArgument(format!(
                        "the shared-memory store {} has no room for this node's quotas",
                        table.path
                    )));
                }
                return Ok(());
            }
        };
        for (p, quota) in changes {
            if Self::unchanged(&group.parts()[p], &keys[p], Some(&quota)).is_none() {
                group.parts()[p].set_quota(&keys[p], quota)?;
            }
        }
        if let (Some(n), Some(c)) = (concurrency, &self.levels[level].concurrency) {
            c.set_quota(&Self::process_key(node, level), n)?;
        }
        Ok(())
    }

    /// In this process, when the node `fp` of `limiter` changes quota (`own`: to a quota
    /// of its own; None: back to the level's) to the one already in force: makes the
    /// change without touching the node's state, and returns whether the node had a
    /// quota of its own. None, changing nothing, when the quota differs (the caller
    /// converts the state). Converting a state to the same quota would cap a debt at two
    /// bursts: a reload of an unchanged config would forgive debts.
    fn unchanged(limiter: &Limiter, fp: &Fingerprint, own: Option<&Quota>) -> Option<bool> {
        let store = limiter.in_process_store()?;
        let mut g = store.lock(fp);
        let q = g.extra_mut();
        let had = q.overrides.contains_key(fp);
        match own {
            Some(quota) if q.for_key(fp) == quota => {
                if !had {
                    let kept = q.default.clone();
                    q.overrides.insert(*fp, kept);
                }
            }
            None if !had || q.overrides.get(fp) == Some(&q.default) => {
                q.overrides.remove(fp);
            }
            _ => return None,
        }
        Some(had)
    }

    /// Puts a node back on its level's quotas; false if it had none of its own.
    pub fn clear_quota(&self, node: &Path) -> Result<bool> {
        let level = self.node_level(node)?;
        let keys = self.keys(node);
        let group = match &self.parts {
            Parts::InProcess(group) => group,
            Parts::SharedMemory { table, parts } => {
                let quota_keys = self.quota_keys(node);
                let mut txn = table.transaction()?;
                let now = self.clock.now();
                let mut writes = Vec::new();
                for &p in &self.levels[level].parts {
                    let (own, is_own) = parts[p].quota_for(txn.read(&quota_keys[p]));
                    if !is_own {
                        continue;
                    }
                    // Back to the same quota: the state stays (see `unchanged`).
                    if let (true, Some(state)) = (own != parts[p].quota, txn.read(&keys[p])) {
                        writes.push(Write::Set(keys[p], own.convert(&parts[p].quota, state, now)));
                    }
                    writes.push(Write::Remove(quota_keys[p]));
                }
                if let Some(shared) = &self.levels[level].shared_leases {
                    writes.extend(shared.clear_own(&txn, &Self::shared_nodes(table, node)[level]));
                }
                // Removals and updates of tracked keys need no room.
                txn.write(&writes, now);
                return Ok(!writes.is_empty());
            }
        };
        let mut any = false;
        for &p in &self.levels[level].parts {
            any |= match Self::unchanged(&group.parts()[p], &keys[p], None) {
                Some(had) => had,
                None => group.parts()[p].clear_quota(&keys[p])?,
            };
        }
        if let Some(c) = &self.levels[level].concurrency {
            any |= c.clear_quota(&Self::process_key(node, level));
        }
        Ok(any)
    }

    /// Changes a level's quotas (nodes with their own keep theirs), keeping usage.
    pub fn set_default(&self, level: usize, rates: Rates, concurrency: Option<u64>) -> Result<()> {
        let group = self.in_process("set_default_quota")?;
        let changes = self.changes(level, &rates, concurrency)?;
        if let (Some(n), Some(c)) = (concurrency, &self.levels[level].concurrency) {
            c.set_max(n)?;
        }
        // An unchanged quota keeps every node's state (see `unchanged`).
        changes
            .into_iter()
            .filter(|(p, quota)| group.parts()[*p].quota() != *quota)
            .try_for_each(|(p, quota)| group.parts()[p].set_default(quota))
    }

    /// The quota in force for part `p` at `node`'s level, and whether it is the node's own.
    pub fn quota_of(&self, node: &Path, p: usize) -> Result<(Quota, bool)> {
        self.node_level(node)?;
        let keys = self.keys(node);
        Ok(match &self.parts {
            Parts::InProcess(group) => group.parts()[p].quota_of(&keys[p]),
            Parts::SharedMemory { table, parts } => {
                let own = table.transaction()?.read(&self.quota_keys(node)[p]);
                parts[p].quota_for(own)
            }
        })
    }

    /// Part `p`'s quota for nodes without one of their own.
    pub fn default_quota(&self, p: usize) -> Quota {
        match &self.parts {
            Parts::InProcess(group) => group.parts()[p].quota(),
            Parts::SharedMemory { parts, .. } => parts[p].quota.clone(),
        }
    }

    /// The concurrency limit in force at `node`, and whether it is the node's own.
    pub fn concurrency_of(&self, node: &Path) -> Result<Option<(u64, bool)>> {
        let level = self.node_level(node)?;
        if let Some(held) = self.shared_held(node, level)? {
            return Ok(Some((held.limit, held.own)));
        }
        Ok(self.levels[level].concurrency.as_ref().map(|c| c.quota_of(&Self::process_key(node, level))))
    }

    /// The leases of the node of `level` when they live in the shared-memory store.
    fn shared_held(&self, node: &Path, level: usize) -> Result<Option<Held>> {
        match (&self.levels[level].shared_leases, &self.parts) {
            (Some(shared), Parts::SharedMemory { table, .. }) => {
                let txn = table.transaction()?;
                Ok(Some(shared.read(&txn, &Self::shared_nodes(table, node)[level], self.clock.now())))
            }
            _ => Ok(None),
        }
    }

    /// One node's quotas and usage: each of its level's rate quotas, and its leases as
    /// (limit, held).
    pub fn inspect(&self, node: &Path) -> Result<NodeInspection> {
        let level = self.node_level(node)?;
        let keys = self.keys(node);
        let mut out = Vec::new();
        for &p in &self.levels[level].parts {
            let unit = self.part_of[p].1;
            let inspection = match &self.parts {
                Parts::InProcess(group) => group.parts()[p].inspect(&keys[p]),
                Parts::SharedMemory { table, parts } => {
                    let txn = table.transaction()?;
                    let (q, own_quota) = parts[p].quota_for(txn.read(&self.quota_keys(node)[p]));
                    let now = self.clock.now();
                    let state = txn.read(&keys[p]);
                    let (zero, one) = (q.step(state.unwrap_or(0), now, 0).1, q.step(state.unwrap_or(0), now, 1).1);
                    Inspection {
                        algorithm: q.kind().name(),
                        rate: Some(q.rate()),
                        limit: q.limit(),
                        own_quota,
                        tracked: state.is_some(),
                        shadow: self.shadow(),
                        ..Inspection::from_peeks(&zero, &one)
                    }
                }
            };
            out.push((unit, inspection));
        }
        let leases = match self.shared_held(node, level)? {
            Some(held) => Some((held.limit, (held.live.len() as u64).min(held.limit))),
            None => self.levels[level].concurrency.as_ref().map(|c| c.in_flight(&Self::process_key(node, level))),
        };
        Ok((out, leases))
    }

    /// Evicts idle nodes; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        for level in &self.levels {
            level.held_here(now);
        }
        let leases: usize = self.levels.iter().filter_map(|l| l.concurrency.as_ref()).map(|c| c.sweep()).sum();
        match &self.parts {
            Parts::InProcess(group) => group.parts().iter().map(|p| p.sweep()).sum::<usize>() + leases,
            Parts::SharedMemory { table, .. } => table.sweep(self.clock.now()) + leases,
        }
    }

    pub fn stats(&self) -> HierarchyStats {
        let now = self.clock.now();
        // The store's keys, counted once: a count reads every slot of the table.
        let stored = match &self.parts {
            Parts::SharedMemory { table, .. } => table.count(),
            Parts::InProcess(_) => 0,
        };
        let parts = match &self.parts {
            Parts::InProcess(group) => group.parts().iter().map(|p| p.stats()).collect(),
            Parts::SharedMemory { parts, .. } => {
                parts.iter().map(|p| Stats { counters: p.counters.get(), keys: stored, ..Stats::default() }).collect()
            }
        };
        HierarchyStats {
            counters: self.counters.get(),
            refused_by: self.refused_by.iter().map(|n| n.load(Ordering::Relaxed)).collect(),
            parts,
            concurrency: self
                .levels
                .iter()
                .map(|l| match (&l.concurrency, &l.shared_leases, &self.parts) {
                    (Some(c), _, _) => Some(c.stats()),
                    // Leases in the store are keys of the store, counted with the others; the
                    // store keeps no count of a level's leases, so `held` is this process's.
                    (None, Some(_), _) => {
                        Some(ConcurrencyStats { keys: stored, held: l.held_here(now), ..ConcurrencyStats::default() })
                    }
                    _ => None,
                })
                .collect(),
            classes: self.classes.iter().map(|c| (c.name.clone(), c.share, c.counters.get())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
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
            assert_eq!(
                (stats.counters.allowed, stats.counters.denied, stats.refused_by.clone()),
                (6, 4, vec![0, 2, 2])
            );
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
        assert_eq!(
            b.stats().concurrency.iter().map(|c| c.map(|c| c.held)).collect::<Vec<_>>(),
            [None, Some(0), Some(0)]
        );
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
        assert_eq!(
            other.check(&k, one(1), true).unwrap().refused,
            Some(Refusal { level: 0, unit: Some(Unit::Requests) })
        );
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
            let classes =
                vec![("interactive".to_string(), Share::ALL), ("batch".to_string(), Share::new(0.7).unwrap())];
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
}
