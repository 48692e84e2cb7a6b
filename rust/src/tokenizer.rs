//! The tokenizer core: a BPE vocabulary, a pre-split pattern and special tokens, with
//! single and parallel batch encoding, decoding, and a streaming trainer.
//!
//! Python sees ids as little-endian u32 `bytes` (wrapped into numpy arrays on the Python
//! side), never one Python object per token crossing the boundary.

use crate::bpe::Bpe;
use crate::guard::{guarded, value_error};
use crate::idlists::{IntCache, OwedRefs};
use crate::pretokenize::Splitter;
use crate::train::{learn_merges, ChunkCounter};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub struct Core {
    pub bpe: Bpe,
    pub splitter: Splitter,
    pub pattern: String,
    /// (name, id) in the order given.
    pub specials: Vec<(String, u32)>,
    pub special_by_name: FxHashMap<String, u32>,
    pub special_name_of: FxHashMap<u32, usize>,
    pub n_vocab: usize,
}

impl Core {
    pub fn new(ranks: Vec<(Vec<u8>, u32)>, pattern: &str, specials: Vec<(String, u32)>) -> Result<Core, String> {
        let bpe = Bpe::new(ranks)?;
        let splitter = Splitter::new(pattern)?;
        let mut special_by_name = FxHashMap::default();
        let mut special_name_of = FxHashMap::default();
        let mut n_vocab = bpe.n_ids();
        for (i, (name, id)) in specials.iter().enumerate() {
            if name.is_empty() {
                return Err("special token name is empty".into());
            }
            if bpe.has_id(*id) {
                return Err(format!("special token {name:?} has id {id}, which a mergeable token already uses"));
            }
            if special_by_name.insert(name.clone(), *id).is_some() {
                return Err(format!("special token {name:?} is given twice"));
            }
            if special_name_of.insert(*id, i).is_some() {
                return Err(format!("special token id {id} is given twice"));
            }
            n_vocab = n_vocab.max(*id as usize + 1);
        }
        Ok(Core { bpe, splitter, pattern: pattern.to_string(), specials, special_by_name, special_name_of, n_vocab })
    }

