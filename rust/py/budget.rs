//! The native half of `TokenLimiter` (see `crate::budget`): request, token and
//! daily-token buckets plus an optional concurrency limit, reserved together and settled
//! later, in this process or in a `SharedMemoryStore`. The Python class
//! (`nexus_limits.budget`) wraps the results in a `Reservation`.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::report::{inspection_dict, process_key_names, stats_dict, top_rows};
use super::shm::SharedMemoryStore;
use super::types::{Decision, ManualClock, Rate};
use crate::budget::{Budget, BudgetKey, Limit, Rates, Reserved, Tally};
use crate::key::Fingerprint;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyString};
use std::cell::RefCell;
use std::sync::Arc;

#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct TokenLimiter {
    inner: Arc<Budget>,
    clock: Option<Py<ManualClock>>,
}

/// A reservation's answer, by name: what `nexus_limits.budget.Reservation` is built from
/// (the Redis backends give the same fields in a `nexus_limits.budget.Reserved`).
#[pyclass(frozen, get_all, module = "nexus_limits._core", name = "Reserved")]
pub struct Answer {
    /// A charge was made that the reservation must finish (false when refused, and for
    /// a peek).
    held: bool,
    /// Every limit's decision combined.
    decision: Py<Decision>,
    requests: Option<Py<Decision>>,
    tokens: Option<Py<Decision>>,
    daily_tokens: Option<Py<Decision>>,
    concurrency: Option<Py<Decision>>,
    /// The concurrency lease taken, if any.
    lease: Option<u64>,
    /// When the charge was made (the limiter's clock, ns); None for a peek.
    charged_at: Option<u64>,
}

/// (combined, requests, tokens, daily_tokens, concurrency).
type PeekedTuple = (Decision, Option<Decision>, Option<Decision>, Option<Decision>, Option<Decision>);

fn given<'a, 'py>(v: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    v.filter(|x| !x.is_none())
}

/// `daily_tokens`: a rate, or an int of tokens per day.
fn daily_rate(value: &Bound<'_, PyAny>) -> PyResult<crate::rate::Rate> {
    if value.is_instance_of::<PyInt>() {
        let n = args::count("daily_tokens", value)?;
        return Ok(crate::rate::Rate::new(n, 86_400 * crate::clock::NANOS)?);
    }
    args::rate(value)
}

fn rates(
    requests: Option<&Bound<'_, PyAny>>,
    tokens: Option<&Bound<'_, PyAny>>,
    daily_tokens: Option<&Bound<'_, PyAny>>,
) -> PyResult<Rates> {
    Ok([
        given(requests).map(args::rate).transpose()?,
        given(tokens).map(args::rate).transpose()?,
        given(daily_tokens).map(daily_rate).transpose()?,
    ])
}

impl TokenLimiter {
    fn answer(py: Python<'_>, r: &Reserved, take: bool) -> PyResult<Answer> {
        let each = |limit: Limit| Self::decision(r, limit).map(|d| Py::new(py, d)).transpose();
        Ok(Answer {
            held: take && r.allowed,
            decision: Py::new(py, Self::combined(r))?,
            requests: each(Limit::Requests)?,
            tokens: each(Limit::Tokens)?,
            daily_tokens: each(Limit::DailyTokens)?,
            concurrency: r.concurrency.map(|d| Py::new(py, Decision::from_core(d))).transpose()?,
            lease: if take { r.lease } else { None },
            charged_at: take.then_some(r.charged_at),
        })
    }

    /// The key as the budget takes it (in a store: named, not fingerprinted here).
    fn key(&self, key: &Bound<'_, PyAny>) -> PyResult<BudgetKey> {
        if !self.inner.is_shared() {
            return Ok(BudgetKey::InProcess(args::key_fp(key)?));
        }
        let out = RefCell::new(None);
        args::key_fp_by(key, |kind, bytes| {
            *out.borrow_mut() = Some(self.inner.key(kind, bytes));
            Fingerprint::default()
        })?;
        Ok(out.into_inner().expect("a key was read"))
    }

    fn decision(r: &Reserved, limit: Limit) -> Option<Decision> {
        r.limits[limit as usize].map(Decision::from_core)
    }

    fn combined(r: &Reserved) -> Decision {
        let mut d = Decision::from_core(r.decision);
        d.shadow = r.shadow;
        d
    }
}

