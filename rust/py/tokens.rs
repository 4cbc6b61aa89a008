//! The native half of `TokenLimiter`: request, token and daily-token buckets plus an
//! optional concurrency limit, reserved together in one atomic step and settled later.
//! The Python class (`nexus_limits.budget`) wraps the results in a `Reservation`.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::types::{Decision, ManualClock, Rate};
use crate::algorithms::{combine, Algorithm, Gcra};
use crate::limiter::{self, composite_adjust, composite_check, Limiter};
use pyo3::prelude::*;
use pyo3::types::PyInt;
use std::sync::Arc;

/// Which of the three buckets a part is.
const REQUESTS: usize = 0;
const TOKENS: usize = 1;
const DAILY: usize = 2;

#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct TokenLimiter {
    parts: Vec<Arc<Limiter>>,
    order: Vec<usize>,
    /// For requests, tokens, daily tokens: the index in `parts`, if that limit is set.
    slot: [Option<usize>; 3],
    concurrency: Option<Arc<limiter::Concurrency>>,
    clock: Option<Py<ManualClock>>,
    lease_ttl_ns: u64,
    /// Tokens reserved (admitted estimates), settled (actual counts) and refunded (cancelled estimates).
    tally: [std::sync::atomic::AtomicU64; 3],
}

type Reserved =
    (bool, Decision, Option<Decision>, Option<Decision>, Option<Decision>, Option<Decision>, Option<u64>, u64);
type Peeked = (Decision, Option<Decision>, Option<Decision>, Option<Decision>, Option<Decision>);

fn given<'a, 'py>(v: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    v.filter(|x| !x.is_none())
}

fn daily_rate(value: &Bound<'_, PyAny>) -> PyResult<crate::rate::Rate> {
    if value.is_instance_of::<PyInt>() {
        let n = args::count("daily_tokens", value)?;
        return Ok(crate::rate::Rate::new(n, 86_400 * crate::clock::NANOS)?);
    }
    args::rate(value)
}

impl TokenLimiter {
    fn costs(&self, tokens: u64) -> Vec<u64> {
        let mut costs = vec![0; self.parts.len()];
        for (which, slot) in self.slot.iter().enumerate() {
            if let Some(i) = slot {
                costs[*i] = if which == REQUESTS { 1 } else { tokens };
            }
        }
        costs
    }

    fn check(
        &self,
        fp: &crate::key::Fingerprint,
        tokens: u64,
        charge: bool,
    ) -> Option<(crate::algorithms::Decision, Vec<crate::algorithms::Decision>)> {
        if self.parts.is_empty() {
            return None;
        }
        Some(composite_check(&self.parts, &self.order, fp, &self.costs(tokens), charge))
    }

    fn rate_of(&self, which: usize) -> Option<Rate> {
        self.slot[which].map(|i| Rate(self.parts[i].algo().rate()))
    }

