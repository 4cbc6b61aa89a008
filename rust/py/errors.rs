//! The one place where core errors cross into Python.

use crate::error::Error;
use pyo3::exceptions::{PyTimeoutError, PyTypeError, PyValueError};
use pyo3::prelude::*;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::InvalidRate(msg) | Error::InvalidArgument(msg) => PyValueError::new_err(msg),
            Error::Unsupported(msg) => PyTypeError::new_err(msg),
            Error::Timeout(msg) => PyTimeoutError::new_err(msg),
        }
    }
}

/// A `TypeError` for an argument of the wrong type, naming what was expected and what came.
pub fn wrong_type(what: &str, expected: &str, got: &pyo3::Bound<'_, pyo3::PyAny>) -> PyErr {
    let name = got.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!("{what} must be {expected}, got {name}"))
}

/// A `ValueError` for an argument out of its domain.
pub fn bad_value(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}
