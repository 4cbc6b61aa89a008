//! The rate limiter classes: `TokenBucket`, `SlidingWindow`, `FixedWindow` and
//! `LeakyBucket`. They are frozen native classes meant to be subclassed by the Python
//! package (which adds `acquire`/`acquire_async`); a check goes straight from the caller
//! to the native method. Each holds a core `Limiter` (over either store) and converts.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::quota::{align_secs, Quota};
use super::report::{inspection_dict, key_names, log_shadow, stats_dict, top_rows};
use super::shm::SharedMemoryStore;
use super::types::{Decision, ManualClock, Rate};
use crate::clock::ns_to_secs;
use crate::decision::Checked;
use crate::key::Fingerprint;
use crate::limiter::Limiter;
use crate::quota::Kind;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// What every rate limiter class holds: its core limiter and the clock object given.
pub struct LimiterHandle {
    pub limiter: Arc<Limiter>,
    clock: Option<Py<ManualClock>>,
}

/// The keyword arguments every rate limiter class takes.
pub struct Options<'a, 'py> {
    ttl: Option<&'a Bound<'py, PyAny>>,
    clock: Option<&'a Bound<'py, PyAny>>,
    max_keys: Option<&'a Bound<'py, PyAny>>,
    shadow: Option<&'a Bound<'py, PyAny>>,
    store: Option<&'a Bound<'py, PyAny>>,
    align: Option<&'a Bound<'py, PyAny>>,
}

impl LimiterHandle {
    fn build(
        kind: Kind,
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
        opts: Options<'_, '_>,
    ) -> PyResult<Self> {
        let rate = args::rate(rate)?;
        let burst = args::optional_count(if kind == Kind::LeakyBucket { "capacity" } else { "burst" }, burst)?;
        let align_ns = args::align(opts.align)?;
        let ttl = opts.ttl.map(|v| args::seconds("ttl", v)).transpose()?;
        let (core_clock, clock) = args::clock(opts.clock)?;
        let max_keys = args::max_keys(opts.max_keys)?;
        let quota = crate::quota::Quota::new(kind, rate, burst, align_ns)?;
        let limiter = match opts.store.filter(|s| !s.is_none()) {
            None => Limiter::new(quota, core_clock, ttl.unwrap_or(3600.0), max_keys)?,
            Some(store) => {
                if max_keys.is_some() {
                    return Err(bad_value("max_keys does not apply with store=: the store's capacity bounds the keys"));
                }
                if ttl.is_some() {
                    return Err(bad_value("ttl does not apply with store=: give it to the SharedMemoryStore"));
                }
                let store =
                    store.cast::<SharedMemoryStore>().map_err(|_| wrong_type("store", "a SharedMemoryStore", store))?;
                Limiter::on_shared_memory(quota, core_clock, Arc::clone(&store.get().table))?
            }
        };
        if let Some(shadow) = opts.shadow {
            limiter.set_shadow(args::flag("shadow", shadow)?);
        }
        Ok(LimiterHandle { limiter: Arc::new(limiter), clock })
    }

    /// The key's fingerprint in this limiter's store.
    #[inline(always)]
    pub fn fp(&self, key: &Bound<'_, PyAny>) -> PyResult<Fingerprint> {
        args::key_fp_by(key, |kind, bytes| self.limiter.fingerprint(kind, bytes))
    }

