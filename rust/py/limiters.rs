//! The rate limiter classes: `TokenBucket`, `SlidingWindow`, `FixedWindow`,
//! `LeakyBucket` and `Composite`. They are frozen native classes meant to be
//! subclassed by the Python package (which adds `acquire`/`acquire_async`); a check
//! goes straight from the caller to the native method.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::types::{Decision, ManualClock, Rate};
use crate::algorithms::{Algorithm, FixedWindow as Fixed, Gcra, SlidingWindow as Sliding};
use crate::clock::{ns_to_secs, Clock};
use crate::limiter::{composite_check, composite_hit, Limiter};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::Arc;

/// What every rate limiter class holds.
pub struct Shared {
    pub inner: Arc<Limiter>,
    rate: crate::rate::Rate,
    clock: Option<Py<ManualClock>>,
}

impl Shared {
    fn build(
        rate: crate::rate::Rate,
        algo: Algorithm,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Shared> {
        let ttl = match ttl {
            Some(v) => args::seconds("ttl", v)?,
            None => 3600.0,
        };
        let (core_clock, clock) = args::clock(clock)?;
        let max_keys = args::max_keys(max_keys)?;
        let inner = Limiter::new(algo, core_clock, ttl, max_keys)?;
        Ok(Shared { inner: Arc::new(inner), rate, clock })
    }

    #[inline]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        Ok(Decision::from_core(self.inner.hit(&fp, cost)))
    }

    #[inline]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        Ok(self.inner.hit(&fp, cost).allowed)
    }

    fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        Ok(Decision::from_core(self.inner.peek(&fp, cost)))
    }

    fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
        let d = self.inner.peek(&args::key_fp(key)?, 0);
        Ok((d.remaining >= 1, d.remaining))
    }

    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.reset(&args::key_fp(key)?);
        Ok(())
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.sweep())
    }

    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn repr(&self, slf: &Bound<'_, PyAny>, extra: &str) -> String {
        let name = slf.get_type().qualname().map(|n| n.to_string()).unwrap_or_default();
        let max_keys = match self.inner.store.max_keys() {
            Some(n) => format!(", max_keys={n}"),
            None => String::new(),
        };
        format!("{name}('{}'{extra}, ttl={:?}{max_keys})", self.rate, ns_to_secs(self.inner.ttl_ns()))
    }
}

/// Generates a limiter class: its constructor is given, the checking methods are shared.
macro_rules! rate_limiter_class {
    ($name:ident, $extra_repr:expr, { $($ctor:tt)* }) => {
        #[pyclass(frozen, subclass, module = "nexus_limits._core")]
        pub struct $name(pub Shared);

        #[pymethods]
        impl $name {
            $($ctor)*

            /// Decides a call of `cost` units for `key` and charges it if admitted.
            #[pyo3(signature = (key, cost=None))]
            fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
                self.0.hit(key, cost)
            }

            /// `hit(key, cost).allowed`, without building a Decision: the hot path.
            #[pyo3(signature = (key, cost=None))]
            fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
                self.0.try_acquire(key, cost)
            }

            /// The Decision `hit` would give, consuming nothing.
            #[pyo3(signature = (key, cost=None))]
            fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
                self.0.peek(key, cost)
            }

            /// `(allowed, remaining)` for a call of one unit now, consuming nothing.
            fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
                self.0.get_limit(key)
            }

            /// Puts `key` back to its fresh state.
            fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
                self.0.reset(key)
            }

            /// Evicts idle keys now (without holding the GIL); returns how many.
            fn sweep(&self, py: Python<'_>) -> usize {
                self.0.sweep(py)
            }

            fn __len__(&self) -> usize {
                self.0.inner.len()
            }

            #[getter]
            fn rate(&self) -> Rate {
                Rate(self.0.rate)
            }

            /// The capacity: burst, window limit or queue size.
            #[getter(limit)]
            fn limit_value(&self) -> u64 {
                self.0.inner.algo.limit()
            }

            /// Idle seconds after which a key is evicted (raised to the time a key
            /// needs to become fresh again, so eviction never changes a decision).
            #[getter]
            fn ttl(&self) -> f64 {
                ns_to_secs(self.0.inner.ttl_ns())
            }

            #[getter]
            fn max_keys(&self) -> Option<usize> {
                self.0.inner.store.max_keys()
            }

            /// The ManualClock given at construction, or None for the monotonic clock.
            #[getter]
            fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
                self.0.clock(py)
            }

            fn __repr__(slf: &Bound<'_, Self>) -> String {
                let extra: fn(&Self) -> String = $extra_repr;
                slf.get().0.repr(slf.as_any(), &extra(slf.get()))
            }
        }
    };
}

fn optional_count(name: &str, value: Option<&Bound<'_, PyAny>>, default: u64) -> PyResult<u64> {
    match value {
        Some(v) if !v.is_none() => args::count(name, v),
        _ => Ok(default),
    }
}

rate_limiter_class!(TokenBucket, |s| format!(", burst={}", s.0.inner.algo.limit()), {
    /// A token bucket holding `burst` tokens (default: the rate's count), refilled
    /// continuously at `rate`. A new key starts full.
    #[new]
    #[pyo3(signature = (rate, burst=None, ttl=None, clock=None, max_keys=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        let algo = Algorithm::TokenBucket(Gcra::new(r, optional_count("burst", burst, r.count)?)?);
        Ok(TokenBucket(Shared::build(r, algo, ttl, clock, max_keys)?))
    }
});

