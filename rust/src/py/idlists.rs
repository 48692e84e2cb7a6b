//! Python lists of token ids (tiktoken's return type), built by reference to one cached int
//! object per id instead of allocating an int per token.
//!
//! Each list element needs a reference to its int. Taking them in list order writes to the
//! int objects in random order, and those cache misses cost more than the encoding of the
//! token. So references are counted per id (in a small dense array) and taken id by id, all of
//! one id's in a row while its object is in cache: before filling a single list, or, for a
//! batch (`OwedRefs`), once after all of its lists are filled. Each reference is taken through
//! pyo3's `clone_ref` (the stable ABI's `Py_IncRef`); no reference count is written directly.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyList;

pub struct IntCache {
    objs: Vec<Py<PyAny>>,
}

impl IntCache {
    pub fn new(py: Python<'_>, n: usize) -> IntCache {
        IntCache { objs: (0..n as u32).map(|i| i.into_pyobject(py).unwrap().into_any().unbind()).collect() }
    }

    pub fn n_ids(&self) -> usize {
        self.objs.len()
    }

    /// Adds `n` references to the int of each `(id, n)`. Every id must be < n_ids().
    pub fn add_refs(&self, py: Python<'_>, counts: &[(u32, u32)]) {
        for &(id, n) in counts {
            let obj = &self.objs[id as usize];
            for _ in 0..n {
                // A new strong reference, handed over as a raw pointer: the list slot that
                // holds this int owns it from now on.
                let _owned_by_a_list_slot = obj.clone_ref(py).into_ptr();
            }
        }
    }

    /// A new list of the ids' ints, each element stealing a reference.
    ///
    /// # Safety
    /// The caller must take (or have taken) one reference per element with `add_refs` before
    /// the list can be freed or seen by Python code.
    unsafe fn list_stealing<'py>(&self, py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
        let list = ffi::PyList_New(ids.len() as ffi::Py_ssize_t);
        if list.is_null() {
            return Err(PyErr::fetch(py));
        }
        // SAFETY (of the loop): len(ids) NULL slots, each filled once; every id indexes `objs`.
        for (i, &id) in ids.iter().enumerate() {
            ffi::PyList_SetItem(list, i as ffi::Py_ssize_t, self.objs[id as usize].as_ptr());
        }
        Ok(Bound::from_owned_ptr(py, list).cast_into_unchecked::<PyList>())
    }

    /// A new list of the ids' ints (references counted and taken first, then the list filled).
    pub fn list<'py>(&self, py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
        self.add_refs(py, &count_ids(ids, self.n_ids()));
        // SAFETY: the references were just taken.
        unsafe { self.list_stealing(py, ids) }
    }
}

/// Builds many lists and owes their references until it is dropped, then takes them id by id
/// for the whole batch. Declare it after the lists' container, so
/// it is dropped first, whatever the path out (error or panic included): no list can then be
/// freed before its references are taken, and nothing else sees the lists meanwhile.
pub struct OwedRefs<'a> {
    ints: &'a IntCache,
    owed: Vec<u32>,
}

impl<'a> OwedRefs<'a> {
    pub fn new(ints: &'a IntCache) -> Self {
        OwedRefs { ints, owed: vec![0; ints.n_ids()] }
    }

    /// A new list of the ids' ints; the references are owed until drop.
    pub fn list<'py>(&mut self, py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
        for &id in ids {
            self.owed[id as usize] += 1;
        }
        // SAFETY: the references are counted in `owed` and taken on drop, before the list can
        // be freed (see the type's contract).
        unsafe { self.ints.list_stealing(py, ids) }
    }
}

impl Drop for OwedRefs<'_> {
    fn drop(&mut self) {
        let pairs: Vec<(u32, u32)> =
            self.owed.iter().enumerate().filter(|(_, &c)| c != 0).map(|(id, &c)| (id as u32, c)).collect();
        Python::attach(|py| self.ints.add_refs(py, &pairs));
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The distinct ids of `ids` (each < n_ids) with their number of occurrences, in first-seen
/// order.
fn count_ids(ids: &[u32], n_ids: usize) -> Vec<(u32, u32)> {
    SCRATCH.with(|s| count_ids_in(ids, n_ids, &mut s.borrow_mut()))
}

/// `count_ids` with a given buffer of zeros (grown to `n_ids` here), left all zeros.
fn count_ids_in(ids: &[u32], n_ids: usize, scratch: &mut Vec<u32>) -> Vec<(u32, u32)> {
    if scratch.len() < n_ids {
        scratch.resize(n_ids, 0);
    }
    let mut out = Vec::new();
    for &id in ids {
        let c = &mut scratch[id as usize];
        if *c == 0 {
            out.push((id, 0));
        }
        *c += 1;
    }
    for p in &mut out {
        p.1 = std::mem::take(&mut scratch[p.0 as usize]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_a_plain_tally_and_leave_scratch_zeroed() {
        let mut state = 12345u64;
        let mut scratch = Vec::new();
        for len in [0usize, 1, 7, 1000] {
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % 50) as u32
                })
                .collect();
            let got = count_ids_in(&ids, 64, &mut scratch);
            let mut want = std::collections::BTreeMap::new();
            for &i in &ids {
                *want.entry(i).or_insert(0u32) += 1;
            }
            let got_map: std::collections::BTreeMap<u32, u32> = got.iter().copied().collect();
            assert_eq!(got.len(), got_map.len(), "each id once");
            assert_eq!(got_map, want);
            assert!(scratch.iter().all(|&c| c == 0));
        }
    }
}