    /// Ordinary text to ids: special-looking text is encoded as plain text.
    #[inline]
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        self.bpe.with_cache(|cache| {
            self.splitter.for_each_chunk(text, |c| self.bpe.encode_chunk(cache, c.as_bytes(), out))
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Encodes a run of pieces into one buffer (not one allocation per text): (ids, ids per piece).
    pub fn encode_run(&self, pieces: &[(usize, &str)]) -> Result<(Vec<u32>, Vec<u32>), String> {
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        self.encode_run_into(pieces, &mut ids, &mut lens)?;
        Ok((ids, lens))
    }

    /// `encode_run` into buffers the caller may reuse (they are cleared first).
    pub fn encode_run_into(&self, pieces: &[(usize, &str)], ids: &mut Vec<u32>, lens: &mut Vec<u32>) -> Result<(), String> {
        let bytes: usize = pieces.iter().map(|(_, p)| p.len()).sum();
        ids.clear();
        lens.clear();
        ids.reserve(bytes / 3 + 16);
        lens.reserve(pieces.len());
        for (i, p) in pieces {
            let before = ids.len();
            self.encode_into(p, ids).map_err(|e| format!("texts[{i}]: {e}"))?;
            lens.push((ids.len() - before) as u32);
        }
        Ok(())
    }

    /// (text index, piece) for every text, in order; every text has at least one piece.
    pub fn pieces<'a>(&self, texts: &[&'a str]) -> Vec<(usize, &'a str)> {
        let mut pieces = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            if t.len() <= 2 * PIECE_BYTES {
                pieces.push((i, *t)); // the common case: no cut, no allocation
                continue;
            }
            for p in self.splitter.safe_pieces(t, PIECE_BYTES) {
                pieces.push((i, p));
            }
        }
        pieces
    }

    /// Encodes many texts in parallel (on the current rayon pool), with optional ids before
    /// and after each, into one flat id buffer plus offsets (text i is ids[off[i]..off[i+1]]).
    /// Long texts are cut into pieces at chunk boundaries the split pattern guarantees, so one
    /// huge document does not leave the other cores idle; pieces are encoded in runs into
    /// shared buffers, so a batch makes a few allocations, not one per text.
    pub fn encode_flat(&self, texts: &[&str], prepend: Option<u32>, append: Option<u32>) -> Result<(Vec<u32>, Vec<u64>), String> {
        if rayon::current_num_threads() == 1 {
            // One thread: straight into the result, no pieces, runs or copies.
            let bytes: usize = texts.iter().map(|t| t.len()).sum();
            let mut out = Vec::with_capacity(bytes / 3 + 16);
            let mut offsets = Vec::with_capacity(texts.len() + 1);
            offsets.push(0u64);
            for (i, t) in texts.iter().enumerate() {
                out.extend(prepend);
                self.encode_into(t, &mut out).map_err(|e| format!("texts[{i}]: {e}"))?;
                out.extend(append);
                offsets.push(out.len() as u64);
            }
            return Ok((out, offsets));
        }
        let pieces = self.pieces(texts);
        let run = (pieces.len() / (rayon::current_num_threads().max(1) * 16)).clamp(1, 512);
        let runs: Vec<Result<(Vec<u32>, Vec<u32>), String>> = pieces
            .par_chunks(run)
            .map(|ps| self.encode_run(ps))
            .collect();
        let mut runs_ok = Vec::with_capacity(runs.len());
        for r in runs {
            runs_ok.push(r?);
        }
        let extra = prepend.is_some() as usize + append.is_some() as usize;
        let total: usize = runs_ok.iter().map(|(ids, _)| ids.len()).sum::<usize>() + extra * texts.len();
        let mut out = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0u64);
        let mut k = 0; // piece index
        for (ids, lens) in &runs_ok {
            let mut at = 0usize;
            for &n in lens {
                let doc = pieces[k].0;
                debug_assert_eq!(doc + 1, offsets.len(), "pieces come in text order");
                let first = k == 0 || pieces[k - 1].0 != doc;
                if first {
                    out.extend(prepend);
                }
                out.extend_from_slice(&ids[at..at + n as usize]);
                at += n as usize;
                k += 1;
                let last = k == pieces.len() || pieces[k].0 != doc;
                if last {
                    out.extend(append);
                    offsets.push(out.len() as u64);
                }
            }
        }
        Ok((out, offsets))
    }

    /// Bytes of any id (mergeable or special), or None if the id is unused.
    pub fn id_bytes(&self, id: u32) -> Option<&[u8]> {
        if self.bpe.has_id(id) {
            Some(self.bpe.token(id))
        } else {
            self.special_name_of.get(&id).map(|&i| self.specials[i].0.as_bytes())
        }
    }

    pub fn decode_into(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), String> {
        for (pos, &id) in ids.iter().enumerate() {
            match self.id_bytes(id) {
                Some(b) => out.extend_from_slice(b),
                None => {
                    return Err(format!(
                        "invalid token id {id} at position {pos} (vocabulary has {} ids)",
                        self.n_vocab
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Texts longer than twice this are encoded in pieces of about this size, in parallel.
const PIECE_BYTES: usize = 1 << 16;

pub fn u32s_to_pybytes<'py>(py: Python<'py>, v: &[u32]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &u32s_le_bytes(v))
}

fn u32s_le_bytes(v: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn pybytes_to_u32s(b: &[u8], what: &str) -> PyResult<Vec<u32>> {
    if b.len() % 4 != 0 {
        return Err(PyValueError::new_err(format!("{what}: buffer length {} is not a multiple of 4", b.len())));
    }
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Borrows the UTF-8 of every item of a list of str (no copy), naming the first bad item.
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

/// Every item of `texts`, each a new reference: the strings stay alive while the GIL is
/// released, whatever other threads do to the list.
pub fn list_items<'py>(texts: &Bound<'py, PyList>) -> Vec<Bound<'py, PyAny>> {
    let n = texts.len();
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        if i + PREFETCH_AHEAD < n {
            // SAFETY: in range; PyList_GetItem returns a borrowed pointer, only used as a hint.
            prefetch(unsafe { pyo3::ffi::PyList_GetItem(texts.as_ptr(), (i + PREFETCH_AHEAD) as pyo3::ffi::Py_ssize_t) });
        }
        match texts.get_item(i) {
            Ok(it) => items.push(it),
            Err(_) => break, // the list shrank meanwhile (only another thread can do that)
        }
    }
    items
}

pub fn borrow_strs<'a, 'py>(items: &'a [Bound<'py, PyAny>], what: &str) -> PyResult<Vec<&'a str>> {
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        if let Some(next) = items.get(i + PREFETCH_AHEAD) {
            prefetch(next.as_ptr());
        }
        let s = it.cast::<PyString>().map_err(|_| {
            let tn = it.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
            PyTypeError::new_err(format!("{what}[{i}] is {tn}, expected str"))
        })?;
        out.push(s.to_str().map_err(|e| PyValueError::new_err(format!("{what}[{i}] is not valid text: {e}")))?);
    }
    Ok(out)
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A rayon pool per requested thread count (built once); None means the global pool.
fn pool(num_threads: Option<usize>) -> Result<Option<Arc<rayon::ThreadPool>>, String> {
    static POOLS: OnceLock<Mutex<FxHashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    match num_threads {
        None => Ok(None),
        Some(0) => Err("num_threads must be at least 1".into()),
        Some(n) => {
            let mut pools = lock(POOLS.get_or_init(Default::default));
            if let Some(p) = pools.get(&n) {
                return Ok(Some(p.clone()));
            }
            let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build().map_err(|e| e.to_string())?);
            pools.insert(n, p.clone());
            Ok(Some(p))
        }
    }
}

