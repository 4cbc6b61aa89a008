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
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// Builds a limiter's algorithm from a rate and an optional burst/capacity.
type Make = fn(crate::rate::Rate, Option<u64>) -> crate::error::Result<Algorithm>;

/// What every rate limiter class holds.
pub struct Shared {
    pub inner: Arc<Limiter>,
    make: Make,
    clock: Option<Py<ManualClock>>,
    /// Set when the states live in a `SharedMemoryStore` (then `inner` only holds the
    /// quota, clock and shadow flag).
    shm: Option<super::shm::ShmPart>,
}

/// The `logging` logger shadow-mode denials are reported to.
static SHADOW_LOGGER: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();

#[cold]
fn log_shadow(key: &Bound<'_, PyAny>, slf: &Limiter, d: &crate::algorithms::Decision) {
    let py = key.py();
    let logger = SHADOW_LOGGER.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("logging")?.call_method1("getLogger", ("nexus_limits.shadow",))?.unbind())
    });
    if let Ok(logger) = logger {
        let algo = slf.quota_of(&args::key_fp(key).unwrap_or(crate::key::Fingerprint([0; 3]))).0;
        let _ = logger.bind(py).call_method1(
            "info",
            (
                "shadow mode: %s %s would deny key %r (remaining %d of %d, retry after %.3fs)",
                algo.name(),
                algo.rate().to_string(),
                key,
                d.remaining,
                d.limit,
                d.retry_after.map_or(f64::INFINITY, ns_to_secs),
            ),
        );
    }
}

fn fp_hex(fp: &crate::key::Fingerprint) -> String {
    format!("{:08x}{:08x}{:08x}", fp.0[0], fp.0[1], fp.0[2])
}

impl Shared {
    fn build(rate: crate::rate::Rate, burst: Option<u64>, make: Make, opts: Options<'_, '_>) -> PyResult<Shared> {
        let ttl = match opts.ttl {
            Some(v) => args::seconds("ttl", v)?,
            None => 3600.0,
        };
        let (core_clock, clock) = args::clock(opts.clock)?;
        let max_keys = args::max_keys(opts.max_keys)?;
        let algo = make(rate, burst)?;
        let shm = match opts.store.filter(|s| !s.is_none()) {
            None => None,
            Some(store) => {
                if max_keys.is_some() {
                    return Err(bad_value("max_keys does not apply with store=: the store's capacity bounds the keys"));
                }
                if opts.ttl.is_some() {
                    return Err(bad_value("ttl does not apply with store=: give it to the SharedMemoryStore"));
                }
                Some(super::shm::ShmPart::new(store, algo.clone(), core_clock.clone())?)
            }
        };
        let inner = Limiter::new(algo, core_clock, ttl, max_keys)?;
        if let Some(shadow) = opts.shadow {
            inner.set_shadow(args::flag("shadow", shadow)?);
        }
        Ok(Shared { inner: Arc::new(inner), make, clock, shm })
    }

    #[inline]
    fn check(
        &self,
        key: &Bound<'_, PyAny>,
        cost: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(crate::algorithms::Decision, bool)> {
        if let Some(shm) = &self.shm {
            let cost = args::cost(cost)?;
            let (d, shadowed) = shm.check(key, cost, true, self.inner.shadow())?;
            if shadowed {
                log_shadow(key, &self.inner, &d);
            }
            return Ok((d, shadowed));
        }
        let fp = args::key_fp(key)?;
        let cost = args::cost(cost)?;
        let (d, shadowed) = self.inner.check(&fp, cost);
        if shadowed {
            log_shadow(key, &self.inner, &d);
        }
        Ok((d, shadowed))
    }

    #[inline]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        let (d, shadowed) = self.check(key, cost)?;
        let mut out = Decision::from_core(d);
        out.shadow = shadowed;
        Ok(out)
    }

