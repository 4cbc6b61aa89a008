//! A token budget in a shared-memory store: a one-level [`Hierarchy`] (the level of
//! keys) whose rate quotas are the budget's limits and whose concurrency leases live in
//! the store too. Every reserve, settle, cancel and quota change is one transaction of
//! the store (its robust lock and redo journal), so the processes of a host share each
//! key's budget exactly, and a process killed at any point leaves each step done in full
//! or not at all. A lease whose holder died ends with its `lease_ttl`.

use super::{check_new, no_limit_to_change, none_given, BudgetInspection, BudgetStats, Limit, Rates, Reserved};
use crate::clock::Clock;
use crate::error::Result;
use crate::hierarchy::{Amounts, Deltas, Hierarchy, LevelSpec, Outcome, Path, Unit};
use crate::rate::Rate;
use crate::store::shm::ShmTable;
use std::sync::Arc;

/// What a budget's limit counts in the hierarchy.
fn unit(limit: Limit) -> Unit {
    match limit {
        Limit::Requests => Unit::Requests,
        Limit::Tokens => Unit::Tokens,
        Limit::DailyTokens => Unit::DailyTokens,
    }
}

/// A token budget kept in a shared-memory store (see the module's documentation).
pub struct SharedBudget {
    hierarchy: Hierarchy,
    /// The hierarchy's part of each limit that is set.
    parts: [Option<usize>; 3],
    concurrency: Option<u64>,
}

impl SharedBudget {
    pub fn new(
        rates: Rates,
        concurrency: Option<u64>,
        table: Arc<ShmTable>,
        name: &str,
        clock: Clock,
        lease_ttl_secs: f64,
    ) -> Result<SharedBudget> {
        check_new(&rates, concurrency, lease_ttl_secs)?;
        let level = LevelSpec { name: "key".into(), rates: [rates[0], rates[1], rates[2], None], concurrency };
        // A budget's keys never meet a Hierarchy's: its name says what it is.
        let name = format!("token-limiter|{name}");
        let hierarchy = Hierarchy::new(vec![level], Some(table), &name, clock, 0.0, None, lease_ttl_secs)?;
        let parts = Limit::ALL.map(|l| hierarchy.find_part(0, unit(l)));
        Ok(SharedBudget { hierarchy, parts, concurrency })
    }

    fn reserved(&self, o: Outcome) -> Reserved {
        Reserved {
            allowed: o.allowed,
            decision: o.decision,
            shadow: o.shadow,
            limits: self.parts.map(|p| p.and_then(|p| o.parts.get(p).copied())),
            concurrency: o.concurrency[0],
            lease: o.leases[0],
            charged_at: o.charged_at,
        }
    }

    fn amounts(tokens: u64) -> Amounts {
        Amounts { requests: 1, tokens, ..Amounts::default() }
    }

    pub fn reserve(&self, path: &Path, tokens: u64) -> Result<Reserved> {
        Ok(self.reserved(self.hierarchy.reserve(path, Self::amounts(tokens))?))
    }

    pub fn peek(&self, path: &Path, tokens: u64) -> Result<Reserved> {
        Ok(self.reserved(self.hierarchy.peek(path, Self::amounts(tokens))?))
    }

    pub fn expired(&self, charged_at: u64) -> bool {
        self.hierarchy.expired(charged_at)
    }

    pub fn adjust(&self, path: &Path, tokens: i64, charged_at: u64, requests: i64) -> Result<()> {
        self.hierarchy.adjust(path, Deltas { requests, tokens, spend: 0 }, charged_at)
    }

    pub fn release(&self, path: &Path, lease: u64) -> Result<bool> {
        Ok(self.hierarchy.release(path, &[Some(lease)])? > 0)
    }

    pub fn settle(&self, path: &Path, tokens: i64, requests: i64, charged_at: u64, lease: Option<u64>) -> Result<bool> {
        self.hierarchy.settle(path, Deltas { requests, tokens, spend: 0 }, charged_at, &[lease])
    }

    pub fn reset(&self, path: &Path) -> Result<()> {
        self.hierarchy.reset(path)
    }

    pub fn sweep(&self) -> usize {
        self.hierarchy.sweep()
    }

    pub fn set_quota(&self, path: &Path, rates: Rates) -> Result<()> {
        for limit in Limit::ALL {
            if rates[limit as usize].is_some() && self.parts[limit as usize].is_none() {
                return Err(no_limit_to_change(limit));
            }
        }
        if rates.iter().all(Option::is_none) {
            return Err(none_given());
        }
        self.hierarchy.set_quota(path, [rates[0], rates[1], rates[2], None], None)
    }

    pub fn clear_quota(&self, path: &Path) -> Result<bool> {
        self.hierarchy.clear_quota(path)
    }

    pub fn shadow(&self) -> bool {
        self.hierarchy.shadow()
    }

    pub fn set_shadow(&self, on: bool) {
        self.hierarchy.set_shadow(on)
    }

    pub fn rate(&self, limit: Limit) -> Option<Rate> {
        self.parts[limit as usize].map(|p| self.hierarchy.default_quota(p).rate())
    }

    pub fn concurrency_max(&self) -> Option<u64> {
        self.concurrency
    }

    pub fn clock(&self) -> &Clock {
        self.hierarchy.clock()
    }

    pub fn lease_ttl_ns(&self) -> u64 {
        self.hierarchy.lease_ttl_ns()
    }

    pub fn store_path(&self) -> &str {
        self.hierarchy.store_path().unwrap_or_default()
    }

    pub fn stats(&self) -> BudgetStats {
        let s = self.hierarchy.stats();
        BudgetStats {
            limits: self.parts.map(|p| p.and_then(|p| s.parts.get(p).cloned())),
            concurrency_keys: s.concurrency[0].map(|c| c.keys),
        }
    }

    pub fn inspect(&self, path: &Path) -> Result<BudgetInspection> {
        let (quotas, leases) = self.hierarchy.inspect(path)?;
        let mut out = BudgetInspection { concurrency: leases, ..BudgetInspection::default() };
        for (u, inspection) in quotas {
            if let Some(limit) = Limit::ALL.into_iter().find(|&l| unit(l) == u) {
                out.limits[limit as usize] = Some(inspection);
            }
        }
        Ok(out)
    }
}
