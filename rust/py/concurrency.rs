//! `Concurrency` and its `Lease`s.

use super::args;
use super::errors::bad_value;
use super::report::{counters_dict, inspection_dict, log_shadow, process_key_names, top_rows};
use super::types::{Decision, ManualClock};
use crate::clock::ns_to_secs;
use crate::concurrency::SHADOW_LEASE;
use crate::key::Fingerprint;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// At most `limit` leases held at once per key. A lease ends when released (or its
/// `with` block exits, or the Lease object is dropped) or when `lease_ttl` seconds pass,
/// so a holder that crashed cannot leak capacity.
#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Concurrency {
    inner: Arc<crate::concurrency::Concurrency>,
    clock: Option<Py<ManualClock>>,
}

/// One held place of a `Concurrency` limit. Use it as a context manager or call
/// `release()`; releasing twice is harmless. A Lease that is garbage-collected without
/// being released is released then (and counted in `stats()["dropped"]`): keep the
/// object for as long as the work it guards runs.
#[pyclass(frozen, module = "nexus_limits._core")]
pub struct Lease {
    owner: Arc<crate::concurrency::Concurrency>,
    fp: Fingerprint,
    id: u64,
    #[pyo3(get)]
    key: Py<PyAny>,
    done: AtomicBool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.owner.release_dropped(&self.fp, self.id);
        }
    }
}

fn only_unit_cost(cost: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    match args::cost(cost)? {
        1 => Ok(()),
        n => Err(bad_value(format!("Concurrency counts leases one at a time; cost must be 1, got {n}"))),
    }
}

impl Concurrency {
    fn take(&self, key: &Bound<'_, PyAny>) -> PyResult<(Option<Lease>, Decision)> {
        let fp = args::key_fp(key)?;
        let (id, checked) = self.inner.acquire(&fp);
        if let Some(denied) = &checked.shadowed {
            log_shadow(key, &format!("Concurrency({})", denied.limit), denied);
        }
        let lease = id.map(|id| Lease {
            owner: Arc::clone(&self.inner),
            fp,
            id,
            key: key.clone().unbind(),
            done: AtomicBool::new(false),
        });
        Ok((lease, Decision::from_checked(checked)))
    }
}

#[pymethods]
impl Concurrency {
    #[new]
    #[pyo3(signature = (limit, lease_ttl=None, clock=None, shadow=None))]
    fn new(
        limit: &Bound<'_, PyAny>,
        lease_ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let limit = args::count("limit", limit)?;
        let lease_ttl = match lease_ttl {
            Some(v) => args::seconds("lease_ttl", v)?,
            None => 300.0,
        };
        let (core_clock, clock) = args::clock(clock)?;
        let inner = crate::concurrency::Concurrency::new(limit, lease_ttl, core_clock)?;
        if let Some(shadow) = shadow.filter(|s| !s.is_none()) {
            inner.set_shadow(args::flag("shadow", shadow)?);
        }
        Ok(Concurrency { inner: Arc::new(inner), clock })
    }

