//! The native half of `Hierarchy` (see `crate::hierarchy`): quotas charged at every
//! level of a path, all or nothing. The Python class (`nexus_limits.hierarchy`) wraps
//! the outcomes in `HierarchyDecision` and `HierarchyReservation`.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::report::{counters_dict, inspection_dict, stats_dict};
use super::shm::SharedMemoryStore;
use super::types::{Decision, ManualClock, Rate};
use crate::clock::{ns_to_secs, NANOS};
use crate::hierarchy::{Amounts, Deltas, Hierarchy as Core, LevelSpec, Outcome, Path, Rates, Unit};
use crate::key::{Fingerprint, KeyKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList, PyString, PyTuple};
use std::cell::RefCell;
use std::sync::Arc;

#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Hierarchy {
    inner: Arc<Core>,
    clock: Option<Py<ManualClock>>,
    /// The level names as Python strings, made once: every answer names levels.
    names: Vec<Py<PyString>>,
}

/// (level name, unit name or "concurrency").
type Refused = Option<(Py<PyString>, Py<PyString>)>;
/// (allowed, combined, refused, [(level, unit, decision)], [level decision], [concurrency
/// decision], [lease id], charged at ns).
type OutcomeTuple = (
    bool,
    Decision,
    Refused,
    Vec<(Py<PyString>, Py<PyString>, Decision)>,
    Vec<Option<Decision>>,
    Vec<Option<Decision>>,
    Vec<Option<u64>>,
    u64,
);

/// A decision as the Redis scripts reply it: (allowed, limit, remaining, reset_after us,
/// retry_after us or -1 for never, delay us).
type ScriptDecision = (i64, u64, u64, u64, i64, u64);

fn given<'a, 'py>(v: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    v.filter(|x| !x.is_none())
}

/// `daily_tokens`: a rate, or an int of tokens per day.
fn daily_rate(value: &Bound<'_, PyAny>) -> PyResult<crate::rate::Rate> {
    if value.is_instance_of::<PyInt>() {
        let n = args::count("daily_tokens", value)?;
        return Ok(crate::rate::Rate::new(n, 86_400 * NANOS)?);
    }
    args::rate(value)
}

fn rate_of(unit: Unit, value: &Bound<'_, PyAny>) -> PyResult<crate::rate::Rate> {
    match unit {
        Unit::DailyTokens => daily_rate(value),
        _ => args::rate(value),
    }
}