    #[inline]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        Ok(self.check(key, cost)?.0.allowed)
    }

    fn peek_core(&self, key: &Bound<'_, PyAny>, cost: u64) -> PyResult<crate::algorithms::Decision> {
        match &self.shm {
            Some(shm) => Ok(shm.check(key, cost, false, false)?.0),
            None => Ok(self.inner.peek(&args::key_fp(key)?, cost)),
        }
    }

    fn peek(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        let cost = args::cost(cost)?;
        Ok(Decision::from_core(self.peek_core(key, cost)?))
    }

    fn get_limit(&self, key: &Bound<'_, PyAny>) -> PyResult<(bool, u64)> {
        let d = self.peek_core(key, 0)?;
        Ok((d.remaining >= 1, d.remaining))
    }

    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        match &self.shm {
            Some(shm) => shm.reset(key),
            None => {
                self.inner.reset(&args::key_fp(key)?);
                Ok(())
            }
        }
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        if let Some(shm) = &self.shm {
            let (table, now) = (Arc::clone(&shm.table), shm.clock.now());
            return py.detach(move || table.sweep(now));
        }
        let inner = Arc::clone(&self.inner);
        py.detach(move || inner.sweep())
    }

    fn len(&self) -> usize {
        match &self.shm {
            Some(shm) => shm.table.count(),
            None => self.inner.len(),
        }
    }

    /// Refuses what a shared-memory limiter cannot do.
    fn in_process_only(&self, what: &str) -> PyResult<()> {
        if self.shm.is_some() {
            return Err(bad_value(format!(
                "{what} is not available with a SharedMemoryStore: the quota is part of the limiter's identity \
                 in the store; build the limiter with the new rate in every process"
            )));
        }
        Ok(())
    }

    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn quota(&self, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<Algorithm> {
        let r = args::rate(rate)?;
        let burst = match burst {
            Some(b) if !b.is_none() => Some(args::count("burst", b)?),
            _ => None,
        };
        Ok((self.make)(r, burst)?)
    }

    fn set_quota(
        &self,
        key: &Bound<'_, PyAny>,
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.in_process_only("set_quota")?;
        let fp = args::key_fp(key)?;
        let algo = self.quota(rate, burst)?;
        Ok(self.inner.set_quota(&fp, algo)?)
    }

    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.in_process_only("clear_quota")?;
        Ok(self.inner.clear_quota(&args::key_fp(key)?))
    }

    fn set_default_quota(
        &self,
        py: Python<'_>,
        rate: &Bound<'_, PyAny>,
        burst: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.in_process_only("set_default_quota")?;
        let algo = self.quota(rate, burst)?;
        let inner = Arc::clone(&self.inner);
        Ok(py.detach(move || inner.set_default(algo))?)
    }

    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let out = inspect_dict(key, &self.inner)?;
        if self.shm.is_some() {
            let one = self.peek_core(key, 1)?;
            let zero = self.peek_core(key, 0)?;
            out.set_item("used", zero.limit.saturating_sub(zero.remaining))?;
            out.set_item("remaining", zero.remaining)?;
            out.set_item("allowed", one.allowed)?;
            out.set_item("retry_after", one.retry_after.map_or(f64::INFINITY, ns_to_secs))?;
            out.set_item("reset_after", ns_to_secs(zero.reset_after))?;
            out.set_item("tracked", zero.remaining < zero.limit)?;
        }
        Ok(out)
    }

    fn top_keys<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        keys: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.in_process_only("top_keys")?;
        top_keys_of(py, &self.inner, n, keys)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = stats_dict(py, &self.inner)?;
        if let Some(shm) = &self.shm {
            let c = *shm.counters.lock();
            out.set_item("allowed", c.allowed)?;
            out.set_item("denied", c.denied)?;
            out.set_item("near_limit", c.near_limit)?;
            out.set_item("shadow_denied", c.shadow_denied)?;
            out.set_item("store_full", shm.full.load(std::sync::atomic::Ordering::Relaxed))?;
            out.set_item("keys", shm.table.count())?;
        }
        Ok(out)
    }

    fn repr(&self, slf: &Bound<'_, PyAny>, extra: &str) -> String {
        let name = slf.get_type().qualname().map(|n| n.to_string()).unwrap_or_default();
        let max_keys = match self.inner.store.max_keys() {
            Some(n) => format!(", max_keys={n}"),
            None => String::new(),
        };
        let shadow = if self.inner.shadow() { ", shadow=True" } else { "" };
        let max_keys = match &self.shm {
            Some(shm) => format!("{max_keys}, store={:?}", shm.table.path),
            None => max_keys,
        };
        format!(
            "{name}('{}'{extra}, ttl={:?}{max_keys}{shadow})",
            self.inner.algo().rate(),
            ns_to_secs(self.inner.ttl_ns())
        )
    }
}

/// `stats()` of one core limiter, as a dict.
pub fn stats_dict<'py>(py: Python<'py>, inner: &Limiter) -> PyResult<Bound<'py, PyDict>> {
    let s = inner.stats();
    let out = PyDict::new(py);
    out.set_item("allowed", s.counters.allowed)?;
    out.set_item("denied", s.counters.denied)?;
    out.set_item("near_limit", s.counters.near_limit)?;
    out.set_item("shadow_denied", s.counters.shadow_denied)?;
    out.set_item("keys", s.keys)?;
    out.set_item("evicted", s.evicted)?;
    out.set_item("own_quotas", s.overrides)?;
    Ok(out)
}

