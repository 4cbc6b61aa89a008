//! The Python module `nexus_limits._core`. PyO3 stays in this folder: arguments are
//! converted here, the core in `crate::limiter` does the work, and `errors` is the one
//! place where core errors become Python exceptions.

mod args;
mod concurrency;
mod errors;
mod limiters;
mod shm;
mod tokens;
mod types;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<types::Rate>()?;
    m.add_class::<types::Decision>()?;
    m.add_class::<types::ManualClock>()?;
    m.add_class::<limiters::TokenBucket>()?;
    m.add_class::<limiters::SlidingWindow>()?;
    m.add_class::<limiters::FixedWindow>()?;
    m.add_class::<limiters::LeakyBucket>()?;
    m.add_class::<limiters::Composite>()?;
    m.add_class::<concurrency::Concurrency>()?;
    m.add_class::<concurrency::Lease>()?;
    m.add_class::<tokens::TokenLimiter>()?;
    m.add_class::<shm::SharedMemoryStore>()?;
    Ok(())
}