/// Runs `f` on the pool for `num_threads` (see `pool`).
pub fn with_threads<T: Send>(num_threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    Ok(match pool(num_threads)? {
        None => f(),
        Some(p) => p.install(f),
    })
}

/// Runs `f` on the calling thread with a scope whose spawned jobs run on the pool for
/// `num_threads`; returns when they all have.
fn in_pool<'scope, T>(num_threads: Option<usize>, f: impl FnOnce(&rayon::Scope<'scope>) -> T) -> PyResult<T> {
    Ok(match pool(num_threads).map_err(value_error)? {
        None => rayon::in_place_scope(f),
        Some(p) => p.in_place_scope(f),
    })
}

#[pyclass(frozen, module = "rustchat._core", name = "CoreTokenizer")]
pub struct PyCore {
    pub core: Core,
    /// One Python int per id, made once: lists of ids are then built by reference instead of
    /// allocating an int per token (the allocation cost more than the encoding itself).
    ints: OnceLock<IntCache>,
    /// Run buffers of earlier batches, reused: fresh ones cost page faults (zeroed huge pages)
    /// every batch once the allocator has given freed ones back to the OS.
    spare: Mutex<Vec<RunBuffers>>,
}

/// (ids, ids per piece) buffers of one run.
type RunBuffers = (Vec<u32>, Vec<u32>);
/// Spare run buffers kept between batches (each about 70 KB at the usual run size), and the
/// largest kept (runs of long documents can be far larger): at most 64 MiB stay allocated.
const SPARE_RUNS: usize = 64;
const SPARE_MAX_IDS: usize = 1 << 18;

/// Ids of a run of consecutive pieces, waiting to become Python lists: (index of its first
/// piece, ids, ids per piece).
type Run = (usize, Vec<u32>, Vec<u32>);

/// Turns encoded runs into the Python lists of `encode_batch_lists` (on the thread that holds
/// the GIL). It is dropped before `out` (declared after it), so its `refs` are taken before
/// any list can be freed.
struct ListBuilder<'a> {
    refs: OwedRefs<'a>,
    /// The result: a list of len(texts) slots, NULL until each text's list is set.
    out: *mut pyo3::ffi::PyObject,
    pieces: &'a [(usize, &'a str)],
    /// Pieces of each text not yet built.
    remaining: Vec<u32>,
    /// Ids of pieces of texts that are not complete yet (runs finish in any order).
    partial: FxHashMap<usize, Vec<u32>>,
    prepend: Option<u32>,
    append: Option<u32>,
}

