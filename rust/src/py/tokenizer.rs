//! `CoreTokenizer`: the tokenizer core as a Python class. Ids leave as little-endian u32
//! `bytes` (wrapped into numpy arrays on the Python side) or as lists of shared int objects.

use super::guard::{guarded, value_error};
use super::idlists::{IntCache, OwedRefs};
use super::text::{borrow_strs, list_items, text_of};
use super::threads::thread_count;
use crate::le::{bytes_to_u32s, u32s_to_bytes, write_u32s};
use crate::threads::{in_pool, lock, with_threads};
use crate::tokenizer::Core;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use rustc_hash::FxHashMap;
use std::sync::{Mutex, OnceLock};

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

/// What a batch encode asks for besides its texts: ids to put before and after each text, and
/// the threads to use (None: the global pool).
#[derive(Clone, Copy)]
struct Batch {
    prepend: Option<u32>,
    append: Option<u32>,
    num_threads: Option<usize>,
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
            let only_piece =
                (idx == 0 || pieces[idx - 1].0 != doc) && (idx + 1 == pieces.len() || pieces[idx + 1].0 != doc);
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
        batch: Batch,
    ) -> PyResult<Bound<'py, PyList>> {
        let Batch { prepend, append, num_threads } = batch;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        use std::sync::mpsc::channel;
        let mut items: Vec<Bound<'py, PyAny>> = list_items(texts);
        let strs = borrow_strs(&mut items, "texts")?;
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
                while let Ok(m) = rx.try_recv() {
                    if !handle(m) {
                        break 'work;
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
        })
        .map_err(value_error)?;
        if let Some(e) = error {
            return Err(e);
        }
        if b.remaining.iter().any(|&n| n != 0) {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "internal error in rustchat core: a text was not encoded",
            ));
        }
        Ok(out)
    }

    /// Ids of one str, encoded with the GIL released.
    fn encode_one(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<Vec<u32>> {
        let s = text_of(text)?;
        py.detach(|| guarded(|| self.core.encode(&s)))?.map_err(value_error)
    }

    pub fn from_core(core: Core) -> Self {
        PyCore { core, ints: OnceLock::new(), spare: Mutex::new(Vec::new()) }
    }

    /// One int object per id, made on first use.
    fn ints(&self, py: Python<'_>) -> &IntCache {
        self.ints.get_or_init(|| IntCache::new(py, self.core.n_vocab))
    }

    /// Parallel encode of a list of str with the GIL released; errors name the text.
    /// The batch, if its prepend/append ids are in the vocabulary (both batch encoders check).
    fn checked(&self, batch: Batch) -> PyResult<Batch> {
        for id in batch.prepend.iter().chain(batch.append.iter()) {
            if *id as usize >= self.core.n_vocab {
                return Err(PyValueError::new_err(format!("token id {id} is out of range")));
            }
        }
        Ok(batch)
    }

    fn encode_many<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyList>,
        batch: Batch,
    ) -> PyResult<(Vec<u32>, Vec<u64>)> {
        let Batch { prepend, append, num_threads } = batch;
        let mut items: Vec<Bound<'py, PyAny>> = list_items(texts);
        let strs = borrow_strs(&mut items, "texts")?;
        let core = &self.core;
        py.detach(|| guarded(|| with_threads(num_threads, || core.encode_flat(&strs, prepend, append))))?
            .and_then(|r| r)
            .map_err(value_error)
    }
}

#[pymethods]
impl PyCore {
    #[new]
    fn new(
        py: Python<'_>,
        ranks: Vec<(Bound<'_, PyAny>, u32)>,
        pattern: &str,
        specials: Vec<(String, u32)>,
    ) -> PyResult<Self> {
        // `bytes` copied straight from its buffer: extracting a Vec<u8> goes through the
        // sequence protocol, one Python int per byte (a third of the call for a 65k vocabulary).
        let ranks = ranks
            .into_iter()
            .map(|(t, r)| match t.cast::<PyBytes>() {
                Ok(b) => Ok((b.as_bytes().to_vec(), r)),
                Err(_) => Ok((t.extract::<Vec<u8>>()?, r)),
            })
            .collect::<PyResult<Vec<_>>>()?;
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
        let out: Vec<u8> = self.core.token_lengths().iter().flat_map(|n| n.to_le_bytes()).collect();
        PyBytes::new(py, &out)
    }

    fn encode_ordinary<'py>(&self, py: Python<'py>, text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyBytes>> {
        let ids = self.encode_one(py, text)?;
        Ok(PyBytes::new(py, &u32s_to_bytes(&ids)))
    }

    /// Like `encode_ordinary`, as a list of int (tiktoken's return type).
    fn encode_ordinary_list<'py>(&self, py: Python<'py>, text: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyList>> {
        let ids = self.encode_one(py, text)?;
        self.ints(py).list(py, &ids)
    }

    /// The pre-split chunks of `text` (what BPE runs on), for inspection and tests.
    fn split<'py>(&self, text: &Bound<'py, PyString>) -> PyResult<Vec<String>> {
        let s = text_of(text)?;
        let mut out = Vec::new();
        self.core.splitter.for_each_chunk(&s, |c| out.push(c.to_string())).map_err(value_error)?;
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
        num_threads: Option<i64>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let num_threads = thread_count(num_threads)?;
        let (ids, offsets) = self.encode_many(py, texts, self.checked(Batch { prepend, append, num_threads })?)?;
        let ids = PyBytes::new_with(py, ids.len() * 4, |buf| {
            write_u32s(buf, &ids);
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
        num_threads: Option<i64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let num_threads = thread_count(num_threads)?;
        let batch = self.checked(Batch { prepend, append, num_threads })?;
        if num_threads == Some(1) {
            // One thread: encode everything, then build the lists (no channel, no hand-offs).
            let (ids, offsets) = self.encode_many(py, texts, batch)?;
            let out = PyList::empty(py);
            let mut refs = OwedRefs::new(self.ints(py)); // dropped before `out`
            for w in offsets.windows(2) {
                out.append(refs.list(py, &ids[w[0] as usize..w[1] as usize])?)?;
            }
            return Ok(out);
        }
        self.encode_lists(py, texts, batch)
    }

    /// Ids (u32 LE buffer) to bytes; unknown ids raise ValueError.
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let ids = bytes_to_u32s(ids, "ids").map_err(value_error)?;
        let mut out = Vec::with_capacity(ids.len() * 4);
        self.core.decode_into(&ids, &mut out).map_err(value_error)?;
        Ok(PyBytes::new(py, &out))
    }
}
