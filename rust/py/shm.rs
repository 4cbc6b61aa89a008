//! `SharedMemoryStore`: a handle on a table in shared memory, given to limiters as
//! `store=` (see `crate::limiter` for what a limiter does with it).

use super::args;
use super::errors::{bad_value, wrong_type};
use crate::store::shm::{Location, ShmTable};
use pyo3::prelude::*;
use pyo3::types::PyString;
use std::sync::Arc;

/// A store in shared memory that every process of a host maps: pass it as `store=` to
/// a limiter, in every worker, and the limit holds across all of them.
#[pyclass(frozen, module = "nexus_limits._core")]
pub struct SharedMemoryStore {
    pub table: Arc<ShmTable>,
    name: Option<String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with('.')
}

#[pymethods]
impl SharedMemoryStore {
    #[new]
    #[pyo3(signature = (name=None, capacity=None, *, path=None, ttl=None))]
    fn new(
        py: Python<'_>,
        name: Option<&Bound<'_, PyAny>>,
        capacity: Option<&Bound<'_, PyAny>>,
        path: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let text = |what: &str, v: &Bound<'_, PyAny>| -> PyResult<String> {
            Ok(v.cast::<PyString>().map_err(|_| wrong_type(what, "a str", v))?.to_str()?.to_string())
        };
        let name = name.filter(|v| !v.is_none()).map(|v| text("name", v)).transpose()?;
        let path = match path.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => Some(match v.cast::<PyString>() {
                Ok(s) => s.to_str()?.to_string(),
                Err(_) => {
                    v.call_method0("__fspath__").map_err(|_| wrong_type("path", "a str or a path", v))?.extract()?
                }
            }),
        };
        let capacity = match capacity.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => Some(args::count("capacity", v)?),
        };
        let ttl_secs = match ttl.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => {
                let ttl = args::seconds("ttl", v)?;
                if !(ttl.is_finite() && (1.0..=1e12).contains(&ttl)) {
                    return Err(bad_value(format!("ttl must be a number of seconds from 1, got {ttl}")));
                }
                Some(ttl.ceil() as u64)
            }
        };
        let table = match (&name, &path) {
            (Some(n), None) => {
                if !valid_name(n) {
                    return Err(bad_value(format!(
                        "name {n:?} must be 1 to 200 letters, digits, '_', '-' or '.' (not starting with '.')"
                    )));
                }
                let n = n.clone();
                py.detach(move || ShmTable::open(Location::Name(&n), capacity, ttl_secs))?
            }
            (None, Some(p)) => {
                let p = p.clone();
                py.detach(move || ShmTable::open(Location::Path(&p), capacity, ttl_secs))?
            }
            _ => return Err(bad_value("give a name (POSIX shared memory) or a path, not both")),
        };
        Ok(SharedMemoryStore { table: Arc::new(table), name })
    }

    /// Slots in the table (the most keys it can hold).
    #[getter]
    fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// The file the table lives in.
    #[getter]
    fn path(&self) -> &str {
        &self.table.path
    }

    #[getter]
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Seconds a key must be idle before its slot may go to another key.
    #[getter]
    fn ttl(&self) -> f64 {
        self.table.ttl_secs as f64
    }

    /// Keys held now, all limiters together (walks the table).
    fn __len__(&self, py: Python<'_>) -> usize {
        let table = Arc::clone(&self.table);
        py.detach(move || table.count())
    }

    /// Frees the slots of keys idle past the ttl now; returns how many. (Idle slots are
    /// also taken over on demand when a new key needs one.)
    fn sweep(&self, py: Python<'_>) -> usize {
        let table = Arc::clone(&self.table);
        py.detach(move || table.sweep(crate::clock::monotonic_ns()))
    }

    /// Removes the store's name (or file): processes that have it open keep using it;
    /// the next open creates a new, empty one.
    fn unlink(&self) -> PyResult<()> {
        let path = std::ffi::CString::new(self.table.path.clone()).map_err(|_| bad_value("path has a NUL"))?;
        // SAFETY: a valid C string.
        if unsafe { libc::unlink(path.as_ptr()) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(bad_value(format!("cannot remove {}: {err}", self.table.path)));
            }
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        match &self.name {
            Some(n) => format!("SharedMemoryStore({n:?}, capacity={}, ttl={:?})", self.table.capacity(), self.ttl()),
            None => format!(
                "SharedMemoryStore(path={:?}, capacity={}, ttl={:?})",
                self.table.path,
                self.table.capacity(),
                self.ttl()
            ),
        }
    }
}
