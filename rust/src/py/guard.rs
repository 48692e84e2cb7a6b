//! Keeps Rust panics from crossing into Python: entry points run their work under
//! `guarded`, which turns a panic into a RuntimeError naming it as an internal error.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, PyErr> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        PyRuntimeError::new_err(format!("internal error in rustchat core (please report): {msg}"))
    })
}

pub fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}
