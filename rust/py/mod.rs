//! The Python module `nexus_limits._core`. PyO3 stays in this folder, and it only
//! converts: arguments into core values here, the core decides, and its answers back
//! into Python values (`report` for dicts and logs; `errors` is the one place where
//! core errors become Python exceptions).

mod args;
mod budget;
mod composite;
mod concurrency;
mod errors;
mod hierarchy;
mod limiters;
mod priority;
mod quota;
mod report;
mod shm;
mod types;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<types::Rate>()?;
    m.add_class::<types::Decision>()?;
    m.add_class::<types::ManualClock>()?;
    m.add_class::<quota::Quota>()?;
    m.add_class::<limiters::TokenBucket>()?;
    m.add_class::<limiters::SlidingWindow>()?;
    m.add_class::<limiters::FixedWindow>()?;
    m.add_class::<limiters::LeakyBucket>()?;
    m.add_class::<composite::Composite>()?;
    m.add_class::<concurrency::Concurrency>()?;
    m.add_class::<concurrency::Lease>()?;
    m.add_class::<budget::TokenLimiter>()?;
    m.add_class::<shm::SharedMemoryStore>()?;
    m.add_class::<priority::Priority>()?;
    m.add_class::<hierarchy::Hierarchy>()?;
    Ok(())
}