#[pymethods]
impl TokenLimiter {
    #[new]
    #[pyo3(signature = (requests=None, tokens=None, daily_tokens=None, concurrency=None, clock=None, lease_ttl=None, ttl=None, max_keys=None, shadow=None, store=None, name=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        requests: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        daily_tokens: Option<&Bound<'_, PyAny>>,
        concurrency: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        lease_ttl: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
        name: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (core_clock, clock) = args::clock(clock)?;
        let ttl = given(ttl).map(|v| args::seconds("ttl", v)).transpose()?;
        let lease_ttl = lease_ttl.map(|v| args::seconds("lease_ttl", v)).transpose()?.unwrap_or(600.0);
        let max_keys = args::max_keys(max_keys)?;
        let rates = rates(requests, tokens, daily_tokens)?;
        let concurrency = given(concurrency).map(|v| args::count("concurrency", v)).transpose()?;
        let name = match given(name) {
            None => None,
            Some(n) => Some(n.cast::<PyString>().map_err(|_| wrong_type("name", "a str", n))?.to_str()?.to_owned()),
        };
        let inner = match given(store) {
            None => {
                if name.is_some() {
                    return Err(bad_value("name applies with store=: it names the limiter's keys in the store"));
                }
                Budget::new(rates, concurrency, core_clock, ttl.unwrap_or(3600.0), max_keys, lease_ttl)?
            }
            Some(s) => {
                if max_keys.is_some() {
                    return Err(bad_value("max_keys does not apply with store=: the store's capacity bounds the keys"));
                }
                if ttl.is_some() {
                    return Err(bad_value("ttl does not apply with store=: give it to the SharedMemoryStore"));
                }
                let s = s.cast::<SharedMemoryStore>().map_err(|_| wrong_type("store", "a SharedMemoryStore", s))?;
                let table = Arc::clone(&s.get().table);
                Budget::shared(rates, concurrency, table, name.as_deref().unwrap_or(""), core_clock, lease_ttl)?
            }
        };
        if let Some(v) = given(shadow) {
            inner.set_shadow(args::flag("shadow", v)?);
        }
        Ok(TokenLimiter { inner: Arc::new(inner), clock })
    }

    /// Reserves one request and `tokens` tokens for `key` against every limit at once;
    /// with `take=False`, says what a reservation would get, charging nothing and taking
    /// no lease.
    #[pyo3(signature = (key, tokens, take=true))]
    fn _reserve(&self, key: &Bound<'_, PyAny>, tokens: &Bound<'_, PyAny>, take: bool) -> PyResult<Answer> {
        let py = key.py();
        let budget_key = self.key(key)?;
        let tokens = args::tokens(tokens)?;
        let r = if take { self.inner.reserve(&budget_key, tokens)? } else { self.inner.peek(&budget_key, tokens)? };
        Self::answer(py, &r, take)
    }

    /// What `_reserve(key, tokens)` would decide now, charging nothing and taking no
    /// lease, as a tuple: (combined, requests, tokens, daily_tokens, concurrency).
    fn _peek(&self, key: &Bound<'_, PyAny>, tokens: &Bound<'_, PyAny>) -> PyResult<PeekedTuple> {
        let key = self.key(key)?;
        let r = self.inner.peek(&key, args::tokens(tokens)?)?;
        Ok((
            Self::combined(&r),
            Self::decision(&r, Limit::Requests),
            Self::decision(&r, Limit::Tokens),
            Self::decision(&r, Limit::DailyTokens),
            r.concurrency.map(Decision::from_core),
        ))
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) tokens of a reservation made at
    /// `charged_at` (ns) on the token and daily-token limits, and `requests` requests.
    #[pyo3(signature = (key, delta, charged_at, requests=0))]
    fn _adjust(&self, key: &Bound<'_, PyAny>, delta: i64, charged_at: u64, requests: i64) -> PyResult<()> {
        Ok(self.inner.adjust(&self.key(key)?, delta, charged_at, requests)?)
    }

    /// Ends a reservation made at `charged_at` (ns): adjusts its tokens and requests (see
    /// `_adjust`) and ends its lease. False, doing nothing, once it has expired.
    fn _settle(
        &self,
        key: &Bound<'_, PyAny>,
        tokens_delta: i64,
        requests_delta: i64,
        charged_at: u64,
        lease: Option<u64>,
    ) -> PyResult<bool> {
        Ok(self.inner.settle(&self.key(key)?, tokens_delta, requests_delta, charged_at, lease)?)
    }

    /// True when a reservation made at `charged_at` (ns) has outlived `lease_ttl`.
    fn _expired(&self, charged_at: u64) -> bool {
        self.inner.expired(charged_at)
    }

    /// Adds to the token counters reported by `stats()`.
    fn _tally(&self, reserved: u64, settled: u64, refunded: u64) {
        self.inner.count(Tally { reserved, settled, refunded });
    }

    /// Ends the concurrency lease of a reservation; True if it was still held.
    fn _release(&self, key: &Bound<'_, PyAny>, lease: u64) -> PyResult<bool> {
        Ok(self.inner.release(&self.key(key)?, lease)?)
    }

    /// The current time of the limiter's clock, in ns.
    fn _now(&self) -> u64 {
        self.inner.clock().now()
    }

    /// Forgets `key` everywhere (its leases included).
    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.inner.reset(&self.key(key)?)?)
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.sweep())
    }

    /// Gives `key` its own request, token or daily-token quota (rates as in the
    /// constructor), keeping what it has used. Limits not given keep their quota.
    #[pyo3(signature = (key, requests=None, tokens=None, daily_tokens=None))]
    fn set_quota(
        &self,
        key: &Bound<'_, PyAny>,
        requests: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        daily_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let key = self.key(key)?;
        Ok(self.inner.set_quota(&key, rates(requests, tokens, daily_tokens)?)?)
    }

    /// Puts `key` back on the default quotas; False if it had none of its own.
    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.inner.clear_quota(&self.key(key)?)?)
    }

    /// Changes the default quotas (keys with their own keep theirs), keeping usage, and
    /// the concurrency limit (leases held stay held).
    #[pyo3(signature = (requests=None, tokens=None, daily_tokens=None, concurrency=None))]
    fn set_default_quota(
        &self,
        py: Python<'_>,
        requests: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        daily_tokens: Option<&Bound<'_, PyAny>>,
        concurrency: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let concurrency = given(concurrency).map(|v| args::count("concurrency", v)).transpose()?;
        let rates = rates(requests, tokens, daily_tokens)?;
        let inner = Arc::clone(&self.inner);
        Ok(py.detach(move || inner.set_default(rates, concurrency))?)
    }

    /// Counters of each limit: {"requests": {...}, "tokens": {...}, "daily_tokens": {...}}
    /// with the keys of `TokenBucket.stats()`; "concurrency": {"keys": ...} (in a store:
    /// the keys the store holds).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let stats = self.inner.stats();
        for limit in Limit::ALL {
            if let Some(s) = &stats.limits[limit as usize] {
                out.set_item(limit.name(), stats_dict(py, s, false)?)?;
            }
        }
        if let Some(keys) = stats.concurrency_keys {
            let d = PyDict::new(py);
            d.set_item("keys", keys)?;
            out.set_item("concurrency", d)?;
        }
        let t = self.inner.tally();
        out.set_item("tokens_reserved", t.reserved)?;
        out.set_item("tokens_settled", t.settled)?;
        out.set_item("tokens_refunded", t.refunded)?;
        Ok(out)
    }

    /// Each limit's quota and usage for `key` (see `TokenBucket.inspect`).
    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let py = key.py();
        let found = self.inner.inspect(&self.key(key)?)?;
        let out = PyDict::new(py);
        for limit in Limit::ALL {
            if let Some(i) = &found.limits[limit as usize] {
                out.set_item(limit.name(), inspection_dict(key, i)?)?;
            }
        }
        if let Some((limit, in_flight)) = found.concurrency {
            let conc = PyDict::new(py);
            conc.set_item("limit", limit)?;
            conc.set_item("in_flight", in_flight)?;
            out.set_item("concurrency", conc)?;
        }
        Ok(out)
    }

    /// The `n` keys using the largest share of one limit now ("tokens" by default, or
    /// "requests", "daily_tokens"); pass candidate `keys` to get names back. In this
    /// process only.
    #[pyo3(signature = (n=10, keys=None, limit="tokens"))]
    fn top_keys<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        keys: Option<&Bound<'py, PyAny>>,
        limit: &str,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let limit = Limit::parse(limit)?;
        let names = process_key_names(keys)?;
        let inner = Arc::clone(&self.inner);
        let top = py.detach(move || inner.top(limit, n))?;
        top_rows(py, &names, top)
    }

    /// Shadow mode for the request and token limits (concurrency leases stay real).
    #[getter]
    fn shadow(&self) -> bool {
        self.inner.shadow()
    }

    #[setter(shadow)]
    fn shadow_setter(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_shadow(args::flag("shadow", value)?);
        Ok(())
    }

    #[getter]
    fn requests(&self) -> Option<Rate> {
        self.inner.rate(Limit::Requests).map(Rate)
    }

    #[getter]
    fn tokens(&self) -> Option<Rate> {
        self.inner.rate(Limit::Tokens).map(Rate)
    }

    #[getter]
    fn daily_tokens(&self) -> Option<Rate> {
        self.inner.rate(Limit::DailyTokens).map(Rate)
    }

    #[getter]
    fn concurrency(&self) -> Option<u64> {
        self.inner.concurrency_max()
    }

    /// The shared-memory store's file, with `store=` (None in this process).
    #[getter]
    fn store_path(&self) -> Option<String> {
        self.inner.store_path().map(str::to_owned)
    }

    /// Seconds after which an unsettled reservation settles at its estimate (and its
    /// concurrency lease, if any, ends).
    #[getter]
    fn lease_ttl(&self) -> f64 {
        crate::clock::ns_to_secs(self.inner.lease_ttl_ns())
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }
}