fn rates(values: [Option<&Bound<'_, PyAny>>; 4]) -> PyResult<Rates> {
    let mut out = [None; 4];
    for unit in Unit::ALL {
        out[unit as usize] = given(values[unit as usize]).map(|v| rate_of(unit, v)).transpose()?;
    }
    Ok(out)
}

/// One level: `(name, quotas)` where quotas is a dict of `requests`, `tokens`,
/// `daily_tokens`, `spend` (rates) and `concurrency` (an int), or a rate alone (requests).
fn level(item: &Bound<'_, PyAny>) -> PyResult<LevelSpec> {
    let expected = "a (name, quotas) pair";
    let pair = item.cast::<PyTuple>().map_err(|_| wrong_type("each level", expected, item))?;
    if pair.len() != 2 {
        return Err(bad_value(format!("each level must be a (name, quotas) pair, got {} items", pair.len())));
    }
    let (name, quotas) = (pair.get_item(0)?, pair.get_item(1)?);
    let name = name.cast::<PyString>().map_err(|_| wrong_type("a level name", "a str", &name))?.to_str()?.to_owned();
    let mut spec = LevelSpec { name, rates: [None; 4], concurrency: None };
    if quotas.is_instance_of::<PyString>() || quotas.is_instance_of::<Rate>() {
        spec.rates[Unit::Requests as usize] = Some(args::rate(&quotas)?);
        return Ok(spec);
    }
    let quotas = quotas.cast::<PyDict>().map_err(|_| {
        wrong_type(
            &format!("the quotas of level {:?}", spec.name),
            "a dict such as {'requests': '100/minute'}",
            &quotas,
        )
    })?;
    for (k, v) in quotas.iter() {
        let k = k.cast::<PyString>().map_err(|_| wrong_type("a quota name", "a str", &k))?.to_str()?.to_owned();
        if v.is_none() {
            continue;
        }
        if k == "concurrency" {
            spec.concurrency = Some(args::count("concurrency", &v)?);
            continue;
        }
        let unit = Unit::parse(&k).map_err(|e| bad_value(format!("level {:?}: {e}", spec.name)))?;
        spec.rates[unit as usize] = Some(rate_of(unit, &v)?);
    }
    Ok(spec)
}

/// A path (or a node's path from the top): a tuple or list of keys (str, bytes, int),
/// at most `max` of them.
fn path(value: &Bound<'_, PyAny>, max: usize) -> PyResult<Path> {
    let items: Vec<Bound<'_, PyAny>> = if let Ok(t) = value.cast::<PyTuple>() {
        if t.len() > max {
            return Err(too_long(t.len(), max));
        }
        t.iter().collect()
    } else if let Ok(l) = value.cast::<PyList>() {
        if l.len() > max {
            return Err(too_long(l.len(), max));
        }
        l.iter().collect()
    } else {
        return Err(wrong_type("path", "a tuple of keys such as ('acme', 'search', 'sk-1')", value));
    };
    let out = RefCell::new(Path::new());
    for item in &items {
        args::key_fp_by(item, |kind: KeyKind, bytes: &[u8]| {
            out.borrow_mut().push(kind, bytes);
            Fingerprint::default()
        })
        .map_err(|e| {
            if e.is_instance_of::<pyo3::exceptions::PyTypeError>(item.py()) {
                wrong_type("each element of a path", "a key (str, bytes or int)", item)
            } else {
                e
            }
        })?;
    }
    Ok(out.into_inner())
}

/// A unit's name (None: "concurrency"), interned: answers name them often.
fn unit_name(py: Python<'_>, unit: Option<Unit>) -> Py<PyString> {
    let name = match unit {
        Some(Unit::Requests) => pyo3::intern!(py, "requests"),
        Some(Unit::Tokens) => pyo3::intern!(py, "tokens"),
        Some(Unit::DailyTokens) => pyo3::intern!(py, "daily_tokens"),
        Some(Unit::Spend) => pyo3::intern!(py, "spend"),
        None => pyo3::intern!(py, "concurrency"),
    };
    name.clone().unbind()
}

fn too_long(got: usize, max: usize) -> PyErr {
    bad_value(format!("a path has at most one element per level ({max}), got {got}"))
}

/// A non-negative amount (requests, tokens, spend).
fn amount(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if value.is_instance_of::<pyo3::types::PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(wrong_type(name, "a non-negative int", value));
    }
    value.extract().map_err(|_| bad_value(format!("{name} must be a non-negative integer, got {value}")))
}

/// A settlement's delta, any int, held within the 64 bits the core takes.
fn delta(name: &str, value: &Bound<'_, PyAny>) -> PyResult<i64> {
    if value.is_instance_of::<pyo3::types::PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(wrong_type(name, "an int", value));
    }
    if let Ok(v) = value.extract::<i64>() {
        return Ok(v);
    }
    Ok(if value.gt(0)? { i64::MAX } else { i64::MIN })
}

impl Hierarchy {
    fn path(&self, value: &Bound<'_, PyAny>) -> PyResult<Path> {
        path(value, self.inner.depth())
    }

    fn amounts(
        &self,
        requests: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        spend: &Bound<'_, PyAny>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Amounts> {
        Ok(Amounts {
            requests: amount("cost", requests)?,
            tokens: amount("tokens", tokens)?,
            spend: amount("spend", spend)?,
            class: self.class_of(cls)?,
        })
    }

    /// The class named by `cls` (None: the default).
    fn class_of(&self, cls: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
        match given(cls) {
            None => Ok(None),
            Some(c) => {
                let name = c.cast::<PyString>().map_err(|_| wrong_type("cls", "a class name (str)", c))?;
                Ok(Some(self.inner.class(name.to_str()?)?))
            }
        }
    }

