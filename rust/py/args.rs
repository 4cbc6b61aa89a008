//! Argument conversion: keys, costs, rates, clocks, seconds.

use super::errors::{bad_value, wrong_type};
use super::types::{ManualClock, Rate};
use crate::clock::Clock;
use crate::key::{fingerprint, Fingerprint, KeyKind};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString};

/// Fingerprints a key with this process's secret: `str`, `bytes` or `int` (not `bool`).
#[inline]
pub fn key_fp(key: &Bound<'_, PyAny>) -> PyResult<Fingerprint> {
    key_fp_by(key, fingerprint)
}

/// Fingerprints a key with `fp` (a limiter's own, see `Limiter::fingerprint`).
#[inline]
pub fn key_fp_by(key: &Bound<'_, PyAny>, fp: impl Fn(KeyKind, &[u8]) -> Fingerprint) -> PyResult<Fingerprint> {
    if let Ok(s) = key.cast::<PyString>() {
        return Ok(fp(KeyKind::Str, s.to_str()?.as_bytes()));
    }
    if let Ok(b) = key.cast::<PyBytes>() {
        return Ok(fp(KeyKind::Bytes, b.as_bytes()));
    }
    if key.is_instance_of::<PyInt>() && !key.is_instance_of::<PyBool>() {
        if let Ok(v) = key.extract::<i128>() {
            return Ok(fp(KeyKind::Int, &v.to_le_bytes()));
        }
        return int_key_high(key, fp);
    }
    Err(wrong_type("key", "str, bytes or int", key))
}

/// An int key above `i128::MAX`: up to 2^128 - 1 (every unsigned 128-bit value, such as
/// `uuid.UUID.int` or an IPv6 address), else a clear error.
#[cold]
fn int_key_high(key: &Bound<'_, PyAny>, fp: impl Fn(KeyKind, &[u8]) -> Fingerprint) -> PyResult<Fingerprint> {
    match key.extract::<u128>() {
        Ok(v) => Ok(fp(KeyKind::IntHigh, &v.to_le_bytes())),
        Err(_) => {
            let bits = key.call_method0("bit_length").and_then(|b| b.extract::<u64>()).unwrap_or(0);
            Err(bad_value(format!(
                "int keys must fit in 128 bits: from -2**127 to 2**128 - 1 (any signed or unsigned 128-bit \
                 value), got an int of {bits} bits; pass str(key) or bytes for larger numbers"
            )))
        }
    }
}

/// A cost: a non-negative `int` (not `bool`).
#[inline]
pub fn cost(value: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    let Some(v) = value else { return Ok(1) };
    if let Ok(n) = v.extract::<u64>() {
        if !v.is_instance_of::<PyBool>() {
            return Ok(n);
        }
    }
    cost_error(v)
}

#[cold]
fn cost_error(v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>() {
        return Err(bad_value(format!("cost must be a non-negative integer, got {v}")));
    }
    Err(wrong_type("cost", "a non-negative int", v))
}

/// A token count: a non-negative `int` (not `bool`).
pub fn tokens(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(wrong_type("tokens", "a non-negative int", value));
    }
    value.extract().map_err(|_| bad_value(format!("tokens must be a non-negative integer, got {value}")))
}

/// `None` (absent) or a positive whole count.
pub fn optional_count(name: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    match value {
        Some(v) if !v.is_none() => Ok(Some(count(name, v)?)),
        _ => Ok(None),
    }
}

/// A positive whole count (burst, capacity, limit).
pub fn count(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(wrong_type(name, "an int", value));
    }
    match value.extract::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        Err(_) if value.gt(0)? => Err(bad_value(format!("{name} {value} is too large"))),
        _ => Err(bad_value(format!("{name} must be at least 1, got {value}"))),
    }
}

/// Seconds as a float (ints accepted), checked by the caller.
pub fn seconds(name: &str, value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if value.is_instance_of::<PyBool>() || !(value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>()) {
        return Err(wrong_type(name, "a number of seconds", value));
    }
    value.extract::<f64>()
}

/// A rate given as a string or a `Rate`.
pub fn rate(value: &Bound<'_, PyAny>) -> PyResult<crate::rate::Rate> {
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(crate::rate::Rate::parse(s.to_str()?)?);
    }
    if let Ok(r) = value.cast::<Rate>() {
        return Ok(r.get().0);
    }
    Err(wrong_type("rate", "a str such as \"100/minute\" or a Rate", value))
}

/// `None` (the monotonic clock) or a `ManualClock`.
pub fn clock(value: Option<&Bound<'_, PyAny>>) -> PyResult<(Clock, Option<Py<ManualClock>>)> {
    match value {
        None => Ok((Clock::Monotonic, None)),
        Some(v) if v.is_none() => Ok((Clock::Monotonic, None)),
        Some(v) => match v.cast::<ManualClock>() {
            Ok(m) => Ok((Clock::Manual(m.get().0.clone()), Some(m.clone().unbind()))),
            Err(_) => Err(wrong_type("clock", "None or a ManualClock", v)),
        },
    }
}

/// `None` or a positive int.
pub fn max_keys(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => Ok(Some(count("max_keys", v)? as usize)),
    }
}

/// A flag: `True` or `False` only.
pub fn flag(name: &str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    match value.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => Err(wrong_type(name, "True or False", value)),
    }
}

/// `align=`: where windows start, in ns after the Unix epoch. `None` is 0 (UTC
/// boundaries); a number of seconds or a `datetime.timedelta` is that offset; a
/// `datetime.tzinfo` with a fixed UTC offset puts boundaries at that zone's midnight
/// (for a day), i.e. minus its offset.
pub fn align(value: Option<&Bound<'_, PyAny>>) -> PyResult<i64> {
    let Some(v) = value.filter(|v| !v.is_none()) else { return Ok(0) };
    let py = v.py();
    let datetime = py.import("datetime")?;
    let secs: f64 = if v.is_instance(&datetime.getattr("tzinfo")?)? {
        let offset = v.call_method1("utcoffset", (py.None(),))?;
        if offset.is_none() {
            return Err(bad_value(
                "align: this time zone has no fixed UTC offset (daylight saving time moves it), so no fixed window \
                 boundaries; pass a fixed offset such as datetime.timezone(datetime.timedelta(hours=-5)), or seconds",
            ));
        }
        -offset.call_method0("total_seconds")?.extract::<f64>()?
    } else if v.is_instance(&datetime.getattr("timedelta")?)? {
        v.call_method0("total_seconds")?.extract::<f64>()?
    } else if v.is_instance_of::<PyBool>() || !(v.is_instance_of::<PyFloat>() || v.is_instance_of::<PyInt>()) {
        return Err(wrong_type("align", "None, a number of seconds, a datetime.timedelta or a datetime.timezone", v));
    } else {
        v.extract::<f64>()?
    };
    let limit = crate::rate::MAX_PERIOD_NS as f64 / crate::clock::NANOS as f64;
    if !secs.is_finite() || secs.abs() > limit {
        return Err(bad_value(format!(
            "align must be a finite number of seconds within {} days of 0, got {secs}",
            crate::rate::MAX_PERIOD_DAYS
        )));
    }
    Ok((secs * crate::clock::NANOS as f64).round() as i64)
}