    /// The quota each given limit (requests, tokens, daily_tokens) changes to: its part
    /// index and algorithm. A limit this limiter does not have is an error.
    fn quotas(&self, given_rates: [Option<&Bound<'_, PyAny>>; 3]) -> PyResult<Vec<(usize, Algorithm)>> {
        const NAMES: [&str; 3] = ["requests", "tokens", "daily_tokens"];
        let mut out = Vec::new();
        for (which, value) in given_rates.into_iter().enumerate() {
            let Some(value) = given(value) else { continue };
            let Some(i) = self.slot[which] else {
                return Err(bad_value(format!("this TokenLimiter has no {} limit to change", NAMES[which])));
            };
            let rate = if which == DAILY { daily_rate(value)? } else { args::rate(value)? };
            out.push((i, Algorithm::TokenBucket(Gcra::new(rate, rate.count)?)));
        }
        if out.is_empty() {
            return Err(bad_value("give at least one of requests, tokens, daily_tokens"));
        }
        Ok(out)
    }

    fn set_shadow(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let on = args::flag("shadow", value)?;
        for p in &self.parts {
            p.set_shadow(on);
        }
        Ok(())
    }

    fn part_decision(&self, each: &Option<Vec<crate::algorithms::Decision>>, which: usize) -> Option<Decision> {
        let i = self.slot[which]?;
        each.as_ref().map(|e| Decision::from_core(e[i]))
    }
}

#[pymethods]
impl TokenLimiter {
    #[new]
    #[pyo3(signature = (requests=None, tokens=None, daily_tokens=None, concurrency=None, clock=None, lease_ttl=None, ttl=None, max_keys=None, shadow=None))]
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
    ) -> PyResult<Self> {
        let (core_clock, clock) = args::clock(clock)?;
        let ttl = match ttl {
            Some(v) => args::seconds("ttl", v)?,
            None => 3600.0,
        };
        let lease_ttl = match lease_ttl {
            Some(v) => args::seconds("lease_ttl", v)?,
            None => 600.0,
        };
        let max_keys = args::max_keys(max_keys)?;
        let rates = [
            given(requests).map(args::rate).transpose()?,
            given(tokens).map(args::rate).transpose()?,
            given(daily_tokens).map(daily_rate).transpose()?,
        ];
        let mut parts = Vec::new();
        let mut slot = [None; 3];
        for (which, rate) in rates.iter().enumerate() {
            if let Some(rate) = rate {
                let algo = Algorithm::TokenBucket(Gcra::new(*rate, rate.count)?);
                slot[which] = Some(parts.len());
                parts.push(Arc::new(Limiter::new(algo, core_clock.clone(), ttl, max_keys)?));
            }
        }
        let concurrency = match given(concurrency) {
            None => None,
            Some(v) => {
                let n = args::count("concurrency", v)?;
                Some(Arc::new(limiter::Concurrency::new(n, lease_ttl, core_clock.clone())?))
            }
        };
        if parts.is_empty() && concurrency.is_none() {
            return Err(bad_value("TokenLimiter needs at least one of requests, tokens, daily_tokens or concurrency"));
        }
        if !(lease_ttl.is_finite() && lease_ttl > 0.0) {
            return Err(bad_value(format!("lease_ttl must be a finite number of seconds above 0, got {lease_ttl}")));
        }
        let order: Vec<usize> = (0..parts.len()).collect();
        let lease_ttl_ns = crate::clock::secs_to_ns(lease_ttl).max(1);
        let this = TokenLimiter { parts, order, slot, concurrency, clock, lease_ttl_ns, tally: Default::default() };
        if let Some(v) = given(shadow) {
            this.set_shadow(v)?;
        }
        Ok(this)
    }

    /// Reserves one request and `tokens` tokens for `key` against every limit at once.
    /// Returns (allowed, combined, requests, tokens, daily_tokens, concurrency, lease id,
    /// time charged in ns).
    fn _reserve(&self, key: &Bound<'_, PyAny>, tokens: &Bound<'_, PyAny>) -> PyResult<Reserved> {
        let fp = args::key_fp(key)?;
        if tokens.is_instance_of::<pyo3::types::PyBool>() || !tokens.is_instance_of::<PyInt>() {
            return Err(wrong_type("tokens", "a non-negative int", tokens));
        }
        let tokens: u64 =
            tokens.extract().map_err(|_| bad_value(format!("tokens must be a non-negative integer, got {tokens}")))?;
        let now = self
            .parts
            .first()
            .map(|p| p.clock.now())
            .or_else(|| self.concurrency.as_ref().map(|c| c.clock.now()))
            .unwrap_or(0);
        let (lease, conc, rate) = match &self.concurrency {
            Some(c) => {
                let (id, d, ran) = c.acquire_if(&fp, || match self.check(&fp, tokens, true) {
                    Some((d, each)) => (d.allowed, Some((d, each))),
                    None => (true, None),
                });
                let rate = match ran {
                    Some(r) => r,
                    None => self.check(&fp, tokens, false),
                };
                (id, Some(d), rate)
            }
            None => (None, None, self.check(&fp, tokens, true)),
        };
        let mut all = Vec::new();
        if let Some((d, _)) = &rate {
            all.push(*d);
        }
        if let Some(d) = conc {
            all.push(d);
        }
        let combined = combine(&all);
        let each = rate.map(|(_, e)| e);
        // Admitted although a part said no: that part is in shadow mode.
        let mut decision = Decision::from_core(combined);
        decision.shadow = combined.allowed && each.as_ref().is_some_and(|e| e.iter().any(|d| !d.allowed));
        Ok((
            combined.allowed,
            decision,
            self.part_decision(&each, REQUESTS),
            self.part_decision(&each, TOKENS),
            self.part_decision(&each, DAILY),
            conc.map(Decision::from_core),
            lease,
            now,
        ))
    }

