//! The rate limiter classes: `TokenBucket`, `SlidingWindow`, `FixedWindow`,
//! `LeakyBucket` and `Composite`. They are frozen native classes meant to be
//! subclassed by the Python package (which adds `acquire`/`acquire_async`); a check
//! goes straight from the caller to the native method.

use super::args;
use super::errors::{bad_value, wrong_type};
use super::types::{Decision, ManualClock, Rate};
use crate::algorithms::{Algorithm, FixedWindow as Fixed, Gcra, SlidingWindow as Sliding};
use crate::clock::ns_to_secs;
use crate::limiter::{Checked, Limiter};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// Builds a limiter's algorithm from a rate, an optional burst/capacity and where
/// windows start (ns after the Unix epoch; buckets ignore it).
type Make = fn(crate::rate::Rate, Option<u64>, i64) -> crate::error::Result<Algorithm>;

/// What every rate limiter class holds.
pub struct Shared {
    pub inner: Arc<Limiter>,
    make: Make,
    /// Where windows start, as given (`align=`), for the quotas set at run time.
    align_ns: i64,
    clock: Option<Py<ManualClock>>,
    /// Set when the states live in a `SharedMemoryStore` (then `inner` only holds the
    /// quota, clock and shadow flag).
    shm: Option<super::shm::ShmPart>,
}

/// The `logging` logger shadow-mode denials are reported to.
static SHADOW_LOGGER: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();

/// Logs a call a limiter in shadow mode admitted although it would have denied it
/// (`denied`, the decision it would have given): INFO on `nexus_limits.shadow`.
#[cold]
pub fn log_shadow(key: &Bound<'_, PyAny>, what: &str, denied: &crate::algorithms::Decision) {
    let py = key.py();
    let logger = SHADOW_LOGGER.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("logging")?.call_method1("getLogger", ("nexus_limits.shadow",))?.unbind())
    });
    if let Ok(logger) = logger {
        let _ = logger.bind(py).call_method1(
            "info",
            (
                "shadow mode: %s would deny key %r (remaining %d of %d, retry after %.3fs)",
                what,
                key,
                denied.remaining,
                denied.limit,
                denied.retry_after.map_or(f64::INFINITY, ns_to_secs),
            ),
        );
    }
}

/// A rate limiter's shadow-mode log line: its algorithm and the key's quota.
#[cold]
fn log_shadow_rate(key: &Bound<'_, PyAny>, slf: &Limiter, denied: &crate::algorithms::Decision) {
    let algo = slf.quota_of(&args::key_fp(key).unwrap_or(crate::key::Fingerprint([0; 3]))).0;
    log_shadow(key, &format!("{} {}", algo.name(), algo.rate()), denied);
}

fn fp_hex(fp: &crate::key::Fingerprint) -> String {
    format!("{:08x}{:08x}{:08x}", fp.0[0], fp.0[1], fp.0[2])
}

impl Shared {
    fn build(rate: crate::rate::Rate, burst: Option<u64>, make: Make, opts: Options<'_, '_>) -> PyResult<Shared> {
        let align_ns = args::align(opts.align)?;
        let ttl = match opts.ttl {
            Some(v) => args::seconds("ttl", v)?,
            None => 3600.0,
        };
        let (core_clock, clock) = args::clock(opts.clock)?;
        let max_keys = args::max_keys(opts.max_keys)?;
        let algo = make(rate, burst, align_ns)?;
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
        Ok(Shared { inner: Arc::new(inner), make, align_ns, clock, shm })
    }