    /// A Lease if fewer than the key's limit are held, else None. The lease is held
    /// while the Lease object lives: `if c.try_acquire(key):` alone takes it and gives it
    /// back at once; keep it (`lease = c.try_acquire(key)`) and release it when done.
    #[pyo3(signature = (key, cost=None))]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Lease>> {
        only_unit_cost(cost)?;
        Ok(self.take(key)?.0)
    }

    /// Takes a lease if one is free; the Decision carries it in `.lease` (and holds it
    /// while it lives, like the Lease itself).
    #[pyo3(signature = (key, cost=None))]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        only_unit_cost(cost)?;
        let py = key.py();
        let (lease, mut d) = self.take(key)?;
        if let Some(lease) = lease {
            d.lease = Some(Py::new(py, lease)?.into_any());
        }
        Ok(d)
    }

    /// What `hit` would decide, taking nothing.
    #[pyo3(signature = (key, cost=None))]
    fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        only_unit_cost(cost)?;
        Ok(Decision::from_core(self.inner.peek(&args::key_fp(key)?)))
    }

    /// `(allowed, remaining)`: whether a lease is free now and how many are.
    fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
        Ok(self.inner.get_limit(&args::key_fp(key)?))
    }

    /// Ends every lease of `key`.
    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.reset(&args::key_fp(key)?);
        Ok(())
    }

    /// Drops expired leases now; returns how many keys were left without any.
    fn sweep(&self, py: Python<'_>) -> usize {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.sweep())
    }

    /// Waits (without the GIL) until some lease is released or `timeout` seconds pass.
    fn _wait_for_release(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(bad_value(format!("timeout must be a finite, non-negative number, got {timeout}")));
        }
        let inner = Arc::clone(&self.inner);
        let ns = crate::clock::secs_to_ns(timeout);
        py.detach(move || inner.wait_for_release(ns));
        Ok(())
    }

    /// Keys holding leases now.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The default limit: leases a key without a limit of its own may hold at once.
    #[getter(limit)]
    fn limit_value(&self) -> u64 {
        self.inner.max()
    }

    /// Changes the default limit at run time; leases already held stay held. The same
    /// as `set_default_quota(limit)`.
    fn set_limit(&self, limit: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.inner.set_max(args::count("limit", limit)?)?)
    }

    /// Gives `key` a limit of its own (leases held stay held).
    fn set_quota(&self, key: &Bound<'_, PyAny>, limit: &Bound<'_, PyAny>) -> PyResult<()> {
        let fp = args::key_fp(key)?;
        Ok(self.inner.set_quota(&fp, args::count("limit", limit)?)?)
    }

    /// Puts `key` back on the default limit; False if it had none of its own.
    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.inner.clear_quota(&args::key_fp(key)?))
    }

    /// Changes the default limit (every key without one of its own).
    fn set_default_quota(&self, limit: &Bound<'_, PyAny>) -> PyResult<()> {
        self.set_limit(limit)
    }

    /// One key's limit and leases now, with the fields of a rate limiter's `inspect`
    /// (`rate` is None; `used` counts the leases held).
    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        inspection_dict(key, &self.inner.inspect(&args::key_fp(key)?))
    }

    /// The `n` keys holding the largest share of their limit now (`used`: leases held).
    #[pyo3(signature = (n=10, keys=None))]
    fn top_keys<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        keys: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let names = process_key_names(keys)?;
        let inner = Arc::clone(&self.inner);
        let top = py.detach(move || inner.top(n));
        top_rows(py, &names, top)
    }

    /// Counters since construction: allowed, denied, near_limit, shadow_denied; keys
    /// (holding leases), own_quotas; held (leases held now), expired (leases that ran
    /// out their lease_ttl), dropped (leases garbage-collected without release).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = counters_dict(py, &s.counters)?;
        out.set_item("keys", s.keys)?;
        out.set_item("own_quotas", s.overrides)?;
        out.set_item("held", s.held)?;
        out.set_item("expired", s.expired)?;
        out.set_item("dropped", s.dropped)?;
        Ok(out)
    }

    /// In shadow mode a key at its limit still gets a Lease (holding no place; its
    /// `release()` returns False), the call is counted and logged (logger
    /// `nexus_limits.shadow`): nothing is ever denied.
    #[getter]
    fn shadow(&self) -> bool {
        self.inner.shadow()
    }

    #[setter]
    fn set_shadow(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.set_shadow(args::flag("shadow", on)?);
        Ok(())
    }

    #[getter]
    fn lease_ttl(&self) -> f64 {
        ns_to_secs(self.inner.lease_ttl_ns)
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.get_type().qualname()?.to_string();
        let me = slf.get();
        let shadow = if me.inner.shadow() { ", shadow=True" } else { "" };
        Ok(format!("{name}({}, lease_ttl={:?}{shadow})", me.inner.max(), ns_to_secs(me.inner.lease_ttl_ns)))
    }
}

#[pymethods]
impl Lease {
    /// Ends the lease. True if this call ended it; False if it had already ended
    /// (released before, expired, or reset) or holds no place (shadow mode).
    fn release(&self) -> bool {
        if self.done.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.owner.release(&self.fp, self.id)
    }

    /// True once `release()` was called.
    #[getter]
    fn released(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// True for a lease a Concurrency in shadow mode gave past its limit (it holds no
    /// place).
    #[getter]
    fn shadow(&self) -> bool {
        self.id == SHADOW_LEASE
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.release();
        false
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let key = self.key.bind(py).repr()?.to_string();
        let shadow = if self.id == SHADOW_LEASE { ", shadow=True" } else { "" };
        Ok(format!("Lease(key={key}, released={}{shadow})", if self.released() { "True" } else { "False" }))
    }
}