impl ListBuilder<'_> {
    fn build(&mut self, py: Python<'_>, (first, flat, lens): &Run) -> PyResult<()> {
        let (first, flat, lens) = (*first, &flat[..], &lens[..]);
        let pieces = self.pieces;
        let mut at = 0usize;
        for (k, &n) in lens.iter().enumerate() {
            let ids = &flat[at..at + n as usize];
            at += n as usize;
            let idx = first + k;
            let doc = pieces[idx].0;
            self.remaining[doc] -= 1;
            let only_piece = (idx == 0 || pieces[idx - 1].0 != doc) && (idx + 1 == pieces.len() || pieces[idx + 1].0 != doc);
            let list = if only_piece && self.prepend.is_none() && self.append.is_none() {
                self.refs.list(py, ids)?
            } else {
                self.partial.insert(idx, ids.to_vec());
                if self.remaining[doc] != 0 {
                    continue;
                }
                let mut v: Vec<u32> = self.prepend.into_iter().collect();
                let mut i = pieces.partition_point(|(d, _)| *d < doc);
                while i < pieces.len() && pieces[i].0 == doc {
                    v.extend_from_slice(&self.partial.remove(&i).expect("all pieces of the text are in"));
                    i += 1;
                }
                v.extend(self.append);
                self.refs.list(py, &v)?
            };
            // SAFETY: doc < len(out) and its slot is still NULL; SetItem steals the reference.
            unsafe {
                pyo3::ffi::PyList_SetItem(self.out, doc as pyo3::ffi::Py_ssize_t, list.into_ptr());
            }
        }
        Ok(())
    }
}

