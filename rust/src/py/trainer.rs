//! `BpeTrainer`: the streaming trainer as a Python class (`feed` batches, then `learn`).

use super::guard::{guarded, value_error};
use super::text::{borrow_strs, list_items};
use crate::bpe::MAX_VOCAB;
use crate::pretokenize::Splitter;
use crate::train::{learn_merges, ChunkCounter};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// Streaming BPE trainer: `feed` batches of documents, then `learn`.
#[pyclass(module = "rustchat._core", name = "BpeTrainer")]
pub struct PyTrainer {
    counter: Option<ChunkCounter>,
}

impl PyTrainer {
    fn counter(&mut self) -> PyResult<&mut ChunkCounter> {
        self.counter.as_mut().ok_or_else(|| PyValueError::new_err("this trainer has already learned its merges"))
    }
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (pattern, doc_cap=None, max_chars=None))]
    fn new(pattern: &str, doc_cap: Option<usize>, max_chars: Option<u64>) -> PyResult<Self> {
        let splitter = Splitter::new(pattern).map_err(value_error)?;
        Ok(PyTrainer { counter: Some(ChunkCounter::new(splitter, doc_cap, max_chars)) })
    }

    /// Counts the chunks of a list of documents; returns True once `max_chars` is reached.
    fn feed(&mut self, py: Python<'_>, texts: &Bound<'_, PyList>) -> PyResult<bool> {
        let mut items: Vec<Bound<'_, PyAny>> = list_items(texts);
        let strs = borrow_strs(&mut items, "texts")?;
        let counter = self.counter()?;
        py.detach(|| guarded(|| counter.feed(&strs)))?.map_err(value_error)?;
        Ok(counter.full())
    }

    #[getter]
    fn chars_seen(&self) -> u64 {
        self.counter.as_ref().map_or(0, |c| c.chars_seen())
    }

    #[getter]
    fn unique_chunks(&self) -> usize {
        self.counter.as_ref().map_or(0, |c| c.unique_chunks())
    }

    /// Learns up to `n_merges` merges; returns the new tokens' bytes in id order (256+i).
    #[pyo3(signature = (n_merges, verbose=false))]
    fn learn<'py>(&mut self, py: Python<'py>, n_merges: usize, verbose: bool) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        if n_merges > MAX_VOCAB - 256 {
            return Err(PyValueError::new_err(format!("{n_merges} merges is too many: ids must be below {MAX_VOCAB}")));
        }
        let counter =
            self.counter.take().ok_or_else(|| PyValueError::new_err("this trainer has already learned its merges"))?;
        let merges = py.detach(|| {
            guarded(|| {
                let t0 = std::time::Instant::now();
                learn_merges(counter.into_counts(), n_merges, |done| {
                    if verbose {
                        eprint!("\rmerges {done}/{n_merges} ({:.1}s)", t0.elapsed().as_secs_f64());
                        if done == n_merges {
                            eprintln!();
                        }
                    }
                })
            })
        })?;
        Ok(merges.iter().map(|m| PyBytes::new(py, m)).collect())
    }
}