rate_limiter_class!(LeakyBucket, |s| format!(", capacity={}", s.0.inner.algo.limit()), {
    /// A leaky bucket as a queue: admits while `capacity` has room for the cost and
    /// tells each admitted call how long to wait (`Decision.delay`) so that admitted
    /// work leaves at `rate`.
    #[new]
    #[pyo3(signature = (rate, capacity=None, ttl=None, clock=None, max_keys=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        capacity: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        let algo = Algorithm::LeakyBucket(Gcra::new(r, optional_count("capacity", capacity, r.count)?)?);
        Ok(LeakyBucket(Shared::build(r, algo, ttl, clock, max_keys)?))
    }
});

rate_limiter_class!(FixedWindow, |_| String::new(), {
    /// At most the rate's count per window; windows are aligned to multiples of the
    /// period on the limiter's clock.
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        Ok(FixedWindow(Shared::build(r, Algorithm::FixedWindow(Fixed::new(r)?), ttl, clock, max_keys)?))
    }
});

rate_limiter_class!(SlidingWindow, |_| String::new(), {
    /// The two-window weighted counter: estimate = previous * (1 - elapsed/period)
    /// + current must stay within the rate's count.
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        Ok(SlidingWindow(Shared::build(r, Algorithm::SlidingWindow(Sliding::new(r)?), ttl, clock, max_keys)?))
    }
});

/// A limiter object's core limiters (one, or a Composite's parts) and its clock object.
type Parts = (Vec<Arc<Limiter>>, Option<Py<ManualClock>>);

fn parts_of(obj: &Bound<'_, PyAny>) -> PyResult<Parts> {
    let py = obj.py();
    let one = |s: &Shared| (vec![Arc::clone(&s.inner)], s.clock(py));
    if let Ok(x) = obj.cast::<TokenBucket>() {
        return Ok(one(&x.get().0));
    }
    if let Ok(x) = obj.cast::<SlidingWindow>() {
        return Ok(one(&x.get().0));
    }
    if let Ok(x) = obj.cast::<FixedWindow>() {
        return Ok(one(&x.get().0));
    }
    if let Ok(x) = obj.cast::<LeakyBucket>() {
        return Ok(one(&x.get().0));
    }
    if let Ok(x) = obj.cast::<Composite>() {
        let c = x.get();
        return Ok((c.parts.clone(), c.clock.as_ref().map(|k| k.clone_ref(py))));
    }
    Err(wrong_type(
        "each Composite part",
        "a TokenBucket, SlidingWindow, FixedWindow, LeakyBucket or Composite",
        obj,
    ))
}

/// Several limiters on one key, all or nothing: a call is admitted only if every
/// part admits it, and then every part is charged, atomically under threads.
#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Composite {
    parts: Vec<Arc<Limiter>>,
    /// Part indexes sorted by store id: the order shards are locked in.
    order: Vec<usize>,
    objects: Py<PyTuple>,
    clock: Option<Py<ManualClock>>,
}

impl Composite {
    #[inline]
    fn check(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>, charge: bool) -> PyResult<crate::algorithms::Decision> {
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        let costs = [cost; 64];
        Ok(composite_hit(&self.parts, &self.order, &fp, &costs[..self.parts.len()], charge))
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
            for part in more {
                if parts.iter().any(|p| p.store.id() == part.store.id()) {
                    return Err(bad_value("the same limiter appears twice in Composite"));
                }
                parts.push(part);
            }
            clock = clock.or(more_clock);
            objects.push(item);
        }
        if parts.is_empty() {
            return Err(bad_value("Composite needs at least one limiter"));
        }
        if parts.len() > 64 {
            return Err(bad_value("Composite takes at most 64 limiters"));
        }
        let first = &parts[0].clock;
        let same_clock = parts.iter().all(|p| match (&p.clock, first) {
            (Clock::Monotonic, Clock::Monotonic) => true,
            (Clock::Manual(a), Clock::Manual(b)) => a.same(b),
            _ => false,
        });
        if !same_clock {
            return Err(bad_value("all Composite parts must use the same clock"));
        }
        let mut order: Vec<usize> = (0..parts.len()).collect();
        order.sort_by_key(|&i| parts[i].store.id());
        Ok(Composite { parts, order, objects: PyTuple::new(py, objects)?.unbind(), clock })
    }

    #[pyo3(signature = (key, cost=None))]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        Ok(Decision::from_core(self.check(key, cost, true)?))
    }

    #[pyo3(signature = (key, cost=None))]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        Ok(self.check(key, cost, true)?.allowed)
    }

    /// `hit`, also returning each part's own Decision (in the order of `parts`,
    /// flattened): for listing every policy in response headers.
    #[pyo3(signature = (key, cost=None))]
    fn hit_each(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<(Decision, Vec<Decision>)> {
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        let costs = [cost; 64];
        let (d, each) = composite_check(&self.parts, &self.order, &fp, &costs[..self.parts.len()], true);
        Ok((Decision::from_core(d), each.into_iter().map(Decision::from_core).collect()))
    }

    #[pyo3(signature = (key, cost=None))]
    fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        Ok(Decision::from_core(self.check(key, cost, false)?))
    }

    fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
        let zero = 0u64.into_pyobject(key.py())?;
        let d = self.check(key, Some(zero.as_any()), false)?;
        Ok((d.remaining >= 1, d.remaining))
    }

    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let fp = args::key_fp(key)?;
        for p in &self.parts {
            p.reset(&fp);
        }
        Ok(())
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        let parts = self.parts.clone();
        py.detach(move || parts.iter().map(|p| p.sweep()).sum())
    }

    /// Keys tracked by the busiest part.
    fn __len__(&self) -> usize {
        self.parts.iter().map(|p| p.len()).max().unwrap_or(0)
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
        Ok(format!("{name}([{}])", parts.join(", ")))
    }
}