    /// What `_reserve(key, tokens)` would decide now, charging nothing and taking no
    /// lease: (combined, requests, tokens, daily_tokens, concurrency).
    fn _peek(&self, key: &Bound<'_, PyAny>, tokens: &Bound<'_, PyAny>) -> PyResult<Peeked> {
        let fp = args::key_fp(key)?;
        if tokens.is_instance_of::<pyo3::types::PyBool>() || !tokens.is_instance_of::<PyInt>() {
            return Err(wrong_type("tokens", "a non-negative int", tokens));
        }
        let tokens: u64 =
            tokens.extract().map_err(|_| bad_value(format!("tokens must be a non-negative integer, got {tokens}")))?;
        let rate = self.check(&fp, tokens, false);
        let conc = self.concurrency.as_ref().map(|c| c.peek(&fp));
        let mut all = Vec::new();
        if let Some((d, _)) = &rate {
            all.push(*d);
        }
        if let Some(d) = conc {
            all.push(d);
        }
        let combined = combine(&all);
        let each = rate.map(|(_, e)| e);
        let mut decision = Decision::from_core(combined);
        decision.shadow = combined.allowed && each.as_ref().is_some_and(|e| e.iter().any(|d| !d.allowed));
        Ok((
            decision,
            self.part_decision(&each, REQUESTS),
            self.part_decision(&each, TOKENS),
            self.part_decision(&each, DAILY),
            conc.map(Decision::from_core),
        ))
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) tokens of a reservation made at
    /// `charged_at` (ns) on the token and daily-token limits, and `requests` requests.
    #[pyo3(signature = (key, delta, charged_at, requests=0))]
    fn _adjust(&self, key: &Bound<'_, PyAny>, delta: i64, charged_at: u64, requests: i64) -> PyResult<()> {
        let fp = args::key_fp(key)?;
        if self.parts.is_empty() || (delta == 0 && requests == 0) {
            return Ok(());
        }
        let mut deltas = vec![0i64; self.parts.len()];
        for which in [TOKENS, DAILY] {
            if let Some(i) = self.slot[which] {
                deltas[i] = delta;
            }
        }
        if let Some(i) = self.slot[REQUESTS] {
            deltas[i] = requests;
        }
        let charged = vec![charged_at; self.parts.len()];
        composite_adjust(&self.parts, &self.order, &fp, &deltas, &charged);
        Ok(())
    }

    /// Adds to the token counters reported by `stats()`.
    fn _tally(&self, reserved: u64, settled: u64, refunded: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        for (i, n) in [reserved, settled, refunded].into_iter().enumerate() {
            if n > 0 {
                self.tally[i].fetch_add(n, Relaxed);
            }
        }
    }

    /// Ends the concurrency lease of a reservation; True if it was still held.
    fn _release(&self, key: &Bound<'_, PyAny>, lease: u64) -> PyResult<bool> {
        let fp = args::key_fp(key)?;
        Ok(self.concurrency.as_ref().is_some_and(|c| c.release(&fp, lease)))
    }

    /// The current time of the limiter's clock, in ns.
    fn _now(&self) -> u64 {
        self.parts
            .first()
            .map(|p| p.clock.now())
            .or_else(|| self.concurrency.as_ref().map(|c| c.clock.now()))
            .unwrap_or(0)
    }

