//! Errors of the core. They name the offending input; `py::errors` is the one
//! place that turns them into Python exceptions.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A rate string or rate numbers that cannot describe a quota.
    InvalidRate(String),
    /// Any other argument out of its domain (burst, capacity, ttl, cost, timeout...).
    InvalidArgument(String),
    /// An operation this limiter does not have (e.g. a quota of a Composite's own).
    Unsupported(String),
    /// A shared resource stayed busy past its bound (a store's lock held by a stopped process).
    Timeout(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidRate(msg) | Error::InvalidArgument(msg) | Error::Unsupported(msg) | Error::Timeout(msg) => {
                f.write_str(msg)
            }
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
