//! nexus-limits: the Rust core of a rate-limiting library for Python.
//!
//! The crate is split the way a check flows, key → quota → step over the stored state →
//! decision:
//! - [`key`]: fingerprints of the user's keys; [`rate`]: rates such as `"100/minute"`;
//! - [`quota`]: an algorithm with its rate and capacity, as one checked value;
//! - [`algorithms`]: pure step functions `(state, now, cost) -> (state', decision)` over
//!   a 16-byte per-key state (`u128`), one file per algorithm;
//! - [`store`]: where states live (a sharded map in this process, or a table in shared
//!   memory for every process of a host);
//! - [`decision`]: the answer, and how several combine;
//! - [`limiter`]: a quota over either store, with shadow mode, counters and quotas
//!   changed at run time; [`composite`]: limiters checked all or nothing;
//!   [`concurrency`]: leases; [`budget`]: LLM token budgets reserved and settled;
//! - [`report`]: counters, inspections and busiest keys, alike for every limiter;
//! - `py` (feature `python`): the PyO3 bindings, which only convert between Python and
//!   these types.
//!
//! Everything but `py` builds and tests without a Python interpreter.

pub mod algorithms;
pub mod budget;
pub mod clock;
pub mod composite;
pub mod concurrency;
pub mod decision;
pub mod error;
pub mod hierarchy;
pub mod key;
pub mod limiter;
pub mod priority;
pub mod quota;
pub mod rate;
pub mod report;
pub mod store;

#[cfg(feature = "python")]
mod py;