    /// Forgets `key` everywhere (its leases included).
    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let fp = args::key_fp(key)?;
        for p in &self.parts {
            p.reset(&fp);
        }
        if let Some(c) = &self.concurrency {
            c.reset(&fp);
        }
        Ok(())
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        let parts = self.parts.clone();
        let conc = self.concurrency.clone();
        py.detach(move || parts.iter().map(|p| p.sweep()).sum::<usize>() + conc.map_or(0, |c| c.sweep()))
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
        let fp = args::key_fp(key)?;
        for (i, algo) in self.quotas([requests, tokens, daily_tokens])? {
            self.parts[i].set_quota(&fp, algo)?;
        }
        Ok(())
    }

    /// Puts `key` back on the default quotas; False if it had none of its own.
    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let fp = args::key_fp(key)?;
        // Every part is cleared (no short-circuit).
        let mut any = false;
        for p in &self.parts {
            any |= p.clear_quota(&fp);
        }
        Ok(any)
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
        let max = match given(concurrency) {
            None => None,
            Some(v) => match &self.concurrency {
                Some(c) => Some((c, args::count("concurrency", v)?)),
                None => return Err(bad_value("this TokenLimiter has no concurrency limit to change")),
            },
        };
        let changes = if given(requests).or(given(tokens)).or(given(daily_tokens)).is_none() && max.is_some() {
            Vec::new()
        } else {
            self.quotas([requests, tokens, daily_tokens])?
        };
        if let Some((c, n)) = max {
            c.set_max(n)?;
        }
        let parts = self.parts.clone();
        py.detach(move || changes.into_iter().try_for_each(|(i, algo)| parts[i].set_default(algo)))?;
        Ok(())
    }

    /// Counters of each limit: {"requests": {...}, "tokens": {...}, "daily_tokens": {...}}
    /// with the keys of `TokenBucket.stats()`; "concurrency": {"keys": ...}.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let out = pyo3::types::PyDict::new(py);
        for (which, name) in ["requests", "tokens", "daily_tokens"].into_iter().enumerate() {
            if let Some(i) = self.slot[which] {
                out.set_item(name, super::limiters::stats_dict(py, &self.parts[i])?)?;
            }
        }
        if let Some(c) = &self.concurrency {
            let d = pyo3::types::PyDict::new(py);
            d.set_item("keys", c.len())?;
            out.set_item("concurrency", d)?;
        }
        for (i, name) in ["tokens_reserved", "tokens_settled", "tokens_refunded"].into_iter().enumerate() {
            out.set_item(name, self.tally[i].load(std::sync::atomic::Ordering::Relaxed))?;
        }
        Ok(out)
    }

    /// Each limit's quota and usage for `key` (see `TokenBucket.inspect`).
    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let py = key.py();
        let out = pyo3::types::PyDict::new(py);
        for (which, name) in ["requests", "tokens", "daily_tokens"].into_iter().enumerate() {
            if let Some(i) = self.slot[which] {
                out.set_item(name, super::limiters::inspect_dict(key, &self.parts[i])?)?;
            }
        }
        if let Some(c) = &self.concurrency {
            let d = c.peek(&args::key_fp(key)?);
            // The peek decides as if it took one more lease: when allowed, `remaining`
            // already counts that lease, which is not held.
            let in_flight = d.limit.saturating_sub(d.remaining).saturating_sub(d.allowed as u64);
            let conc = pyo3::types::PyDict::new(py);
            conc.set_item("limit", d.limit)?;
            conc.set_item("in_flight", in_flight)?;
            out.set_item("concurrency", conc)?;
        }
        Ok(out)
    }

    /// The `n` keys using the largest share of one limit now ("tokens" by default, or
    /// "requests", "daily_tokens"); pass candidate `keys` to get names back.
    #[pyo3(signature = (n=10, keys=None, limit="tokens"))]
    fn top_keys<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        keys: Option<&Bound<'py, PyAny>>,
        limit: &str,
    ) -> PyResult<Vec<Bound<'py, pyo3::types::PyDict>>> {
        let which = match limit {
            "requests" => REQUESTS,
            "tokens" => TOKENS,
            "daily_tokens" => DAILY,
            _ => return Err(bad_value(format!("limit must be 'requests', 'tokens' or 'daily_tokens', got {limit:?}"))),
        };
        match self.slot[which] {
            Some(i) => super::limiters::top_keys_of(py, &self.parts[i], n, keys),
            None => Err(bad_value(format!("this TokenLimiter has no {limit} limit"))),
        }
    }

    /// Shadow mode for the request and token limits (concurrency leases stay real).
    #[getter]
    fn shadow(&self) -> bool {
        self.parts.iter().any(|p| p.shadow())
    }

    #[setter(shadow)]
    fn shadow_setter(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_shadow(value)
    }

    #[getter]
    fn requests(&self) -> Option<Rate> {
        self.rate_of(REQUESTS)
    }

    #[getter]
    fn tokens(&self) -> Option<Rate> {
        self.rate_of(TOKENS)
    }

    #[getter]
    fn daily_tokens(&self) -> Option<Rate> {
        self.rate_of(DAILY)
    }

    #[getter]
    fn concurrency(&self) -> Option<u64> {
        self.concurrency.as_ref().map(|c| c.max())
    }

    /// Seconds after which an unsettled reservation settles at its estimate (and its
    /// concurrency lease, if any, ends).
    #[getter]
    fn lease_ttl(&self) -> f64 {
        crate::clock::ns_to_secs(self.lease_ttl_ns)
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }
}
