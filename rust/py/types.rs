//! Value types: `Rate`, `Decision`, `ManualClock`.

use super::args;
use super::errors::bad_value;
use crate::clock::{self, ns_to_secs, secs_to_ns};
use pyo3::basic::CompareOp;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// `count` units per `period` seconds.
#[pyclass(frozen, module = "nexus_limits._core")]
#[derive(Clone)]
pub struct Rate(pub crate::rate::Rate);

#[pymethods]
impl Rate {
    #[new]
    fn new(count: &Bound<'_, PyAny>, period: &Bound<'_, PyAny>) -> PyResult<Self> {
        let count = args::count("rate count", count)?;
        let period = args::seconds("rate period", period)?;
        Ok(Rate(crate::rate::Rate::from_secs(count, period)?))
    }

    /// Parses `"100/minute"`, `"100 per minute"`, `"10/s"`, `"5/2s"`, `"7/day"`...
    #[staticmethod]
    fn parse(text: &Bound<'_, PyAny>) -> PyResult<Self> {
        let s = text.cast::<PyString>().map_err(|_| super::errors::wrong_type("rate", "a str", text))?;
        Ok(Rate(crate::rate::Rate::parse(s.to_str()?)?))
    }

    #[getter]
    fn count(&self) -> u64 {
        self.0.count
    }

    /// The period in seconds.
    #[getter]
    fn period(&self) -> f64 {
        self.0.period_secs()
    }

    fn __repr__(&self) -> String {
        format!("Rate({}, {:?})", self.0.count, self.0.period_secs())
    }

    fn __str__(&self) -> String {
        self.0.to_string()
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp) -> Py<PyAny> {
        let py = other.py();
        match (other.cast::<Rate>(), op) {
            (Ok(o), CompareOp::Eq) => (self.0 == o.get().0).into_pyobject(py).unwrap().to_owned().into_any().unbind(),
            (Ok(o), CompareOp::Ne) => (self.0 != o.get().0).into_pyobject(py).unwrap().to_owned().into_any().unbind(),
            _ => py.NotImplemented(),
        }
    }

    fn __hash__(&self) -> u64 {
        self.0.count.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.0.period_ns
    }
}

/// The answer to one check. `bool(decision)` is `decision.allowed`.
#[pyclass(frozen, module = "nexus_limits._core")]
pub struct Decision {
    #[pyo3(get)]
    pub allowed: bool,
    #[pyo3(get)]
    pub limit: u64,
    #[pyo3(get)]
    pub remaining: u64,
    #[pyo3(get)]
    pub reset_after: f64,
    #[pyo3(get)]
    pub retry_after: f64,
    #[pyo3(get)]
    pub delay: f64,
    #[pyo3(get)]
    pub lease: Option<Py<PyAny>>,
    /// True when a shared store could not be reached and this answer is the
    /// limiter's `on_error` policy, not a decision of the store.
    #[pyo3(get)]
    pub fallback: bool,
    /// True when a shadow-mode limiter would have denied this call (and admitted it).
    #[pyo3(get)]
    pub shadow: bool,
}

impl Decision {
    #[inline]
    pub fn from_core(d: crate::decision::Decision) -> Decision {
        Decision {
            allowed: d.allowed,
            limit: d.limit,
            remaining: d.remaining,
            reset_after: ns_to_secs(d.reset_after),
            retry_after: d.retry_after.map_or(f64::INFINITY, ns_to_secs),
            delay: ns_to_secs(d.delay),
            lease: None,
            fallback: false,
            shadow: false,
        }
    }
}

impl Decision {
    /// The decision given by a check; `shadow` is set when shadow mode admitted it.
    #[inline]
    pub fn from_checked(c: crate::decision::Checked) -> Decision {
        let mut out = Decision::from_core(c.decision);
        out.shadow = c.shadowed.is_some();
        out
    }
}

fn non_negative(name: &str, v: f64, allow_inf: bool) -> PyResult<f64> {
    if v.is_nan() || v < 0.0 || (v.is_infinite() && !allow_inf) {
        return Err(bad_value(format!("{name} must be a non-negative number of seconds, got {v}")));
    }
    Ok(v)
}

#[pymethods]
impl Decision {
    /// Builds a decision by hand (backends that decide elsewhere use this).
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (allowed, limit, remaining, reset_after, retry_after, delay=0.0, lease=None, fallback=false, shadow=false))]
    fn new(
        allowed: bool,
        limit: u64,
        remaining: u64,
        reset_after: f64,
        retry_after: f64,
        delay: f64,
        lease: Option<Py<PyAny>>,
        fallback: bool,
        shadow: bool,
    ) -> PyResult<Self> {
        Ok(Decision {
            allowed,
            limit,
            remaining,
            reset_after: non_negative("reset_after", reset_after, false)?,
            retry_after: non_negative("retry_after", retry_after, true)?,
            delay: non_negative("delay", delay, false)?,
            lease,
            fallback,
            shadow,
        })
    }

    fn __bool__(&self) -> bool {
        self.allowed
    }

    fn __repr__(&self) -> String {
        format!(
            "Decision(allowed={}, limit={}, remaining={}, reset_after={:?}, retry_after={}, delay={:?}{}{})",
            if self.allowed { "True" } else { "False" },
            self.limit,
            self.remaining,
            self.reset_after,
            if self.retry_after.is_infinite() { "inf".to_string() } else { format!("{:?}", self.retry_after) },
            self.delay,
            if self.fallback { ", fallback=True" } else { "" },
            if self.shadow { ", shadow=True" } else { "" },
        )
    }
}

/// A clock that moves only when advanced. Pass it as `clock=` to any limiter for
/// deterministic tests; waiting limiters (`acquire`) advance it instead of sleeping.
#[pyclass(frozen, module = "nexus_limits._core")]
pub struct ManualClock(pub clock::ManualClock);

fn seconds_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    let s = args::seconds(name, v)?;
    if !s.is_finite() || s < 0.0 {
        return Err(bad_value(format!("{name} must be a finite, non-negative number of seconds, got {s}")));
    }
    Ok(secs_to_ns(s))
}

#[pymethods]
impl ManualClock {
    #[new]
    #[pyo3(signature = (start=None))]
    fn new(start: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let ns = match start {
            Some(v) => seconds_arg("start", v)?,
            None => 0,
        };
        Ok(ManualClock(clock::ManualClock::new(ns)))
    }

    /// The current time in seconds.
    #[getter]
    fn now(&self) -> f64 {
        ns_to_secs(self.0.now())
    }

    /// Moves the clock forward by `seconds` (>= 0) and returns the new time.
    fn advance(&self, seconds: &Bound<'_, PyAny>) -> PyResult<f64> {
        let ns = seconds_arg("seconds", seconds)?;
        Ok(ns_to_secs(self.0.advance(ns)))
    }

    fn __repr__(&self) -> String {
        format!("ManualClock({:?})", ns_to_secs(self.0.now()))
    }
}
