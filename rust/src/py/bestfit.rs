//! `BestFitPacker`: the BOS-aligned best-fit packer (`crate::bestfit`) as a Python class. Token
//! ids cross as little-endian buffers (numpy arrays), rows come back as one bytearray.

use super::collate::le_offsets;
use super::guard::{guarded, value_error};
use crate::bestfit::{BestFit, Fill};
use crate::le::{bytes_to_u32s, write_u32s};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

#[pyclass(module = "rustchat._core", name = "BestFitPacker")]
pub struct PyBestFit {
    inner: BestFit,
}

#[pymethods]
impl PyBestFit {
    #[new]
    fn new(row_capacity: usize, min_buffer: usize) -> PyResult<Self> {
        Ok(PyBestFit { inner: BestFit::new(row_capacity, min_buffer).map_err(value_error)? })
    }

    /// Buffers documents: ids (u32 LE), offsets (i64 LE, n+1 bounds), tags (u64 LE, one per document).
    fn push(&mut self, py: Python<'_>, ids: &[u8], offsets: &[u8], tags: &[u8]) -> PyResult<()> {
        let ids = bytes_to_u32s(ids, "ids").map_err(value_error)?;
        let offs = le_offsets(offsets)?;
        if !tags.len().is_multiple_of(8) {
            return Err(PyValueError::new_err(format!("tags: buffer length {} is not a multiple of 8", tags.len())));
        }
        let tags: Vec<u64> = tags.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        if offs.len() != tags.len() + 1 {
            return Err(PyValueError::new_err(format!(
                "{} offsets for {} documents (need n+1)",
                offs.len(),
                tags.len()
            )));
        }
        if offs.windows(2).any(|w| w[1] < w[0]) || offs.last().is_some_and(|&e| e > ids.len()) {
            return Err(PyValueError::new_err("offsets must rise to at most the number of ids"));
        }
        let inner = &mut self.inner;
        py.detach(|| {
            guarded(|| {
                for (d, tag) in tags.iter().enumerate() {
                    inner.push(&ids[offs[d]..offs[d + 1]], *tag);
                }
            })
        })
    }

    /// Places documents until `rows` rows are ready (True) or documents are needed (False).
    fn fill(&mut self, py: Python<'_>, rows: usize) -> PyResult<bool> {
        let inner = &mut self.inner;
        Ok(py.detach(|| guarded(|| inner.fill(rows)))? == Fill::Ready)
    }

    /// The `rows` oldest ready rows as u32 LE ids, [rows, row_capacity] row-major.
    fn take<'py>(&mut self, py: Python<'py>, rows: usize) -> PyResult<Bound<'py, PyByteArray>> {
        let ids = self.inner.take(rows).map_err(value_error)?;
        PyByteArray::new_with(py, ids.len() * 4, |buf| {
            write_u32s(buf, &ids);
            Ok(())
        })
    }

    /// Tags of the buffered documents, in buffer order.
    fn tags(&self) -> Vec<u64> {
        self.inner.tags()
    }

    #[getter]
    fn at_row_boundary(&self) -> bool {
        self.inner.at_row_boundary()
    }

    #[getter]
    fn placed_tokens(&self) -> u64 {
        self.inner.placed_tokens
    }

    #[getter]
    fn cropped_tokens(&self) -> u64 {
        self.inner.cropped_tokens
    }
}