    #[inline]
    fn check(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Checked> {
        let checked = match &self.shm {
            Some(shm) => shm.check(key, args::cost(cost)?, true, self.inner.shadow())?,
            None => {
                let fp = args::key_fp(key)?;
                self.inner.check(&fp, args::cost(cost)?)
            }
        };
        if let Some(denied) = &checked.shadowed {
            log_shadow_rate(key, &self.inner, denied);
        }
        Ok(checked)
    }

    #[inline]
    fn hit(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<Decision> {
        Ok(Decision::from_checked(self.check(key, cost)?))
    }

    #[inline]
    fn try_acquire(&self, key: &Bound<'_, PyAny>, cost: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        Ok(self.check(key, cost)?.decision.allowed)
    }

    fn peek_core(&self, key: &Bound<'_, PyAny>, cost: u64) -> PyResult<crate::algorithms::Decision> {
        match &self.shm {
            Some(shm) => Ok(shm.check(key, cost, false, false)?.decision),
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
        Ok((self.make)(r, burst, self.align_ns)?)
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

/// The candidate key names given to `top_keys`, by fingerprint.
pub fn key_names<'py>(
    keys: Option<&Bound<'py, PyAny>>,
) -> PyResult<crate::key::FingerprintMap<Bound<'py, PyAny>>> {
    let mut names = crate::key::FingerprintMap::<Bound<'py, PyAny>>::default();
    if let Some(keys) = keys.filter(|k| !k.is_none()) {
        let iter = keys.try_iter().map_err(|_| wrong_type("keys", "an iterable of keys", keys))?;
        for k in iter {
            let k = k?;
            names.insert(args::key_fp(&k)?, k);
        }
    }
    Ok(names)
}

/// `top_keys` rows: key (when among the candidates), id, used, limit.
pub fn top_rows<'py>(
    py: Python<'py>,
    names: &crate::key::FingerprintMap<Bound<'py, PyAny>>,
    top: Vec<(crate::key::Fingerprint, u64, u64)>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
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

/// `top_keys(n, keys)` of one core limiter.
pub fn top_keys_of<'py>(
    py: Python<'py>,
    inner: &Arc<Limiter>,
    n: usize,
    keys: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let names = key_names(keys)?;
    let inner = Arc::clone(inner);
    let top = py.detach(move || inner.top(n));
    top_rows(py, &names, top)
}

/// The keyword arguments every limiter class takes.
pub struct Options<'a, 'py> {
    ttl: Option<&'a Bound<'py, PyAny>>,
    clock: Option<&'a Bound<'py, PyAny>>,
    max_keys: Option<&'a Bound<'py, PyAny>>,
    shadow: Option<&'a Bound<'py, PyAny>>,
    store: Option<&'a Bound<'py, PyAny>>,
    align: Option<&'a Bound<'py, PyAny>>,
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

fn make_token_bucket(r: crate::rate::Rate, burst: Option<u64>, _: i64) -> crate::error::Result<Algorithm> {
    Ok(Algorithm::TokenBucket(Gcra::new(r, burst.unwrap_or(r.count))?))
}

fn make_leaky_bucket(r: crate::rate::Rate, capacity: Option<u64>, _: i64) -> crate::error::Result<Algorithm> {
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

fn make_fixed_window(r: crate::rate::Rate, burst: Option<u64>, align: i64) -> crate::error::Result<Algorithm> {
    no_burst("fixed window", burst)?;
    Ok(Algorithm::FixedWindow(Fixed::aligned(r, align)?))
}

fn make_sliding_window(r: crate::rate::Rate, burst: Option<u64>, align: i64) -> crate::error::Result<Algorithm> {
    no_burst("sliding window", burst)?;
    Ok(Algorithm::SlidingWindow(Sliding::aligned(r, align)?))
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
        let opts = Options { ttl, clock, max_keys, shadow, store, align: None };
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
        let opts = Options { ttl, clock, max_keys, shadow, store, align: None };
        Ok(LeakyBucket(Shared::build(r, Some(capacity), make_leaky_bucket, opts)?))
    }
});

fn align_repr(s: &Shared) -> String {
    match s.align_ns {
        0 => String::new(),
        ns => format!(", align={:?}", ns as f64 / crate::clock::NANOS as f64),
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
        let r = args::rate(rate)?;
        let opts = Options { ttl, clock, max_keys, shadow, store, align };
        Ok(FixedWindow(Shared::build(r, None, make_fixed_window, opts)?))
    }

    /// Where windows start: seconds after the Unix epoch (modulo the period), as given.
    #[getter]
    fn align(&self) -> f64 {
        self.0.align_ns as f64 / crate::clock::NANOS as f64
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
        let r = args::rate(rate)?;
        let opts = Options { ttl, clock, max_keys, shadow, store, align };
        Ok(SlidingWindow(Shared::build(r, None, make_sliding_window, opts)?))
    }

    /// Where windows start: seconds after the Unix epoch (modulo the period), as given.
    #[getter]
    fn align(&self) -> f64 {
        self.0.align_ns as f64 / crate::clock::NANOS as f64
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
        return Ok((c.inner.parts().to_vec(), c.clock.as_ref().map(|k| k.clone_ref(py))));
    }
    Err(wrong_type("each Composite part", "a TokenBucket, SlidingWindow, FixedWindow, LeakyBucket or Composite", obj))
}

/// Several limiters on one key, all or nothing: a call is admitted only if every
/// part admits it, and then every part is charged, atomically under threads.
#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Composite {
    inner: crate::limiter::Composite,
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
            if parts.len() > crate::limiter::MAX_PARTS {
                break; // the core refuses it; no need to read an endless iterable
            }
            clock = clock.or(more_clock);
            objects.push(item);
        }
        let inner = crate::limiter::Composite::new(parts)?;
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
        let d = self.inner.check(&args::key_fp(key)?, 0, false).decision;
        Ok((d.remaining >= 1, d.remaining))
    }

    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.reset(&args::key_fp(key)?);
        Ok(())
    }

    fn sweep(&self, py: Python<'_>) -> usize {
        let parts = self.inner.parts().to_vec();
        py.detach(move || parts.iter().map(|p| p.sweep()).sum())
    }

    /// Keys tracked by the busiest part.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// A Composite has no quota of its own: raises TypeError (set quotas on its parts).
    #[pyo3(signature = (key, rate, burst=None))]
    fn set_quota(&self, key: &Bound<'_, PyAny>, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let _ = (key, rate, burst);
        Err(crate::limiter::Composite::no_quota("set_quota").into())
    }

    /// A Composite has no quota of its own: raises TypeError (clear quotas on its parts).
    fn clear_quota(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let _ = key;
        Err(crate::limiter::Composite::no_quota("clear_quota").into())
    }

    /// A Composite has no quota of its own: raises TypeError (set quotas on its parts).
    #[pyo3(signature = (rate, burst=None))]
    fn set_default_quota(&self, rate: &Bound<'_, PyAny>, burst: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let _ = (rate, burst);
        Err(crate::limiter::Composite::no_quota("set_default_quota").into())
    }

    /// The key across the parts now: the combined answer for a call of one unit (the
    /// fields of a part's `inspect`), and each part's `inspect` under "parts".
    fn inspect<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let py = key.py();
        let fp = args::key_fp(key)?;
        let one = self.inner.check(&fp, 1, false).decision;
        let zero = self.inner.check(&fp, 0, false).decision;
        let out = PyDict::new(py);
        out.set_item("key", key)?;
        out.set_item("algorithm", "composite")?;
        out.set_item("rate", py.None())?;
        out.set_item("limit", zero.limit)?;
        out.set_item("own_quota", false)?;
        out.set_item("used", zero.limit.saturating_sub(zero.remaining))?;
        out.set_item("remaining", zero.remaining)?;
        out.set_item("allowed", one.allowed)?;
        out.set_item("retry_after", one.retry_after.map_or(f64::INFINITY, ns_to_secs))?;
        out.set_item("reset_after", ns_to_secs(zero.reset_after))?;
        let parts: Vec<_> = self.inner.parts().iter().map(|p| inspect_dict(key, p)).collect::<PyResult<_>>()?;
        let tracked = parts.iter().any(|d| d.get_item("tracked").ok().flatten().is_some_and(|t| t.is_truthy().unwrap_or(false)));
        out.set_item("tracked", tracked)?;
        out.set_item("shadow", self.inner.shadow())?;
        out.set_item("parts", parts)?;
        Ok(out)
    }

    /// The `n` keys using the largest share of their limit in any part (each with the
    /// part where that share is largest), most used first.
    #[pyo3(signature = (n=10, keys=None))]
    fn top_keys<'py>(&self, py: Python<'py>, n: usize, keys: Option<&Bound<'py, PyAny>>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let names = key_names(keys)?;
        let parts = self.inner.parts().to_vec();
        let top = py.detach(move || crate::limiter::Composite::top_of(&parts, n));
        top_rows(py, &names, top)
    }

    /// Counters of the Composite's own checks (allowed, denied, near_limit,
    /// shadow_denied), keys (busiest part), evicted and own_quotas (summed over the
    /// parts), and each part's `stats()` under "parts".
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.counters();
        let out = PyDict::new(py);
        out.set_item("allowed", c.allowed)?;
        out.set_item("denied", c.denied)?;
        out.set_item("near_limit", c.near_limit)?;
        out.set_item("shadow_denied", c.shadow_denied)?;
        let each: Vec<_> = self.inner.parts().iter().map(|p| p.stats()).collect();
        out.set_item("keys", each.iter().map(|s| s.keys).max().unwrap_or(0))?;
        out.set_item("evicted", each.iter().map(|s| s.evicted).sum::<u64>())?;
        out.set_item("own_quotas", each.iter().map(|s| s.overrides).sum::<usize>())?;
        let parts: Vec<_> = self.inner.parts().iter().map(|p| stats_dict(py, p)).collect::<PyResult<_>>()?;
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
