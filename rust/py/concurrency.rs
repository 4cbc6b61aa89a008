//! `Concurrency` and its `Lease`s.

use super::args;
use super::errors::bad_value;
use super::types::{Decision, ManualClock};
use crate::clock::ns_to_secs;
use crate::key::Fingerprint;
use crate::limiter;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// At most `limit` leases held at once per key. A lease ends when released (or its
/// `with` block exits) or when `lease_ttl` seconds pass, so a holder that crashed
/// cannot leak capacity.
#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Concurrency {
    inner: Arc<limiter::Concurrency>,
    clock: Option<Py<ManualClock>>,
}

/// One held place of a `Concurrency` limit. Use it as a context manager or call
/// `release()`; releasing twice is harmless.
#[pyclass(frozen, module = "nexus_limits._core")]
pub struct Lease {
    owner: Arc<limiter::Concurrency>,
    fp: Fingerprint,
    id: u64,
    #[pyo3(get)]
    key: Py<PyAny>,
    done: AtomicBool,
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
        let (id, d) = self.inner.acquire(&fp);
        let lease = id.map(|id| Lease {
            owner: Arc::clone(&self.inner),
            fp,
            id,
            key: key.clone().unbind(),
            done: AtomicBool::new(false),
        });
        Ok((lease, Decision::from_core(d)))
    }
}

#[pymethods]
impl Concurrency {
    #[new]
    #[pyo3(signature = (limit, lease_ttl=None, clock=None))]
    fn new(
        limit: &Bound<'_, PyAny>,
        lease_ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let limit = args::count("limit", limit)?;
        let lease_ttl = match lease_ttl {
            Some(v) => args::seconds("lease_ttl", v)?,
            None => 300.0,
        };
        let (core_clock, clock) = args::clock(clock)?;
        Ok(Concurrency { inner: Arc::new(limiter::Concurrency::new(limit, lease_ttl, core_clock)?), clock })
    }

    /// A Lease if fewer than `limit` are held for `key`, else None.
    #[pyo3(signature = (key, cost=None))]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Lease>> {
        only_unit_cost(cost)?;
        Ok(self.take(key)?.0)
    }

    /// Takes a lease if one is free; the Decision carries it in `.lease`.
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
        let d = self.inner.peek(&args::key_fp(key)?);
        let free = if d.allowed { d.remaining + 1 } else { 0 };
        Ok((d.allowed, free))
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

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter(limit)]
    fn limit_value(&self) -> u64 {
        self.inner.max()
    }

    /// Changes the limit at run time; leases already held stay held.
    fn set_limit(&self, limit: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.inner.set_max(super::args::count("limit", limit)?)?)
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
        Ok(format!("{name}({}, lease_ttl={:?})", me.inner.max(), ns_to_secs(me.inner.lease_ttl_ns)))
    }
}

#[pymethods]
impl Lease {
    /// Ends the lease. True if this call ended it; False if it had already ended
    /// (released before, expired, or reset).
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
        Ok(format!("Lease(key={key}, released={})", if self.released() { "True" } else { "False" }))
    }
}