    fn tuple(&self, py: Python<'_>, o: Outcome) -> OutcomeTuple {
        let h = &self.inner;
        let mut combined = Decision::from_core(o.decision);
        combined.shadow = o.shadow;
        let refused = o.refused.map(|r| (self.names[r.level].clone_ref(py), unit_name(py, r.unit)));
        let parts = o
            .parts
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (level, unit) = h.part(i);
                (self.names[level].clone_ref(py), unit_name(py, Some(unit)), Decision::from_core(*d))
            })
            .collect();
        let levels = h.level_decisions(&o).into_iter().map(|d| d.map(Decision::from_core)).collect();
        let concurrency = o.concurrency.iter().map(|d| d.map(Decision::from_core)).collect();
        (o.allowed, combined, refused, parts, levels, concurrency, o.leases, o.charged_at)
    }

    fn leases(leases: &Bound<'_, PyAny>) -> PyResult<Vec<Option<u64>>> {
        leases.extract().map_err(|_| wrong_type("leases", "a list of lease ids (int or None)", leases))
    }
}

#[pymethods]
impl Hierarchy {
    #[new]
    #[pyo3(signature = (levels, store=None, name=None, clock=None, lease_ttl=None, ttl=None, max_keys=None, shadow=None, classes=None, default_class=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        levels: &Bound<'_, PyAny>,
        store: Option<&Bound<'_, PyAny>>,
        name: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        lease_ttl: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        classes: Option<&Bound<'_, PyAny>>,
        default_class: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        if levels.is_instance_of::<PyString>() || levels.is_instance_of::<PyDict>() {
            return Err(wrong_type("levels", "a list of (name, quotas) pairs", levels));
        }
        let iter = levels.try_iter().map_err(|_| wrong_type("levels", "a list of (name, quotas) pairs", levels))?;
        let mut specs = Vec::new();
        for item in iter {
            if specs.len() > crate::hierarchy::MAX_LEVELS {
                break; // the core refuses it; no need to read an endless iterable
            }
            specs.push(level(&item?)?);
        }
        let (core_clock, clock) = args::clock(clock)?;
        let name = match given(name) {
            None => String::new(),
            Some(n) => n.cast::<PyString>().map_err(|_| wrong_type("name", "a str", n))?.to_str()?.to_owned(),
        };
        let lease_ttl = lease_ttl.map(|v| args::seconds("lease_ttl", v)).transpose()?.unwrap_or(600.0);
        let ttl = given(ttl).map(|v| args::seconds("ttl", v)).transpose()?;
        let max_keys = args::max_keys(max_keys)?;
        let table = match given(store) {
            None => None,
            Some(s) => {
                if max_keys.is_some() {
                    return Err(bad_value("max_keys does not apply with store=: the store's capacity bounds the keys"));
                }
                if ttl.is_some() {
                    return Err(bad_value("ttl does not apply with store=: give it to the SharedMemoryStore"));
                }
                let s = s.cast::<SharedMemoryStore>().map_err(|_| wrong_type("store", "a SharedMemoryStore", s))?;
                Some(Arc::clone(&s.get().table))
            }
        };
        let classes = given(classes).map(super::priority::classes).transpose()?.unwrap_or_default();
        let default_class = match given(default_class) {
            None => None,
            Some(d) => {
                Some(d.cast::<PyString>().map_err(|_| wrong_type("default_class", "a str", d))?.to_str()?.to_owned())
            }
        };
        if default_class.is_some() && classes.is_empty() {
            return Err(bad_value("default_class needs classes="));
        }
        let ttl = ttl.unwrap_or(3600.0);
        let inner = Core::with_classes(
            specs,
            table,
            &name,
            core_clock,
            ttl,
            max_keys,
            lease_ttl,
            classes,
            default_class.as_deref(),
        )?;
        if let Some(v) = given(shadow) {
            inner.set_shadow(args::flag("shadow", v)?);
        }
        let py = levels.py();
        let names = (0..inner.depth()).map(|l| PyString::new(py, inner.level_name(l)).unbind()).collect();
        Ok(Hierarchy { inner: Arc::new(inner), clock, names })
    }

    /// Decides `cost` requests (and `tokens` tokens, `spend` units of spend) on every
    /// node of `path`, charging every quota or none with `charge`; takes no lease.
    #[pyo3(signature = (path, cost, tokens, spend, charge, cls=None))]
    fn _check(
        &self,
        path: &Bound<'_, PyAny>,
        cost: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        spend: &Bound<'_, PyAny>,
        charge: bool,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<OutcomeTuple> {
        let py = path.py();
        let path = self.path(path)?;
        let amounts = self.amounts(cost, tokens, spend, cls)?;
        let o = if charge { self.inner.check(&path, amounts, true)? } else { self.inner.peek(&path, amounts)? };
        Ok(self.tuple(py, o))
    }

    /// `_check(path, cost, 0, 0, True, cls)[0]`, without building the answer: whether
    /// `cost` requests were admitted (and charged) at every level.
    #[pyo3(signature = (path, cost, cls=None))]
    fn _try(&self, path: &Bound<'_, PyAny>, cost: &Bound<'_, PyAny>, cls: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let path = self.path(path)?;
        let amounts = Amounts { requests: amount("cost", cost)?, class: self.class_of(cls)?, ..Amounts::default() };
        Ok(self.inner.check(&path, amounts, true)?.allowed)
    }

    /// Reserves `requests`, `tokens` and `spend` on every node of `path`, with a lease at
    /// every level that has a concurrency limit: all of it or nothing.
    #[pyo3(signature = (path, requests, tokens, spend, cls=None))]
    fn _reserve(
        &self,
        path: &Bound<'_, PyAny>,
        requests: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        spend: &Bound<'_, PyAny>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<OutcomeTuple> {
        let py = path.py();
        let path = self.path(path)?;
        let o = self.inner.reserve(&path, self.amounts(requests, tokens, spend, cls)?)?;
        Ok(self.tuple(py, o))
    }

    /// Ends a reservation made at `charged_at` (ns): charges (or refunds, when negative)
    /// the deltas at every level and ends its leases. False, doing nothing, once expired.
    /// A delta past 64 bits is a debt (or a refund) no one can wait out either way: it
    /// is held at the largest the core takes, as the Redis class holds it.
    fn _settle(
        &self,
        path: &Bound<'_, PyAny>,
        requests: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        spend: &Bound<'_, PyAny>,
        charged_at: u64,
        leases: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let path = self.path(path)?;
        let deltas = Deltas {
            requests: delta("requests", requests)?,
            tokens: delta("tokens", tokens)?,
            spend: delta("spend", spend)?,
        };
        Ok(self.inner.settle(&path, deltas, charged_at, &Self::leases(leases)?)?)
    }

    /// Ends the leases of a reservation; how many were still held.
    fn _release(&self, path: &Bound<'_, PyAny>, leases: &Bound<'_, PyAny>) -> PyResult<usize> {
        let path = self.path(path)?;
        Ok(self.inner.release(&path, &Self::leases(leases)?)?)
    }

    /// The outcome of decisions made by a Redis script: each quota's decision and each
    /// level's concurrency decision (None: no limit) as the scripts reply them,
    /// `(allowed, limit, remaining, reset_after us, retry_after us or -1 for never,
    /// delay us)`, combined as a check here combines them. Counts nothing.
    fn _combine(
        &self,
        py: Python<'_>,
        parts: Vec<ScriptDecision>,
        concurrency: Vec<Option<ScriptDecision>>,
        shadow: bool,
    ) -> PyResult<OutcomeTuple> {
        let us = |d: ScriptDecision| crate::decision::Decision {
            allowed: d.0 != 0,
            limit: d.1,
            remaining: d.2,
            reset_after: d.3.saturating_mul(1_000),
            retry_after: u64::try_from(d.4).ok().map(|r| r.saturating_mul(1_000)),
            delay: d.5.saturating_mul(1_000),
        };
        let parts = parts.into_iter().map(us).collect();
        let concurrency = concurrency.into_iter().map(|d| d.map(us)).collect();
        Ok(self.tuple(py, self.inner.combine(parts, concurrency, shadow)?))
    }

    /// True when a reservation made at `charged_at` (ns) has outlived `lease_ttl`.
    fn _expired(&self, charged_at: u64) -> bool {
        self.inner.expired(charged_at)
    }

    /// For the headers: each quota of `path`'s levels as (level, unit, quota, window in
    /// seconds), the window being the time a whole quota takes to come back.
    fn _policies(&self, path: &Bound<'_, PyAny>) -> PyResult<Vec<(String, &'static str, u64, f64)>> {
        let path = self.path(path)?;
        let h = &self.inner;
        let mut out = Vec::with_capacity(h.n_parts());
        for p in 0..h.n_parts() {
            let (level, unit) = h.part(p);
            if level < path.len() {
                let (quota, _) = h.quota_of(&path, p)?;
                out.push((h.level_name(level).to_owned(), unit.name(), quota.limit(), ns_to_secs(quota.restore_ns())));
            }
        }
        Ok(out)
    }

    /// Gives the node named by `node` (its path from the top: `("acme",)` is the org
    /// acme) quotas of its own, keeping what it has used. Quotas not given stay.
    #[pyo3(signature = (node, requests=None, tokens=None, daily_tokens=None, spend=None, concurrency=None))]
    fn set_quota(
        &self,
        node: &Bound<'_, PyAny>,
        requests: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        daily_tokens: Option<&Bound<'_, PyAny>>,
        spend: Option<&Bound<'_, PyAny>>,
        concurrency: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let node = self.path(node)?;
        let concurrency = given(concurrency).map(|v| args::count("concurrency", v)).transpose()?;
        Ok(self.inner.set_quota(&node, rates([requests, tokens, daily_tokens, spend])?, concurrency)?)
    }

    /// Puts a node back on its level's quotas; False if it had none of its own.
    fn clear_quota(&self, node: &Bound<'_, PyAny>) -> PyResult<bool> {
        let node = self.path(node)?;
        Ok(self.inner.clear_quota(&node)?)
    }

    /// Changes the quotas of every node of `level` (nodes with their own keep theirs),
    /// keeping what each has used.
    #[pyo3(signature = (level, requests=None, tokens=None, daily_tokens=None, spend=None, concurrency=None))]
    #[allow(clippy::too_many_arguments)]
    fn set_default_quota(
        &self,
        py: Python<'_>,
        level: &str,
        requests: Option<&Bound<'_, PyAny>>,
        tokens: Option<&Bound<'_, PyAny>>,
        daily_tokens: Option<&Bound<'_, PyAny>>,
        spend: Option<&Bound<'_, PyAny>>,
        concurrency: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let level = self.inner.level(level)?;
        let concurrency = given(concurrency).map(|v| args::count("concurrency", v)).transpose()?;
        let rates = rates([requests, tokens, daily_tokens, spend])?;
        let inner = Arc::clone(&self.inner);
        Ok(py.detach(move || inner.set_default(level, rates, concurrency))?)
    }

    /// Puts one node (not the nodes below it) back to its fresh state, its leases ended.
    fn reset(&self, node: &Bound<'_, PyAny>) -> PyResult<()> {
        let node = self.path(node)?;
        Ok(self.inner.reset(&node)?)
    }

    /// One node's quotas and usage: {"level": name, "requests": {...}, "tokens": {...},
    /// "concurrency": {"limit", "in_flight"}} (the quotas its level has).
    fn inspect<'py>(&self, node: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let py = node.py();
        let path = self.path(node)?;
        let level = self.inner.node_level(&path)?;
        let (quotas, leases) = self.inner.inspect(&path)?;
        let out = PyDict::new(py);
        out.set_item("level", self.inner.level_name(level))?;
        for (unit, i) in quotas {
            out.set_item(unit.name(), inspection_dict(node, &i)?)?;
        }
        if let Some((limit, in_flight)) = leases {
            let c = PyDict::new(py);
            c.set_item("limit", limit)?;
            c.set_item("in_flight", in_flight)?;
            c.set_item("own_quota", self.inner.concurrency_of(&path)?.is_some_and(|c| c.1))?;
            out.set_item("concurrency", c)?;
        }
        Ok(out)
    }

    /// The quotas of a level as built (or last set by `set_default_quota`):
    /// {"requests": Rate, ..., "concurrency": int}.
    fn quotas<'py>(&self, py: Python<'py>, level: &str) -> PyResult<Bound<'py, PyDict>> {
        let l = self.inner.level(level)?;
        let out = PyDict::new(py);
        for unit in Unit::ALL {
            if let Some(p) = self.inner.find_part(l, unit) {
                out.set_item(unit.name(), Rate(self.inner.default_quota(p).rate()))?;
            }
        }
        if let Some(max) = self.inner.concurrency_max(l) {
            out.set_item("concurrency", max)?;
        }
        Ok(out)
    }

    /// Counters: allowed, denied, near_limit, shadow_denied (of whole calls);
    /// "refused_by" {level: calls refused there}; "levels" {level: {"requests": stats,
    /// ..., "concurrency": {"keys", "held"}}} ("held": leases held now; in a
    /// shared-memory store, by this process, and "keys" the store's).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = counters_dict(py, &s.counters)?;
        let refused = PyDict::new(py);
        let levels = PyDict::new(py);
        for l in 0..self.inner.depth() {
            let name = self.inner.level_name(l);
            refused.set_item(name, s.refused_by[l])?;
            let level = PyDict::new(py);
            for unit in Unit::ALL {
                if let Some(p) = self.inner.find_part(l, unit) {
                    level.set_item(unit.name(), stats_dict(py, &s.parts[p], self.inner.is_shared())?)?;
                }
            }
            if let Some(c) = &s.concurrency[l] {
                let d = counters_dict(py, &c.counters)?;
                d.set_item("keys", c.keys)?;
                d.set_item("held", c.held)?;
                level.set_item("concurrency", d)?;
            }
            levels.set_item(name, level)?;
        }
        out.set_item("refused_by", refused)?;
        out.set_item("levels", levels)?;
        if !s.classes.is_empty() {
            let classes = PyDict::new(py);
            for (name, share, counters) in &s.classes {
                let c = counters_dict(py, counters)?;
                c.set_item("share", share.fraction())?;
                classes.set_item(name, c)?;
            }
            out.set_item("classes", classes)?;
        }
        Ok(out)
    }

    /// Evicts idle nodes now (without holding the GIL); returns how many.
    fn sweep(&self, py: Python<'_>) -> usize {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.sweep())
    }

    /// The priority classes, {name: share} (empty without classes).
    #[getter]
    fn classes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, share) in self.inner.classes() {
            out.set_item(name, share.fraction())?;
        }
        Ok(out)
    }

    /// The class of a call that names none (None without classes).
    #[getter]
    fn default_class(&self) -> Option<String> {
        self.inner.default_class().map(|c| self.inner.classes()[c].0.clone())
    }

    /// The level names, from the top.
    #[getter]
    fn levels(&self, py: Python<'_>) -> Vec<Py<PyString>> {
        self.names.iter().map(|n| n.clone_ref(py)).collect()
    }

    /// Shadow mode for the rate quotas (leases stay real).
    #[getter]
    fn shadow(&self) -> bool {
        self.inner.shadow()
    }

    #[setter(shadow)]
    fn shadow_setter(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_shadow(args::flag("shadow", value)?);
        Ok(())
    }

    /// Seconds after which an unsettled reservation stands as charged (and its leases end).
    #[getter]
    fn lease_ttl(&self) -> f64 {
        ns_to_secs(self.inner.lease_ttl_ns())
    }

    /// The shared-memory store's file, with `store=`.
    #[getter]
    fn store_path(&self) -> Option<String> {
        self.inner.store_path().map(str::to_owned)
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }
}