/// `inspect(key)` of one core limiter, as a dict.
pub fn inspect_dict<'py>(key: &Bound<'py, PyAny>, inner: &Limiter) -> PyResult<Bound<'py, PyDict>> {
    let py = key.py();
    let fp = args::key_fp(key)?;
    let (algo, own) = inner.quota_of(&fp);
    let d = inner.peek(&fp, 1);
    let zero = inner.peek(&fp, 0);
    let out = PyDict::new(py);
    out.set_item("key", key)?;
    out.set_item("algorithm", algo.name())?;
    out.set_item("rate", Rate(algo.rate()))?;
    out.set_item("limit", algo.limit())?;
    out.set_item("own_quota", own)?;
    out.set_item("used", zero.limit.saturating_sub(zero.remaining))?;
    out.set_item("remaining", zero.remaining)?;
    out.set_item("allowed", d.allowed)?;
    out.set_item("retry_after", d.retry_after.map_or(f64::INFINITY, ns_to_secs))?;
    out.set_item("reset_after", ns_to_secs(zero.reset_after))?;
    out.set_item("tracked", inner.store.lock(&fp).slot(&fp).is_some())?;
    out.set_item("shadow", inner.shadow())?;
    Ok(out)
}

/// `top_keys(n, keys)` of one core limiter.
pub fn top_keys_of<'py>(
    py: Python<'py>,
    inner: &Arc<Limiter>,
    n: usize,
    keys: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let mut names = crate::key::FingerprintMap::<Bound<'py, PyAny>>::default();
    if let Some(keys) = keys.filter(|k| !k.is_none()) {
        let iter = keys.try_iter().map_err(|_| wrong_type("keys", "an iterable of keys", keys))?;
        for k in iter {
            let k = k?;
            names.insert(args::key_fp(&k)?, k);
        }
    }
    let inner = Arc::clone(inner);
    let top = py.detach(move || inner.top(n));
    top.into_iter()
        .map(|(fp, used, limit)| {
            let out = PyDict::new(py);
            match names.get(&fp) {
                Some(k) => out.set_item("key", k)?,
                None => out.set_item("key", py.None())?,
            }
            out.set_item("id", fp_hex(&fp))?;
            out.set_item("used", used)?;
            out.set_item("limit", limit)?;
            Ok(out)
        })
        .collect()
}

/// The keyword arguments every limiter class takes.
pub struct Options<'a, 'py> {
    ttl: Option<&'a Bound<'py, PyAny>>,
    clock: Option<&'a Bound<'py, PyAny>>,
    max_keys: Option<&'a Bound<'py, PyAny>>,
    shadow: Option<&'a Bound<'py, PyAny>>,
    store: Option<&'a Bound<'py, PyAny>>,
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

            /// Keys tracked (with `store=`: every key in the shared store).
            fn __len__(&self) -> usize {
                self.0.len()
            }

            /// Gives `key` its own quota from its next check on, keeping what it has
            /// used so far (see the README, "Changing quotas at run time").
            #[pyo3(signature = (key, rate, burst=None))]
            fn set_quota(&self, key: &Bound<'_, PyAny>, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                self.0.set_quota(key, rate, burst)
            }

            /// Puts `key` back on the default quota; False if it had none of its own.
            fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
                self.0.clear_quota(key)
            }

            /// Changes the quota of every key without one of its own, keeping usage.
            #[pyo3(signature = (rate, burst=None))]
            fn set_default_quota(&self, py: Python<'_>, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
                self.0.set_default_quota(py, rate, burst)
            }

            /// One key's quota and usage now, for support ("why was I limited?").
            fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
                self.0.inspect(key)
            }

            /// The `n` keys using the largest share of their limit now. Keys are
            /// stored as fingerprints: pass the candidate `keys` to get names back.
            #[pyo3(signature = (n=10, keys=None))]
            fn top_keys<'py>(&self, py: Python<'py>, n: usize, keys: Option<&Bound<'py, PyAny>>) -> PyResult<Vec<Bound<'py, pyo3::types::PyDict>>> {
                self.0.top_keys(py, n, keys)
            }

            /// Counters since construction: allowed, denied, near_limit,
            /// shadow_denied; keys, evicted, own_quotas.
            fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
                self.0.stats(py)
            }

            /// In shadow mode the limiter decides and counts, logs what it would deny
            /// (logger `nexus_limits.shadow`), and never denies.
            #[getter]
            fn shadow(&self) -> bool {
                self.0.inner.shadow()
            }

            #[setter]
            fn set_shadow(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
                self.0.inner.set_shadow(args::flag("shadow", on)?);
                Ok(())
            }

            /// The default rate (keys may have their own; see `set_quota`).
            #[getter]
            fn rate(&self) -> Rate {
                Rate(self.0.inner.algo().rate())
            }

            /// The default capacity: burst, window limit or queue size.
            #[getter(limit)]
            fn limit_value(&self) -> u64 {
                self.0.inner.algo().limit()
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

fn make_token_bucket(r: crate::rate::Rate, burst: Option<u64>) -> crate::error::Result<Algorithm> {
    Ok(Algorithm::TokenBucket(Gcra::new(r, burst.unwrap_or(r.count))?))
}

fn make_leaky_bucket(r: crate::rate::Rate, capacity: Option<u64>) -> crate::error::Result<Algorithm> {
    Ok(Algorithm::LeakyBucket(Gcra::new(r, capacity.unwrap_or(r.count))?))
}

fn no_burst(name: &str, burst: Option<u64>) -> crate::error::Result<()> {
    match burst {
        Some(_) => {
            Err(crate::error::Error::InvalidArgument(format!("a {name} has no burst: its limit is the rate's count")))
        }
        None => Ok(()),
    }
}

fn make_fixed_window(r: crate::rate::Rate, burst: Option<u64>) -> crate::error::Result<Algorithm> {
    no_burst("fixed window", burst)?;
    Ok(Algorithm::FixedWindow(Fixed::new(r)?))
}

fn make_sliding_window(r: crate::rate::Rate, burst: Option<u64>) -> crate::error::Result<Algorithm> {
    no_burst("sliding window", burst)?;
    Ok(Algorithm::SlidingWindow(Sliding::new(r)?))
}

rate_limiter_class!(TokenBucket, |s| format!(", burst={}", s.0.inner.algo().limit()), {
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
        let r = args::rate(rate)?;
        let burst = optional_count("burst", burst, r.count)?;
        let opts = Options { ttl, clock, max_keys, shadow, store };
        Ok(TokenBucket(Shared::build(r, Some(burst), make_token_bucket, opts)?))
    }
});