    #[inline]
    fn check(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Checked> {
        let checked = self.limiter.check(&self.fp(key)?, args::cost(cost)?);
        if let Some(denied) = &checked.shadowed {
            self.log_shadow(key, denied);
        }
        Ok(checked)
    }

    /// The shadow-mode log line names the key's quota.
    #[cold]
    fn log_shadow(&self, key: &Bound<'_, PyAny>, denied: &crate::decision::Decision) {
        let quota = self.fp(key).map(|fp| self.limiter.quota_of(&fp).0).unwrap_or_else(|_| self.limiter.quota());
        log_shadow(key, &quota.to_string(), denied);
    }

    fn quota(&self, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<crate::quota::Quota> {
        let burst = args::optional_count("burst", burst)?;
        Ok(self.limiter.quota().with_rate(args::rate(rate)?, burst)?)
    }

    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn repr(&self, slf: &Bound<'_, PyAny>, extra: &str) -> String {
        let name = slf.get_type().qualname().map(|n| n.to_string()).unwrap_or_default();
        let mut more = String::new();
        if let Some(n) = self.limiter.max_keys() {
            more += &format!(", max_keys={n}");
        }
        if let Some(path) = self.limiter.store_path() {
            more += &format!(", store={path:?}");
        }
        if self.limiter.shadow() {
            more += ", shadow=True";
        }
        let ttl = ns_to_secs(self.limiter.ttl_ns());
        format!("{name}('{}'{extra}, ttl={ttl:?}{more})", self.limiter.quota().rate())
    }
}

/// Generates a rate limiter class: its constructor (and any getter of its own) is given,
/// the rest is shared.
macro_rules! rate_limiter_class {
    ($name:ident, $extra_repr:expr, { $($ctor:tt)* }) => {
        #[pyclass(frozen, subclass, module = "nexus_limits._core")]
        pub struct $name(pub LimiterHandle);

        #[pymethods]
        impl $name {
            $($ctor)*

            /// Decides a call of `cost` units for `key` and charges it if admitted.
            #[pyo3(signature = (key, cost=None))]
            fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
                Ok(Decision::from_checked(self.0.check(key, cost)?))
            }

            /// `hit(key, cost).allowed`, without building a Decision: the hot path.
            #[pyo3(signature = (key, cost=None))]
            fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
                Ok(self.0.check(key, cost)?.decision.allowed)
            }

            /// The Decision `hit` would give, consuming nothing.
            #[pyo3(signature = (key, cost=None))]
            fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
                let cost = args::cost(cost)?;
                Ok(Decision::from_core(self.0.limiter.peek(&self.0.fp(key)?, cost)))
            }

            /// `(allowed, remaining)` for a call of one unit now, consuming nothing.
            fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
                Ok(self.0.limiter.get_limit(&self.0.fp(key)?))
            }

            /// Puts `key` back to its fresh state.
            fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
                self.0.limiter.reset(&self.0.fp(key)?);
                Ok(())
            }

            /// Evicts idle keys now (without holding the GIL); returns how many.
            fn sweep(&self, py: Python<'_>) -> usize {
                let limiter = Arc::clone(&self.0.limiter);
                py.detach(move || limiter.sweep())
            }

            /// Keys tracked (with `store=`: every key in the shared store).
            fn __len__(&self) -> usize {
                self.0.limiter.len()
            }

            /// Gives `key` its own quota from its next check on, keeping what it has
            /// used so far (see the README, "Changing quotas at run time").
            #[pyo3(signature = (key, rate, burst=None))]
            fn set_quota(&self, key: &Bound<'_, PyAny>, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                let fp = self.0.fp(key)?;
                Ok(self.0.limiter.set_quota(&fp, self.0.quota(rate, burst)?)?)
            }

            /// Puts `key` back on the default quota; False if it had none of its own.
            fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
                Ok(self.0.limiter.clear_quota(&self.0.fp(key)?)?)
            }

            /// Changes the quota of every key without one of its own, keeping usage.
            #[pyo3(signature = (rate, burst=None))]
            fn set_default_quota(&self, py: Python<'_>, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                let quota = self.0.quota(rate, burst)?;
                let limiter = Arc::clone(&self.0.limiter);
                Ok(py.detach(move || limiter.set_default(quota))?)
            }

            /// One key's quota and usage now, for support ("why was I limited?").
            fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
                inspection_dict(key, &self.0.limiter.inspect(&self.0.fp(key)?))
            }

            /// The `n` keys using the largest share of their limit now. Keys are
            /// stored as fingerprints: pass the candidate `keys` to get names back.
            #[pyo3(signature = (n=10, keys=None))]
            fn top_keys<'py>(&self, py: Python<'py>, n: usize, keys: Option<&Bound<'py, PyAny>>) -> PyResult<Vec<Bound<'py, PyDict>>> {
                let names = key_names(keys, |k| self.0.fp(k))?;
                let limiter = Arc::clone(&self.0.limiter);
                let top = py.detach(move || limiter.top(n))?;
                top_rows(py, &names, top)
            }

            /// Counters since construction: allowed, denied, near_limit,
            /// shadow_denied; keys, evicted, own_quotas (and store_full with `store=`).
            fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                stats_dict(py, &self.0.limiter.stats(), self.0.limiter.is_shared())
            }

            /// In shadow mode the limiter decides and counts, logs what it would deny
            /// (logger `nexus_limits.shadow`), and never denies.
            #[getter]
            fn shadow(&self) -> bool {
                self.0.limiter.shadow()
            }

            #[setter]
            fn set_shadow(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
                self.0.limiter.set_shadow(args::flag("shadow", on)?);
                Ok(())
            }

            /// The default quota (keys may have their own; see `set_quota`).
            #[getter]
            fn quota(&self) -> Quota {
                Quota(self.0.limiter.quota())
            }

            /// The default rate (keys may have their own; see `set_quota`).
            #[getter]
            fn rate(&self) -> Rate {
                Rate(self.0.limiter.quota().rate())
            }

            /// The default capacity: burst, window limit or queue size.
            #[getter(limit)]
            fn limit_value(&self) -> u64 {
                self.0.limiter.quota().limit()
            }

            /// Idle seconds after which a key is evicted (raised to the time a key
            /// needs to become fresh again, so eviction never changes a decision).
            #[getter]
            fn ttl(&self) -> f64 {
                ns_to_secs(self.0.limiter.ttl_ns())
            }

            #[getter]
            fn max_keys(&self) -> Option<usize> {
                self.0.limiter.max_keys()
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

rate_limiter_class!(TokenBucket, |s| format!(", burst={}", s.0.limiter.quota().limit()), {
    /// A token bucket holding `burst` tokens (default: the rate's count), refilled
    /// continuously at `rate`. A new key starts full.
    #[new]
    #[pyo3(signature = (rate, burst=None, ttl=None, clock=None, max_keys=None, shadow=None, store=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let opts = Options { ttl, clock, max_keys, shadow, store, align: None };
        Ok(TokenBucket(LimiterHandle::build(Kind::TokenBucket, rate, burst, opts)?))
    }
});

