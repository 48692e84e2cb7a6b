//! `num_threads` as Python passes it: None (every core) or a positive int. Zero and negative
//! counts are a one-line ValueError; more than the cores available is capped by the core
//! (`crate::threads::capped`).

use super::guard::value_error;
use pyo3::PyResult;

pub fn thread_count(num_threads: Option<i64>) -> PyResult<Option<usize>> {
    match num_threads {
        Some(n) if n < 1 => Err(value_error(format!("num_threads must be a positive int, got {n}"))),
        n => crate::threads::capped(n.map(|n| usize::try_from(n).unwrap_or(usize::MAX))).map_err(value_error),
    }
}
