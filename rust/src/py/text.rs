//! Python str to UTF-8 for the core, borrowed in place (no copy) wherever possible.
//!
//! A str holding lone surrogates has no UTF-8 form. Every entry point replaces them the way
//! tiktoken's `encode` does (`encode("utf-16", "surrogatepass").decode("utf-16", "replace")`:
//! a lone surrogate becomes U+FFFD, a surrogate pair becomes its character), so single and
//! batch encoding, splitting, training and rendering all see the same text.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use std::borrow::Cow;

/// How many items ahead `list_items` and `borrow_strs` prefetch object headers: with hundreds of
/// thousands of strings scattered over the heap, waiting for each header in turn dominated.
const PREFETCH_AHEAD: usize = 8;

#[inline(always)]
fn prefetch(p: *const pyo3::ffi::PyObject) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A copy of `s` with its lone surrogates replaced (see the module comment).
fn replace_surrogates<'py>(s: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    let b = s.call_method1("encode", ("utf-16", "surrogatepass"))?;
    Ok(b.call_method1("decode", ("utf-16", "replace"))?.cast_into::<PyString>()?)
}

/// `s` itself when it has a UTF-8 form, else a copy with lone surrogates replaced.
pub fn encodable<'py>(s: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyString>> {
    match s.to_str() {
        Ok(_) => Ok(s.clone()),
        Err(_) => replace_surrogates(s),
    }
}

/// The UTF-8 of one str: borrowed, or owned when lone surrogates had to be replaced.
pub fn text_of<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    match s.to_str() {
        Ok(t) => Ok(Cow::Borrowed(t)),
        Err(_) => Ok(Cow::Owned(replace_surrogates(s)?.to_str()?.to_owned())),
    }
}

/// Every item of `texts`, each a new reference: the strings stay alive while the GIL is
/// released, whatever other threads do to the list.
pub fn list_items<'py>(texts: &Bound<'py, PyList>) -> Vec<Bound<'py, PyAny>> {
    let n = texts.len();
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        if i + PREFETCH_AHEAD < n {
            // SAFETY: in range; PyList_GetItem returns a borrowed pointer, only used as a hint.
            prefetch(unsafe {
                pyo3::ffi::PyList_GetItem(texts.as_ptr(), (i + PREFETCH_AHEAD) as pyo3::ffi::Py_ssize_t)
            });
        }
        match texts.get_item(i) {
            Ok(it) => items.push(it),
            Err(_) => break, // the list shrank meanwhile (only another thread can do that)
        }
    }
    items
}

/// Borrows the UTF-8 of every item (no copy), naming the first item that is not a str. An
/// item with lone surrogates is replaced in `items` by its encodable copy, which is borrowed.
pub fn borrow_strs<'a>(items: &'a mut [Bound<'_, PyAny>], what: &str) -> PyResult<Vec<&'a str>> {
    let mut spans: Vec<(*const u8, usize)> = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        if let Some(next) = items.get(i + PREFETCH_AHEAD) {
            prefetch(next.as_ptr());
        }
        let it = &items[i];
        let s = it.cast::<PyString>().map_err(|_| {
            let tn = it.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!("{what}[{i}] is {tn}, expected str"))
        })?;
        let t = match s.to_str() {
            Ok(t) => t,
            Err(_) => {
                let fixed = replace_surrogates(s)?.into_any();
                items[i] = fixed;
                items[i].cast::<PyString>()?.to_str()?
            }
        };
        spans.push((t.as_ptr(), t.len()));
    }
    // SAFETY: each span is the UTF-8 buffer of a str in `items` (the cached form CPython keeps
    // unchanged for the str's life); `items` holds every such str and stays borrowed for 'a.
    Ok(spans
        .into_iter()
        .map(|(p, n)| unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(p, n)) })
        .collect())
}