impl PyCore {
    /// Encodes texts in chunks of pieces on `threads - 1` pool threads and on this one (GIL
    /// released while it encodes), and this thread, which holds the GIL, turns each finished
    /// run into Python lists between its own chunks. Lists are built here rather than on the
    /// workers: list memory then comes from the calling thread's malloc arena, whose pages
    /// stay mapped between calls, where a worker's arena hands them back to the OS and faults
    /// them in again every batch (measured: lists cost about 2.4x more to build there). This
    /// thread encoding too (rather than `threads` workers plus a builder) keeps exactly one
    /// busy thread per core: measured in turns on 2 cores, about 8% faster.
    fn encode_lists<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        prepend: Option<u32>,
        append: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        use std::sync::mpsc::channel;
        let items: Vec<Bound<'py, PyAny>> = list_items(texts);
        let strs = borrow_strs(&items, "texts")?;
        let core = &self.core;
        let pieces = core.pieces(&strs);
        let mut remaining = vec![0u32; strs.len()];
        for (i, _) in &pieces {
            remaining[*i] += 1;
        }
        let ints = self.ints(py);
        let out = unsafe {
            // SAFETY: a new list of len(texts) NULL slots; every slot is set once before it is
            // returned (checked below), or the list is dropped (list_dealloc skips NULL slots).
            let ptr = pyo3::ffi::PyList_New(strs.len() as pyo3::ffi::Py_ssize_t);
            if ptr.is_null() {
                return Err(PyErr::fetch(py));
            }
            Bound::from_owned_ptr(py, ptr).cast_into_unchecked::<PyList>()
        };
        // Declared after `out`, so dropped (taking the owed references) before it.
        let mut b = ListBuilder {
            refs: OwedRefs::new(ints),
            out: out.as_ptr(),
            pieces: &pieces,
            remaining,
            partial: FxHashMap::default(),
            prepend,
            append,
        };
        let threads = num_threads.unwrap_or_else(rayon::current_num_threads).max(1);
        let chunk = (pieces.len() / (threads * 32)).clamp(1, 256);
        let n_chunks = pieces.len().div_ceil(chunk);
        // Chunks are claimed in order by the helpers and by this thread alike.
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let claim = || {
            let ci = next.fetch_add(1, Relaxed);
            (ci < n_chunks && !failed.load(Relaxed)).then_some(ci)
        };
        let spare = &self.spare;
        // Encode errors are ValueErrors naming the text; a panic stays an internal RuntimeError.
        let encode_chunk = |ci: usize| -> PyResult<Run> {
            let ps = &pieces[ci * chunk..((ci + 1) * chunk).min(pieces.len())];
            let (mut ids, mut lens) = lock(spare).pop().unwrap_or_default();
            guarded(|| core.encode_run_into(ps, &mut ids, &mut lens))?.map_err(value_error)?;
            Ok((ci * chunk, ids, lens))
        };
        let (tx, mut rx) = channel::<PyResult<Run>>();
        let mut error = None;
        // Builds the lists of a finished run and keeps its buffers; false after the first error.
        let mut handle = |m: PyResult<Run>| {
            let built = m.and_then(|run| {
                b.build(py, &run)?;
                let mut spare = lock(spare);
                if spare.len() < SPARE_RUNS && run.1.capacity() <= SPARE_MAX_IDS {
                    spare.push((run.1, run.2));
                }
                Ok(())
            });
            if let Err(e) = built {
                error = Some(e);
                failed.store(true, Relaxed);
            }
            error.is_none()
        };
        // threads - 1 helpers encode on the pool while this thread, which holds the GIL,
        // encodes chunks too and turns finished runs into lists between them: exactly
        // `threads` busy threads, so none is preempted or moved away from its warm caches.
        in_pool(num_threads, |scope| {
            for _ in 1..threads {
                let tx = tx.clone();
                let (claim, encode_chunk) = (&claim, &encode_chunk);
                scope.spawn(move |_| {
                    while let Some(ci) = claim() {
                        if tx.send(encode_chunk(ci)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            'work: loop {
                loop {
                    match rx.try_recv() {
                        Ok(m) => {
                            if !handle(m) {
                                break 'work;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let Some(ci) = claim() else { break };
                let run = py.detach(|| encode_chunk(ci));
                if !handle(run) {
                    break 'work;
                }
            }
            // Nothing left to claim (or a failure): take the helpers' last runs as they come,
            // waiting without the GIL (the receiver moves in and out: it is Send, not Sync),
            // until every helper is done, so the scope's own wait never holds the GIL.
            loop {
                let (msg, back) = py.detach(move || (rx.recv(), rx));
                rx = back;
                let Ok(m) = msg else { break };
                if !failed.load(Relaxed) {
                    handle(m);
                }
            }
        })?;
        if let Some(e) = error {
            return Err(e);
        }
        if b.remaining.iter().any(|&n| n != 0) {
            return Err(pyo3::exceptions::PyRuntimeError::new_err("internal error in rustchat core: a text was not encoded"));
        }
        Ok(out)
    }

    pub fn from_core(core: Core) -> Self {
        PyCore { core, ints: OnceLock::new(), spare: Mutex::new(Vec::new()) }
    }

    /// One int object per id, made on first use.
    fn ints(&self, py: Python<'_>) -> &IntCache {
        self.ints.get_or_init(|| IntCache::new(py, self.core.n_vocab))
    }

    /// Parallel encode of a list of str with the GIL released; errors name the text.
    fn encode_many<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        prepend: Option<u32>,
        append: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<(Vec<u32>, Vec<u64>)> {
        let items: Vec<Bound<'py, PyAny>> = list_items(texts);
        let strs = borrow_strs(&items, "texts")?;
        let core = &self.core;
        py.detach(|| guarded(|| with_threads(num_threads, || core.encode_flat(&strs, prepend, append))))?
            .and_then(|r| r)
            .map_err(value_error)
    }
}

#[pymethods]
impl PyCore {
    #[new]
    fn new(py: Python<'_>, ranks: Vec<(Vec<u8>, u32)>, pattern: &str, specials: Vec<(String, u32)>) -> PyResult<Self> {
        let pattern = pattern.to_string();
        let core = py.detach(|| guarded(|| Core::new(ranks, &pattern, specials)))?.map_err(value_error)?;
        Ok(PyCore::from_core(core))
    }

    #[getter]
    fn pattern(&self) -> &str {
        &self.core.pattern
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.core.n_vocab
    }

    /// True when the pattern runs on the hand-written scanner (else fancy-regex).
    #[getter]
    fn fast_split(&self) -> bool {
        self.core.splitter.is_fast()
    }

    fn specials(&self) -> Vec<(String, u32)> {
        self.core.specials.clone()
    }

    fn ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.core.bpe.ranks().into_iter().map(|(b, r)| (PyBytes::new(py, b), r)).collect()
    }

    /// Per-id UTF-8 byte length as little-endian i32 (0 for specials and unused ids).
    fn token_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut out = Vec::with_capacity(self.core.n_vocab * 4);
        for id in 0..self.core.n_vocab as u32 {
            let n = if self.core.bpe.has_id(id) { self.core.bpe.token(id).len() as i32 } else { 0 };
            out.extend_from_slice(&n.to_le_bytes());
        }
        PyBytes::new(py, &out)
    }

    fn encode_ordinary<'py>(&self, py: Python<'py>, text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyBytes>> {
        let s = text.to_str()?;
        let ids = py.detach(|| guarded(|| self.core.encode(s)))?.map_err(value_error)?;
        Ok(u32s_to_pybytes(py, &ids))
    }

    /// Like `encode_ordinary`, as a list of int (tiktoken's return type).
    fn encode_ordinary_list<'py>(&self, py: Python<'py>, text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyList>> {
        let s = text.to_str()?;
        let ids = py.detach(|| guarded(|| self.core.encode(s)))?.map_err(value_error)?;
        self.ints(py).list(py, &ids)
    }

    /// The pre-split chunks of `text` (what BPE runs on), for inspection and tests.
    fn split<'py>(&self, text: &Bound<'py, PyString>) -> PyResult<Vec<String>> {
        let s = text.to_str()?;
        let mut out = Vec::new();
        self.core.splitter.for_each_chunk(s, |c| out.push(c.to_string())).map_err(value_error)?;
        Ok(out)
    }

    /// Id of one token's exact bytes, if it is a single mergeable token.
    fn rank_of(&self, bytes: &[u8]) -> Option<u32> {
        self.core.bpe.rank(bytes)
    }

    /// Encodes a list of str in parallel. Returns (ids as u32 LE, offsets as u64 LE with
    /// len(texts)+1 entries).
    #[pyo3(signature = (texts, prepend=None, append=None, num_threads=None))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        prepend: Option<u32>,
        append: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (ids, offsets) = self.encode_many(py, texts, prepend, append, num_threads)?;
        let ids = PyBytes::new_with(py, ids.len() * 4, |buf| {
            for (dst, x) in buf.chunks_exact_mut(4).zip(&ids) {
                dst.copy_from_slice(&x.to_le_bytes());
            }
            Ok(())
        })?;
        let off: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        Ok((ids, PyBytes::new(py, &off)))
    }

    /// Like `encode_batch`, as a list of lists of int (tiktoken's shape).
    #[pyo3(signature = (texts, prepend=None, append=None, num_threads=None))]
    fn encode_batch_lists<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        prepend: Option<u32>,
        append: Option<u32>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        for id in prepend.iter().chain(append.iter()) {
            if *id as usize >= self.core.n_vocab {
                return Err(PyValueError::new_err(format!("token id {id} is out of range")));
            }
        }
        if num_threads == Some(1) {
            // One thread: encode everything, then build the lists (no channel, no hand-offs).
            let (ids, offsets) = self.encode_many(py, texts, prepend, append, num_threads)?;
            let out = PyList::empty(py);
            let mut refs = OwedRefs::new(self.ints(py)); // dropped before `out`
            for w in offsets.windows(2) {
                out.append(refs.list(py, &ids[w[0] as usize..w[1] as usize])?)?;
            }
            return Ok(out);
        }
        self.encode_lists(py, texts, prepend, append, num_threads)
    }

    /// Ids (u32 LE buffer) to bytes; unknown ids raise ValueError.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let ids = pybytes_to_u32s(ids, "ids")?;
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.core.decode_into(&ids, &mut out).map_err(value_error)?;
        Ok(PyBytes::new(py, &out))
    }
}

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
        let items: Vec<Bound<'_, PyAny>> = list_items(texts);
        let strs = borrow_strs(&items, "texts")?;
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
        let counter = self.counter.take().ok_or_else(|| PyValueError::new_err("this trainer has already learned its merges"))?;
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
