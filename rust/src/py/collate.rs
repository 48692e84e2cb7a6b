//! `collate_sft` and `pack_rows`: rendered conversations as byte buffers in, training rows
//! as writable bytearrays out.

use super::guard::{guarded, value_error};
use crate::collate::{collate_sft, Rows};
use crate::le::bytes_to_u32s;
use crate::pack::{pack, Long, Policy};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};

fn ids_and_offsets(ids: &[u8], offsets: &[u8]) -> PyResult<(Vec<u32>, Vec<usize>)> {
    Ok((bytes_to_u32s(ids, "ids").map_err(value_error)?, le_offsets(offsets)?))
}

pub(super) fn le_offsets(b: &[u8]) -> PyResult<Vec<usize>> {
    if !b.len().is_multiple_of(8) {
        return Err(PyValueError::new_err(format!("offsets: buffer length {} is not a multiple of 8", b.len())));
    }
    b.chunks_exact(8)
        .map(|c| {
            usize::try_from(i64::from_le_bytes(c.try_into().unwrap()))
                .map_err(|_| PyValueError::new_err("offsets must not be negative"))
        })
        .collect()
}

/// A bytearray (so the numpy arrays wrapping it are writable, e.g. for `torch.from_numpy`).
fn to_pybytes<'py, T: Copy, const N: usize>(
    py: Python<'py>,
    v: &[T],
    f: impl Fn(T) -> [u8; N],
) -> PyResult<Bound<'py, PyByteArray>> {
    PyByteArray::new_with(py, v.len() * N, |buf| {
        for (dst, &x) in buf.chunks_exact_mut(N).zip(v) {
            dst.copy_from_slice(&f(x));
        }
        Ok(())
    })
}

/// (ids u32 LE, mask u8, offsets i64 LE) -> (inputs i32 LE, targets i64 LE, b, l), as bytearrays.
#[pyfunction]
#[pyo3(name = "collate_sft", signature = (ids, mask, offsets, pad_id, max_len=None))]
pub fn py_collate_sft<'py>(
    py: Python<'py>,
    ids: &[u8],
    mask: &[u8],
    offsets: &[u8],
    pad_id: u32,
    max_len: Option<usize>,
) -> PyResult<(Bound<'py, PyByteArray>, Bound<'py, PyByteArray>, usize, usize)> {
    let (ids, offsets) = ids_and_offsets(ids, offsets)?;
    let rows = Rows::new(&ids, mask, &offsets).map_err(value_error)?;
    let c = py.detach(|| guarded(|| collate_sft(&rows, pad_id, max_len)))?;
    Ok((to_pybytes(py, &c.inputs, i32::to_le_bytes)?, to_pybytes(py, &c.targets, i64::to_le_bytes)?, c.b, c.l))
}

/// Packs (ids u32 LE, mask u8, offsets i64 LE) into rows; returns a dict of LE bytearrays and
/// counts (see `Packed`).
#[pyfunction]
#[pyo3(name = "pack_rows", signature = (ids, mask, offsets, row_len, pad_id, policy="best_fit", long="truncate", max_rows=None))]
#[allow(clippy::too_many_arguments)]
pub fn py_pack_rows<'py>(
    py: Python<'py>,
    ids: &[u8],
    mask: &[u8],
    offsets: &[u8],
    row_len: usize,
    pad_id: u32,
    policy: &str,
    long: &str,
    max_rows: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let policy = Policy::parse(policy).map_err(value_error)?;
    let long = Long::parse(long).map_err(value_error)?;
    let (ids, offsets) = ids_and_offsets(ids, offsets)?;
    let rows = Rows::new(&ids, mask, &offsets).map_err(value_error)?;
    let p = py.detach(|| guarded(|| pack(&rows, row_len, pad_id, policy, long, max_rows)))?.map_err(value_error)?;
    let d = PyDict::new(py);
    d.set_item("rows", p.rows)?;
    d.set_item("inputs", to_pybytes(py, &p.inputs, i32::to_le_bytes)?)?;
    d.set_item("targets", to_pybytes(py, &p.targets, i64::to_le_bytes)?)?;
    d.set_item("position_ids", to_pybytes(py, &p.position_ids, i32::to_le_bytes)?)?;
    d.set_item("doc_ids", to_pybytes(py, &p.doc_ids, i32::to_le_bytes)?)?;
    d.set_item("cu_seqlens", to_pybytes(py, &p.cu_seqlens, i32::to_le_bytes)?)?;
    d.set_item("max_seqlen", p.max_seqlen)?;
    d.set_item("seg_conv", to_pybytes(py, &p.seg_conv, i32::to_le_bytes)?)?;
    d.set_item("seg_start", to_pybytes(py, &p.seg_start, i32::to_le_bytes)?)?;
    d.set_item("leftover", to_pybytes(py, &p.leftover, |x| (x as i64).to_le_bytes())?)?;
    d.set_item("dropped_targets", p.dropped_targets)?;
    Ok(d)
}
