//! nexus-limits: the Rust core of a rate-limiting library for Python.
//!
//! The crate is split the way the state flows:
//! - [`algorithms`]: pure step functions `(state, now, cost, quota) -> (state', decision)`
//!   over a 16-byte per-key state (`u128`), one file per algorithm;
//! - [`store`]: where states live (a sharded concurrent map with idle-key expiry);
//! - [`limiter`]: an algorithm bound to a store and a clock, plus composites and
//!   concurrency leases;
//! - `py` (feature `python`): the PyO3 bindings, the only place that knows about Python.
//!
//! Everything but `py` builds and tests without a Python interpreter.

pub mod algorithms;
pub mod clock;
pub mod error;
pub mod key;
pub mod limiter;
pub mod rate;
pub mod store;

#[cfg(feature = "python")]
mod py;
