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
mod tests;
