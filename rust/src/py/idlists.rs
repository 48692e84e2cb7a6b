//! Python lists of token ids (tiktoken's return type), built by reference to one cached int
//! object per id instead of allocating an int per token.
//!
//! Each list element needs a reference to its int. Taking them one by one (`Py_IncRef` per
//! token) writes to the int objects in random order, and those cache misses cost more than
//! the encoding of the token. So references are counted per id (in a small dense array) and
//! taken with one write per distinct id: before filling a single list, or, for a batch
//! (`OwedRefs`), once after all of its lists are filled.
//!
//! The one write per id is `ob_refcnt += n`: what the stable ABI's own `Py_INCREF` did for
//! Python 3.10 and 3.11 (an inline `ob_refcnt++`), and CPython keeps that working. It is used
//! only for ints this cache created and is the sole owner of at creation (so never for shared
//! or immortal small ints), and only after a self-test shows the write is read back by
//! `Py_REFCNT`; otherwise every reference is taken with `Py_IncRef`.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyList;

pub struct IntCache {
    objs: Vec<Py<PyAny>>,
    /// The object was created here with refcount 1 (not a shared small int).
    owned: Vec<bool>,
}

impl IntCache {
    pub fn new(py: Python<'_>, n: usize) -> IntCache {
        let objs: Vec<Py<PyAny>> = (0..n as u32).map(|i| i.into_pyobject(py).unwrap().into_any().unbind()).collect();
        // SAFETY: the GIL is held; Py_REFCNT only reads.
        let mut owned: Vec<bool> = objs.iter().map(|o| unsafe { ffi::Py_REFCNT(o.as_ptr()) } == 1).collect();
        if !owned.iter().any(|&b| b) || !Self::direct_add_works(&objs, &owned) {
            owned.iter_mut().for_each(|b| *b = false);
        }
        IntCache { objs, owned }
    }

    /// Adds and removes one reference by direct write on an owned object and checks that
    /// `Py_REFCNT` sees both.
    fn direct_add_works(objs: &[Py<PyAny>], owned: &[bool]) -> bool {
        let Some(i) = owned.iter().position(|&b| b) else { return false };
        let p = objs[i].as_ptr();
        // SAFETY: the GIL is held and this cache holds the only reference to the object; the
        // write is undone before returning.
        unsafe {
            let before = ffi::Py_REFCNT(p);
            *(p as *mut ffi::Py_ssize_t) += 5;
            let seen = ffi::Py_REFCNT(p);
            *(p as *mut ffi::Py_ssize_t) -= 5;
            seen == before + 5 && ffi::Py_REFCNT(p) == before
        }
    }

    pub fn n_ids(&self) -> usize {
        self.objs.len()
    }

    /// Adds `n` references to the int of each `(id, n)`. Every id must be < n_ids().
    pub fn add_refs(&self, _py: Python<'_>, counts: &[(u32, u32)]) {
        for &(id, n) in counts {
            let p = self.objs[id as usize].as_ptr();
            // SAFETY: the GIL is held (the `_py` token); p is a live object this cache holds.
            unsafe {
                if self.owned[id as usize] {
                    *(p as *mut ffi::Py_ssize_t) += n as ffi::Py_ssize_t;
                } else {
                    for _ in 0..n {
                        ffi::Py_IncRef(p);
                    }
                }
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

/// Builds many lists and owes their references until it is dropped, then takes them with
/// one write per distinct id of the whole batch. Declare it after the lists' container, so
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