rate_limiter_class!(LeakyBucket, |s| format!(", capacity={}", s.0.inner.algo().limit()), {
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
        let r = args::rate(rate)?;
        let capacity = optional_count("capacity", capacity, r.count)?;
        let opts = Options { ttl, clock, max_keys, shadow, store };
        Ok(LeakyBucket(Shared::build(r, Some(capacity), make_leaky_bucket, opts)?))
    }
});

rate_limiter_class!(FixedWindow, |_| String::new(), {
    /// At most the rate's count per window; windows are aligned to multiples of the
    /// period on the limiter's clock.
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None, shadow=None, store=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        let opts = Options { ttl, clock, max_keys, shadow, store };
        Ok(FixedWindow(Shared::build(r, None, make_fixed_window, opts)?))
    }
});

rate_limiter_class!(SlidingWindow, |_| String::new(), {
    /// The two-window weighted counter: estimate = previous * (1 - elapsed/period)
    /// + current must stay within the rate's count.
    #[new]
    #[pyo3(signature = (rate, ttl=None, clock=None, max_keys=None, shadow=None, store=None))]
    fn new(
        rate: &Bound<'_, PyAny>,
        ttl: Option<&Bound<'_, PyAny>>,
        clock: Option<&Bound<'_, PyAny>>,
        max_keys: Option<&Bound<'_, PyAny>>,
        shadow: Option<&Bound<'_, PyAny>>,
        store: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let r = args::rate(rate)?;
        let opts = Options { ttl, clock, max_keys, shadow, store };
        Ok(SlidingWindow(Shared::build(r, None, make_sliding_window, opts)?))
    }
});

/// A limiter object's core limiters (one, or a Composite's parts) and its clock object.
type Parts = (Vec<Arc<Limiter>>, Option<Py<ManualClock>>);

fn parts_of(obj: &Bound<'_, PyAny>) -> PyResult<Parts> {
    let py = obj.py();
    let one = |s: &Shared| -> PyResult<Parts> {
        if s.shm.is_some() {
            return Err(bad_value("Composite parts must keep their states in-process (not in a SharedMemoryStore)"));
        }
        Ok((vec![Arc::clone(&s.inner)], s.clock(py)))
    };
    if let Ok(x) = obj.cast::<TokenBucket>() {
        return one(&x.get().0);
    }
    if let Ok(x) = obj.cast::<SlidingWindow>() {
        return one(&x.get().0);
    }
    if let Ok(x) = obj.cast::<FixedWindow>() {
        return one(&x.get().0);
    }
    if let Ok(x) = obj.cast::<LeakyBucket>() {
        return one(&x.get().0);
    }
    if let Ok(x) = obj.cast::<Composite>() {
        let c = x.get();
        return Ok((c.parts.clone(), c.clock.as_ref().map(|k| k.clone_ref(py))));
    }
    Err(wrong_type("each Composite part", "a TokenBucket, SlidingWindow, FixedWindow, LeakyBucket or Composite", obj))
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
    fn check(
        &self,
        key: &Bound<'_, PyAny>,
        cost: Option<&Bound<'_, PyAny>>,
        charge: bool,
    ) -> PyResult<crate::algorithms::Decision> {
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