rate_limiter_class!(LeakyBucket, |s| format!(", capacity={}", s.0.limiter.quota().limit()), {
    /// A leaky bucket as a queue: admits while `capacity` has room for the cost and
    /// tells each admitted call how long to wait (`Decision.delay`) so that admitted
    /// work leaves at `rate`.
    #[new]
    #[pyo3(signature = (rate, capacity=None, ttl=None, clock=None, max_keys=None, shadow=None, store=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        capacity: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let opts = Options { ttl, clock, max_keys, shadow, store, align: None };
        Ok(LeakyBucket(LimiterHandle::build(Kind::LeakyBucket, rate, capacity, opts)?))
    }
});

/// Where a window limiter's windows start, as given: seconds, 0.0 by default.
fn align_of(s: &LimiterHandle) -> f64 {
    s.limiter.quota().align_ns().map_or(0.0, align_secs)
}

fn align_repr(s: &LimiterHandle) -> String {
    let secs = align_of(s);
    if secs == 0.0 {
        String::new()
    } else {
        format!(", align={secs:?}")
    }
}

rate_limiter_class!(FixedWindow, |s| align_repr(&s.0), {
    /// At most the rate's count per window. Windows start at multiples of the period
    /// from the Unix epoch (a day at UTC midnight), plus `align`: seconds, a
    /// `datetime.timedelta`, or a fixed-offset `datetime.timezone` (a day then starts at
    /// that zone's midnight).
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None, shadow=None, store=None, *, align=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
        align: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let opts = Options { ttl, clock, max_keys, shadow, store, align };
        Ok(FixedWindow(LimiterHandle::build(Kind::FixedWindow, rate, None, opts)?))
    }

    /// Where windows start: seconds after the Unix epoch (modulo the period), as given.
    #[getter]
    fn align(&self) -> f64 {
        align_of(&self.0)
    }
});

rate_limiter_class!(SlidingWindow, |s| align_repr(&s.0), {
    /// The two-window weighted counter: estimate = previous * (1 - elapsed/period)
    /// + current must stay within the rate's count. Windows start like a FixedWindow's
    /// (the Unix epoch, plus `align`).
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None, shadow=None, store=None, *, align=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
        align: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let opts = Options { ttl, clock, max_keys, shadow, store, align };
        Ok(SlidingWindow(LimiterHandle::build(Kind::SlidingWindow, rate, None, opts)?))
    }

    /// Where windows start: seconds after the Unix epoch (modulo the period), as given.
    #[getter]
    fn align(&self) -> f64 {
        align_of(&self.0)
    }
});

/// The core limiter and clock object of a rate limiter object, if it is one.
pub fn handle_of<'a>(obj: &'a Bound<'_, PyAny>) -> Option<&'a LimiterHandle> {
    if let Ok(x) = obj.cast::<TokenBucket>() {
        return Some(&x.get().0);
    }
    if let Ok(x) = obj.cast::<SlidingWindow>() {
        return Some(&x.get().0);
    }
    if let Ok(x) = obj.cast::<FixedWindow>() {
        return Some(&x.get().0);
    }
    obj.cast::<LeakyBucket>().ok().map(|x| &x.get().0)
}

impl LimiterHandle {
    /// The limiter and its clock object, for a Composite built over it.
    pub fn parts(&self, py: Python<'_>) -> (Arc<Limiter>, Option<Py<ManualClock>>) {
        (Arc::clone(&self.limiter), self.clock(py))
    }
}
