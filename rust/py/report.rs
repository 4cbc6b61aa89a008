//! The core's reports as Python values: `stats()` and `inspect()` dicts, `top_keys`
//! rows, and shadow-mode log lines.

use super::args;
use super::errors::wrong_type;
use super::types::Rate;
use crate::clock::ns_to_secs;
use crate::key::{Fingerprint, FingerprintMap};
use crate::limiter::Stats;
use crate::report::{Counters, Inspection, TopRow};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The `logging` logger shadow-mode denials are reported to.
static SHADOW_LOGGER: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();

/// Logs a call a limiter in shadow mode admitted although it would have denied it
/// (`denied`, the decision it would have given): INFO on `nexus_limits.shadow`.
#[cold]
pub fn log_shadow(key: &Bound<'_, PyAny>, what: &str, denied: &crate::decision::Decision) {
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
                retry_secs(denied.retry_after),
            ),
        );
    }
}

/// A `retry_after` in seconds: `inf` when no wait helps.
pub fn retry_secs(retry_after: Option<u64>) -> f64 {
    retry_after.map_or(f64::INFINITY, ns_to_secs)
}

/// The counters every limiter's `stats()` starts with.
pub fn counters_dict<'py>(py: Python<'py>, c: &Counters) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("allowed", c.allowed)?;
    out.set_item("denied", c.denied)?;
    out.set_item("near_limit", c.near_limit)?;
    out.set_item("shadow_denied", c.shadow_denied)?;
    Ok(out)
}

/// A rate limiter's `stats()`. `store_full` is reported for a shared-memory store, whose
/// fixed capacity makes it part of watching it.
pub fn stats_dict<'py>(py: Python<'py>, s: &Stats, shared: bool) -> PyResult<Bound<'py, PyDict>> {
    let out = counters_dict(py, &s.counters)?;
    out.set_item("keys", s.keys)?;
    out.set_item("evicted", s.evicted)?;
    out.set_item("own_quotas", s.overrides)?;
    if shared {
        out.set_item("store_full", s.store_full)?;
    }
    Ok(out)
}

/// `inspect(key)`.
pub fn inspection_dict<'py>(key: &Bound<'py, PyAny>, i: &Inspection) -> PyResult<Bound<'py, PyDict>> {
    let py = key.py();
    let out = PyDict::new(py);
    out.set_item("key", key)?;
    out.set_item("algorithm", i.algorithm)?;
    match i.rate {
        Some(r) => out.set_item("rate", Rate(r))?,
        None => out.set_item("rate", py.None())?,
    }
    out.set_item("limit", i.limit)?;
    out.set_item("own_quota", i.own_quota)?;
    out.set_item("used", i.used)?;
    out.set_item("remaining", i.remaining)?;
    out.set_item("allowed", i.allowed)?;
    out.set_item("retry_after", retry_secs(i.retry_after))?;
    out.set_item("reset_after", ns_to_secs(i.reset_after))?;
    out.set_item("tracked", i.tracked)?;
    out.set_item("shadow", i.shadow)?;
    Ok(out)
}

/// The candidate key names given to `top_keys`, by fingerprint (`fingerprint` is the
/// limiter's own).
pub fn key_names<'py>(
    keys: Option<&Bound<'py, PyAny>>,
    fingerprint: impl Fn(&Bound<'py, PyAny>) -> PyResult<Fingerprint>,
) -> PyResult<FingerprintMap<Bound<'py, PyAny>>> {
    let mut names = FingerprintMap::<Bound<'py, PyAny>>::default();
    if let Some(keys) = keys.filter(|k| !k.is_none()) {
        let iter = keys.try_iter().map_err(|_| wrong_type("keys", "an iterable of keys", keys))?;
        for k in iter {
            let k = k?;
            names.insert(fingerprint(&k)?, k);
        }
    }
    Ok(names)
}

/// [`key_names`] for limiters keyed with this process's fingerprints.
pub fn process_key_names<'py>(keys: Option<&Bound<'py, PyAny>>) -> PyResult<FingerprintMap<Bound<'py, PyAny>>> {
    key_names(keys, args::key_fp)
}

/// `top_keys` rows: key (when among the candidates), id, used, limit.
pub fn top_rows<'py>(
    py: Python<'py>,
    names: &FingerprintMap<Bound<'py, PyAny>>,
    top: Vec<TopRow>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    top.into_iter()
        .map(|(fp, used, limit)| {
            let out = PyDict::new(py);
            match names.get(&fp) {
                Some(k) => out.set_item("key", k)?,
                None => out.set_item("key", py.None())?,
            }
            out.set_item("id", format!("{:08x}{:08x}{:08x}", fp.0[0], fp.0[1], fp.0[2]))?;
            out.set_item("used", used)?;
            out.set_item("limit", limit)?;
            Ok(out)
        })
        .collect()
}
