//! `Quota`: the core's quota value, for backends that decide elsewhere (Redis) and for
//! anyone who wants a limiter's quota as a value.

use super::args;
use super::errors::wrong_type;
use super::types::Rate;
use crate::clock::{ns_to_secs, NANOS};
use crate::quota::Kind;
use pyo3::basic::CompareOp;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// An algorithm with its rate, capacity and (for windows) where windows start; checked
/// when made. `Quota("token_bucket", "100/minute", burst=20)`.
#[pyclass(frozen, module = "nexus_limits._core")]
#[derive(Clone)]
pub struct Quota(pub crate::quota::Quota);

/// Seconds after the Unix epoch's period boundaries, as `align=` gives them.
pub fn align_secs(ns: i64) -> f64 {
    ns as f64 / NANOS as f64
}

#[pymethods]
impl Quota {
    #[new]
    #[pyo3(signature = (algorithm, rate, burst=None, *, align=None))]
    fn new(
        algorithm: &Bound<'_, PyAny>,
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
        align: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let name = algorithm.cast::<PyString>().map_err(|_| wrong_type("algorithm", "a str", algorithm))?;
        let kind = Kind::parse(name.to_str()?)?;
        let rate = args::rate(rate)?;
        let burst = args::optional_count("burst", burst)?;
        Ok(Quota(crate::quota::Quota::new(kind, rate, burst, args::align(align)?)?))
    }

    /// The quota a Redis script describes with its arguments (see `script_args`).
    #[staticmethod]
    fn from_script_args(algorithm: &str, micros: f64, capacity: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Quota(crate::quota::Quota::from_script_args(algorithm, micros, args::count("capacity", capacity)?)?))
    }

    /// `"token_bucket"`, `"leaky_bucket"`, `"fixed_window"` or `"sliding_window"`.
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.0.kind().ident()
    }

    /// The algorithm's name for people: `"token bucket"`...
    #[getter]
    fn name(&self) -> &'static str {
        self.0.kind().name()
    }

    #[getter]
    fn rate(&self) -> Rate {
        Rate(self.0.rate())
    }

    /// The capacity: burst, queue size or window limit.
    #[getter]
    fn limit(&self) -> u64 {
        self.0.limit()
    }

    /// Where windows start (seconds after the Unix epoch's boundaries); None for buckets.
    #[getter]
    fn align(&self) -> Option<f64> {
        self.0.align_ns().map(align_secs)
    }

    /// Seconds in which a whole quota comes back: the window, or the burst's refill (the
    /// `w` of a `RateLimit-Policy` header).
    #[getter]
    fn window(&self) -> f64 {
        ns_to_secs(self.0.restore_ns())
    }

    /// Seconds a key can need, after its last admitted call, to be fresh again.
    #[getter]
    fn time_to_fresh(&self) -> f64 {
        ns_to_secs(self.0.time_to_fresh())
    }

    /// The arguments the Redis scripts take: (algorithm, microseconds per unit for a
    /// bucket or per window for a window, capacity), as strings.
    #[getter]
    fn script_args(&self) -> (&'static str, String, String) {
        let a = self.0.script_args();
        (a.algorithm, a.micros, a.capacity)
    }

    /// The name of the quota's keys on Redis for a limiter given no name.
    #[getter]
    fn redis_id(&self) -> String {
        self.0.redis_id()
    }

    /// This quota split between `parts` processes (each gets at least one unit).
    fn share(&self, parts: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Quota(self.0.share(args::count("parts", parts)?)?))
    }

    fn __repr__(&self) -> String {
        let burst = if self.0.kind().is_window() { String::new() } else { format!(", burst={}", self.0.limit()) };
        let align = match self.0.align_ns() {
            Some(ns) if ns != 0 => format!(", align={:?}", align_secs(ns)),
            _ => String::new(),
        };
        format!("Quota('{}', '{}'{burst}{align})", self.0.kind().ident(), self.0.rate())
    }

    fn __str__(&self) -> String {
        self.0.to_string()
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp) -> Py<PyAny> {
        let py = other.py();
        let answer = |b: bool| b.into_pyobject(py).unwrap().to_owned().into_any().unbind();
        match (other.cast::<Quota>(), op) {
            (Ok(o), CompareOp::Eq) => answer(self.0 == o.get().0),
            (Ok(o), CompareOp::Ne) => answer(self.0 != o.get().0),
            _ => py.NotImplemented(),
        }
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut h);
        h.finish()
    }
}
