//! `Composite`: several rate limiters on one key, all or nothing.

use super::args;
use super::errors::wrong_type;
use super::limiters::handle_of;
use super::report::{counters_dict, inspection_dict, log_shadow, process_key_names, stats_dict, top_rows};
use super::types::{Decision, ManualClock};
use crate::composite::MAX_PARTS;
use crate::decision::Checked;
use crate::limiter::Limiter;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// A limiter object's core limiters (one, or a Composite's parts) and its clock object.
type Parts = (Vec<Arc<Limiter>>, Option<Py<ManualClock>>);

fn parts_of(obj: &Bound<'_, PyAny>) -> PyResult<Parts> {
    let py = obj.py();
    if let Some(h) = handle_of(obj) {
        let (limiter, clock) = h.parts(py);
        return Ok((vec![limiter], clock));
    }
    if let Ok(x) = obj.cast::<Composite>() {
        let c = x.get();
        return Ok((c.inner.parts().to_vec(), c.clock.as_ref().map(|k| k.clone_ref(py))));
    }
    Err(wrong_type("each Composite part", "a TokenBucket, SlidingWindow, FixedWindow, LeakyBucket or Composite", obj))
}

/// Several limiters on one key, all or nothing: a call is admitted only if every
/// part admits it, and then every part is charged, atomically under threads.
#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Composite {
    inner: crate::composite::Composite,
    objects: Py<PyTuple>,
    clock: Option<Py<ManualClock>>,
}

impl Composite {
    #[inline]
    fn check(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>, charge: bool) -> PyResult<Checked> {
        let fp = args::key_fp(key)?;
        let checked = self.inner.check(&fp, args::cost(cost)?, charge);
        if let Some(denied) = &checked.shadowed {
            log_shadow(key, "Composite", denied);
        }
        Ok(checked)
    }
}

#[pymethods]
impl Composite {
    #[new]
    fn new(limiters: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = limiters.py();
        let mut parts: Vec<Arc<Limiter>> = Vec::new();
        let mut clock: Option<Py<ManualClock>> = None;
        let mut objects = Vec::new();
        let iter = limiters.try_iter().map_err(|_| wrong_type("limiters", "an iterable of limiters", limiters))?;
        for item in iter {
            let item = item?;
            let (more, more_clock) = parts_of(&item)?;
            parts.extend(more);
            if parts.len() > MAX_PARTS {
                break; // the core refuses it; no need to read an endless iterable
            }
            clock = clock.or(more_clock);
            objects.push(item);
        }
        let inner = crate::composite::Composite::new(parts)?;
        Ok(Composite { inner, objects: PyTuple::new(py, objects)?.unbind(), clock })
    }

    #[pyo3(signature = (key, cost=None))]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        Ok(Decision::from_checked(self.check(key, cost, true)?))
    }

    #[pyo3(signature = (key, cost=None))]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        Ok(self.check(key, cost, true)?.decision.allowed)
    }

    /// `hit`, also returning each part's own Decision (in the order of `parts`,
    /// flattened): for listing every policy in response headers.
    #[pyo3(signature = (key, cost=None))]
    fn hit_each(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<(Decision, Vec<Decision>)> {
        let fp = args::key_fp(key)?;
        let (checked, each) = self.inner.check_each(&fp, args::cost(cost)?);
        if let Some(denied) = &checked.shadowed {
            log_shadow(key, "Composite", denied);
        }
        Ok((Decision::from_checked(checked), each.into_iter().map(Decision::from_core).collect()))
    }

    #[pyo3(signature = (key, cost=None))]
    fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        Ok(Decision::from_core(self.check(key, cost, false)?.decision))
    }

    fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
        Ok(self.inner.get_limit(&args::key_fp(key)?))
    }

    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.reset(&args::key_fp(key)?);
        Ok(())
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.sweep())
    }

    /// Keys tracked by the busiest part.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// A Composite has no quota of its own: raises TypeError (set quotas on its parts).
    #[pyo3(signature = (key, rate, burst=None))]
    fn set_quota(
        &self,
        key: &Bound<'_, PyAny>,
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let _ = (key, rate, burst);
        Err(crate::composite::Composite::no_quota("set_quota").into())
    }

    /// A Composite has no quota of its own: raises TypeError (clear quotas on its parts).
    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let _ = key;
        Err(crate::composite::Composite::no_quota("clear_quota").into())
    }

    /// A Composite has no quota of its own: raises TypeError (set quotas on its parts).
    #[pyo3(signature = (rate, burst=None))]
    fn set_default_quota(&self, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let _ = (rate, burst);
        Err(crate::composite::Composite::no_quota("set_default_quota").into())
    }

    /// The key across the parts now: the combined answer for a call of one unit (the
    /// fields of a part's `inspect`), and each part's `inspect` under "parts".
    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let (whole, parts) = self.inner.inspect(&args::key_fp(key)?);
        let out = inspection_dict(key, &whole)?;
        let parts: Vec<_> = parts.iter().map(|p| inspection_dict(key, p)).collect::<PyResult<_>>()?;
        out.set_item("parts", parts)?;
        Ok(out)
    }

    /// The `n` keys using the largest share of their limit in any part (each with the
    /// part where that share is largest), most used first.
    #[pyo3(signature = (n=10, keys=None))]
    fn top_keys<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        keys: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let names = process_key_names(keys)?;
        let top = py.detach(|| self.inner.top(n));
        top_rows(py, &names, top)
    }

    /// Counters of the Composite's own checks (allowed, denied, near_limit,
    /// shadow_denied), keys (busiest part), evicted and own_quotas (summed over the
    /// parts), and each part's `stats()` under "parts".
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = counters_dict(py, &s.counters)?;
        out.set_item("keys", s.keys)?;
        out.set_item("evicted", s.evicted)?;
        out.set_item("own_quotas", s.overrides)?;
        let parts: Vec<_> = s.parts.iter().map(|p| stats_dict(py, p, false)).collect::<PyResult<_>>()?;
        out.set_item("parts", parts)?;
        Ok(out)
    }

    /// In shadow mode the Composite decides and counts, logs what it would deny (logger
    /// `nexus_limits.shadow`), and never denies (charging nothing then). Its parts keep
    /// their own shadow flags.
    #[getter]
    fn shadow(&self) -> bool {
        self.inner.shadow()
    }

    #[setter]
    fn set_shadow(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_shadow(args::flag("shadow", on)?);
        Ok(())
    }

    /// The smallest default capacity of the parts.
    #[getter(limit)]
    fn limit_value(&self) -> u64 {
        self.inner.limit()
    }

    /// The limiters given at construction.
    #[getter]
    fn parts(&self, py: Python<'_>) -> Py<PyTuple> {
        self.objects.clone_ref(py)
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.get_type().qualname()?.to_string();
        let parts: Vec<String> = slf
            .get()
            .objects
            .bind(slf.py())
            .iter()
            .map(|o| o.repr().map(|r| r.to_string()))
            .collect::<PyResult<_>>()?;
        let shadow = if slf.get().inner.shadow() { ", shadow=True" } else { "" };
        Ok(format!("{name}([{}]{shadow})", parts.join(", ")))
    }
}
