//! `Priority`: a rate limiter shared by priority classes (see `crate::priority`).

use super::args;
use super::errors::{bad_value, wrong_type};
use super::limiters::handle_of;
use super::report::{counters_dict, log_shadow, stats_dict};
use super::types::{Decision, ManualClock};
use crate::priority::Share;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

#[pyclass(frozen, subclass, module = "nexus_limits._core")]
pub struct Priority {
    inner: crate::priority::Priority,
    limiter: Py<PyAny>,
    clock: Option<Py<ManualClock>>,
    /// The class of a call that names none.
    default: usize,
}

/// `classes`: a dict (or iterable of pairs) of class name to share.
pub fn classes(value: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Share)>> {
    let items = match value.cast::<PyDict>() {
        Ok(d) => d.items().into_any(),
        Err(_) if value.is_instance_of::<PyString>() => {
            return Err(wrong_type("classes", "a dict of class name to share", value))
        }
        Err(_) => value.clone(),
    };
    let iter = items.try_iter().map_err(|_| wrong_type("classes", "a dict of class name to share", value))?;
    let mut out = Vec::new();
    for item in iter {
        if out.len() > crate::priority::MAX_CLASSES {
            break; // the core refuses it; no need to read an endless iterable
        }
        let (name, share): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
            item?.extract().map_err(|_| bad_value("classes must be a dict of class name to share"))?;
        let name =
            name.cast::<PyString>().map_err(|_| wrong_type("a class name", "a str", &name))?.to_str()?.to_owned();
        if share.is_instance_of::<PyBool>() || !(share.is_instance_of::<PyFloat>() || share.is_instance_of::<PyInt>()) {
            return Err(wrong_type(&format!("the share of class {name:?}"), "a number above 0 and at most 1", &share));
        }
        out.push((name, Share::new(share.extract::<f64>()?)?));
    }
    Ok(out)
}

impl Priority {
    fn class(&self, cls: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
        match cls.filter(|c| !c.is_none()) {
            None => Ok(self.default),
            Some(c) => {
                let name = c.cast::<PyString>().map_err(|_| wrong_type("cls", "a class name (str)", c))?;
                Ok(self.inner.class(name.to_str()?)?)
            }
        }
    }

    fn fp(&self, key: &Bound<'_, PyAny>) -> PyResult<crate::key::Fingerprint> {
        let limiter = self.limiter.bind(key.py());
        handle_of(limiter).expect("checked at construction").fp(key)
    }
}

#[pymethods]
impl Priority {
    #[new]
    #[pyo3(signature = (limiter, classes, default=None))]
    fn new(
        limiter: &Bound<'_, PyAny>,
        classes: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let py = limiter.py();
        let Some(handle) = handle_of(limiter) else {
            return Err(wrong_type("limiter", "a TokenBucket, SlidingWindow, FixedWindow or LeakyBucket", limiter));
        };
        let (core, clock) = handle.parts(py);
        let inner = crate::priority::Priority::new(core, self::classes(classes)?)?;
        let mut out = Priority { default: inner.lowest(), inner, limiter: limiter.clone().unbind(), clock };
        out.default = out.class(default)?;
        Ok(out)
    }

    /// Decides a call of `cost` units of class `cls` (the default class when None) for
    /// `key`, and charges it if admitted.
    #[pyo3(signature = (key, cost=None, cls=None))]
    fn hit(
        &self,
        key: &Bound<'_, PyAny>,
        cost: Option<&Bound<'_, PyAny>>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Decision> {
        let class = self.class(cls)?;
        let checked = self.inner.check(&self.fp(key)?, args::cost(cost)?, class);
        if let Some(denied) = &checked.shadowed {
            let what = format!("{} (class {:?})", self.inner.limiter().quota(), self.inner.classes()[class].name);
            log_shadow(key, &what, denied);
        }
        Ok(Decision::from_checked(checked))
    }

    /// `hit(key, cost, cls).allowed`.
    #[pyo3(signature = (key, cost=None, cls=None))]
    fn try_acquire(
        &self,
        key: &Bound<'_, PyAny>,
        cost: Option<&Bound<'_, PyAny>>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        Ok(self.hit(key, cost, cls)?.allowed)
    }

    /// The Decision `hit` would give, consuming nothing.
    #[pyo3(signature = (key, cost=None, cls=None))]
    fn peek(
        &self,
        key: &Bound<'_, PyAny>,
        cost: Option<&Bound<'_, PyAny>>,
        cls: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Decision> {
        let class = self.class(cls)?;
        Ok(Decision::from_core(self.inner.peek(&self.fp(key)?, args::cost(cost)?, class)))
    }

    /// `(allowed, remaining)` for a call of one unit of class `cls` now, consuming nothing.
    #[pyo3(signature = (key, cls=None))]
    fn get_limit(&self, key: &Bound<'_, PyAny>, cls: Option<&Bound<'_, PyAny>>) -> PyResult<(bool, u64)> {
        let d = self.inner.peek(&self.fp(key)?, 0, self.class(cls)?);
        Ok((d.remaining >= 1, d.remaining))
    }

    /// Puts `key` back to its fresh state (for every class: they share it).
    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        self.inner.limiter().reset(&self.fp(key)?);
        Ok(())
    }

    /// The limiter's stats, with "classes": each class's share and counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let limiter = self.inner.limiter();
        let out = stats_dict(py, &limiter.stats(), limiter.is_shared())?;
        let classes = PyDict::new(py);
        for (name, share, counters) in self.inner.stats() {
            let c = counters_dict(py, &counters)?;
            c.set_item("share", share.fraction())?;
            classes.set_item(name, c)?;
        }
        out.set_item("classes", classes)?;
        Ok(out)
    }

    /// {class name: share}, in the order given.
    #[getter]
    fn classes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for c in self.inner.classes() {
            out.set_item(&c.name, c.share.fraction())?;
        }
        Ok(out)
    }

    /// The class of a call that names none.
    #[getter]
    fn default(&self) -> &str {
        &self.inner.classes()[self.default].name
    }

    /// The limiter the classes share (its quotas, shadow mode and store are theirs).
    #[getter]
    fn limiter(&self, py: Python<'_>) -> Py<PyAny> {
        self.limiter.clone_ref(py)
    }

    #[getter]
    fn clock(&self, py: Python<'_>) -> Option<Py<ManualClock>> {
        self.clock.as_ref().map(|c| c.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let name = slf.get_type().qualname()?.to_string();
        let me = slf.get();
        let py = slf.py();
        let mut classes = Vec::new();
        for c in me.inner.classes() {
            let share = crate::quota::python_float_repr(c.share.fraction());
            classes.push(format!("{}: {share}", PyString::new(py, &c.name).repr()?));
        }
        Ok(format!(
            "{name}({}, {{{}}}, default={})",
            me.limiter.bind(py).repr()?,
            classes.join(", "),
            PyString::new(py, me.default()).repr()?,
        ))
    }
}
