//! Byte-level BPE vocabulary and the encoder (tiktoken semantics).
//!
//! A chunk's bytes start as single-byte tokens; repeatedly the adjacent pair whose
//! concatenation has the lowest rank is merged (leftmost on ties), until no pair is a token.
//! A token's id is its rank. Pairs are looked up by (left id, right id) in a table built once
//! from the vocabulary, which is faster than hashing byte slices and gives the same result,
//! since every part is always a token.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

const NONE: u32 = u32::MAX;
/// Chunks with at most this many bytes use the quadratic scan; longer ones use a heap.
const SMALL_CHUNK: usize = 64;
/// Entries kept in each thread's cache of multi-token chunks before it is cleared.
const CACHE_ENTRIES: usize = 1 << 16;

/// Ids (ranks and special tokens) must be below this. Per-id tables are dense, so one huge
/// rank would allocate gigabytes; 16.7M ids is far past any real vocabulary.
pub const MAX_VOCAB: usize = 1 << 24;

static NEXT_VOCAB_ID: AtomicU64 = AtomicU64::new(1);

/// Chunks of at most this many bytes are keyed by their bytes packed into a u128 (with the
/// length in the top byte): hashing and comparing keys needs no pointer chase or memcmp.
const PACK_MAX: usize = 15;
/// Slots of the per-thread direct-mapped table of recent short chunks (about 160 KiB).
const HOT_SLOTS: usize = 1 << 14;
/// Ids kept per hot slot; chunks that encode to more ids are simply not kept there.
const HOT_IDS: usize = 5;

#[derive(Clone, Copy)]
struct HotSlot {
    key: u128,
    n: u32,
    ids: [u32; HOT_IDS],
}

const EMPTY_SLOT: HotSlot = HotSlot { key: u128::MAX, n: 0, ids: [0; HOT_IDS] };

/// Per-thread caches, owned by one vocabulary at a time (named by `owner`): a direct-mapped
/// table of recently seen short chunks with their ids (natural text is Zipfian, so most
/// chunks hit it and skip the big rank map, whose cache misses dominate encode time), and a
/// map for long chunks that needed merging.
pub struct EncodeCache {
    owner: u64,
    hot: Vec<HotSlot>,
    /// Short chunks that needed merging, behind the hot table (which holds only a few
    /// thousand and forgets on collisions): the long tail of rarer words repeats too.
    merged_short: FxHashMap<u128, Box<[u32]>>,
    merged: FxHashMap<Box<[u8]>, Box<[u32]>>,
}

thread_local! {
    static CACHE: RefCell<EncodeCache> =
        RefCell::new(EncodeCache { owner: 0, hot: Vec::new(), merged_short: FxHashMap::default(), merged: FxHashMap::default() });
}

/// Packs up to PACK_MAX bytes and their length into one key.
#[inline(always)]
fn pack(b: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    u128::from_le_bytes(buf) | ((b.len() as u128) << 120)
}

#[inline(always)]
fn hot_slot(k: u128) -> usize {
    let x = (k as u64) ^ ((k >> 64) as u64).rotate_left(29);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - HOT_SLOTS.trailing_zeros())) as usize
}

/// Appends `ids[..n]` (n <= HOT_IDS) by copying all HOT_IDS: a fixed-size copy is a few
/// inlined moves, where a variable-length `extend_from_slice` calls memmove for every chunk.
#[inline(always)]
fn push_hot(out: &mut Vec<u32>, ids: &[u32; HOT_IDS], n: usize) {
    debug_assert!(n <= HOT_IDS);
    out.reserve(HOT_IDS);
    // SAFETY: reserve made room for HOT_IDS more elements; only the first n become part of
    // the vector (u32 has no drop or invalid bit patterns).
    unsafe {
        std::ptr::copy_nonoverlapping(ids.as_ptr(), out.as_mut_ptr().add(out.len()), HOT_IDS);
        out.set_len(out.len() + n);
    }
}

pub struct Bpe {
    /// Unique per vocabulary, for the thread-local chunk cache.
    uid: u64,
    rank_of: FxHashMap<Box<[u8]>, u32>,
    /// Tokens of at most PACK_MAX bytes, keyed by `pack`.
    short_rank: FxHashMap<u128, u32>,
    byte_id: [u32; 256],
    pair_rank: FxHashMap<u64, u32>,
    /// Bytes of token `id` are `data[offsets[id]..offsets[id + 1]]` (empty for unused ids).
    data: Vec<u8>,
    offsets: Vec<u32>,
    present: Vec<bool>,
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Bpe {
    /// Builds a vocabulary from (token bytes, rank) pairs.
    pub fn new(ranks: Vec<(Vec<u8>, u32)>) -> Result<Bpe, String> {
        if ranks.is_empty() {
            return Err("vocabulary is empty".into());
        }
        let max_id = ranks.iter().map(|(_, r)| *r).max().unwrap();
        if max_id as usize >= MAX_VOCAB {
            return Err(format!("rank {max_id} is too large: ids must be below {MAX_VOCAB}"));
        }
        let n = max_id as usize + 1;
        let mut by_id: Vec<Option<&[u8]>> = vec![None; n];
        let mut rank_of = FxHashMap::default();
        rank_of.reserve(ranks.len());
        for (bytes, r) in &ranks {
            if bytes.is_empty() {
                return Err(format!("rank {r} has empty token bytes"));
            }
            if let Some(prev) = by_id[*r as usize] {
                return Err(format!("rank {r} is given twice ({:?} and {:?})", prev, bytes));
            }
            by_id[*r as usize] = Some(bytes);
            if rank_of.insert(bytes.clone().into_boxed_slice(), *r).is_some() {
                return Err(format!("token bytes {:?} appear twice", bytes));
            }
        }
        let mut byte_id = [NONE; 256];
        for (b, slot) in byte_id.iter_mut().enumerate() {
            match rank_of.get(&[b as u8][..]) {
                Some(&r) => *slot = r,
                None => return Err(format!("vocabulary lacks the single byte 0x{b:02x}")),
            }
        }
        let mut data = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        let mut present = vec![false; n];
        offsets.push(0u32);
        for (id, t) in by_id.iter().enumerate() {
            if let Some(t) = t {
                data.extend_from_slice(t);
                present[id] = true;
            }
            offsets.push(data.len() as u32);
        }
        // Every split of a token into two tokens is a pair that merges into it.
        let mut pair_rank = FxHashMap::default();
        for (bytes, r) in &ranks {
            for k in 1..bytes.len() {
                if let (Some(&a), Some(&b)) = (rank_of.get(&bytes[..k]), rank_of.get(&bytes[k..])) {
                    pair_rank.insert(key(a, b), *r);
                }
            }
        }
        let short_rank = ranks.iter().filter(|(b, _)| b.len() <= PACK_MAX).map(|(b, r)| (pack(b), *r)).collect();
        Ok(Bpe {
            uid: NEXT_VOCAB_ID.fetch_add(1, Ordering::Relaxed),
            rank_of,
            short_rank,
            byte_id,
            pair_rank,
            data,
            offsets,
            present,
        })
    }

    /// One past the largest rank.
    pub fn n_ids(&self) -> usize {
        self.present.len()
    }

    pub fn has_id(&self, id: u32) -> bool {
        (id as usize) < self.present.len() && self.present[id as usize]
    }

    pub fn token(&self, id: u32) -> &[u8] {
        &self.data[self.offsets[id as usize] as usize..self.offsets[id as usize + 1] as usize]
    }

    pub fn rank(&self, bytes: &[u8]) -> Option<u32> {
        self.rank_of.get(bytes).copied()
    }

    /// (bytes, rank) for every token, in rank order.
    pub fn ranks(&self) -> Vec<(&[u8], u32)> {
        (0..self.n_ids() as u32).filter(|&i| self.has_id(i)).map(|i| (self.token(i), i)).collect()
    }

    #[inline(always)]
    fn pair(&self, a: u32, b: u32) -> u32 {
        *self.pair_rank.get(&key(a, b)).unwrap_or(&NONE)
    }

    /// Runs `f` with this thread's encode cache, reset if another vocabulary used it last.
    pub fn with_cache<T>(&self, f: impl FnOnce(&mut EncodeCache) -> T) -> T {
        CACHE.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.owner != self.uid {
                cache.owner = self.uid;
                cache.hot.clear();
                cache.hot.resize(HOT_SLOTS, EMPTY_SLOT);
                cache.merged.clear();
                cache.merged_short.clear();
            }
            f(&mut cache)
        })
    }

    /// Appends the ids of one pre-split chunk.
    #[inline]
    pub fn encode_chunk(&self, cache: &mut EncodeCache, chunk: &[u8], out: &mut Vec<u32>) {
        if chunk.len() == 1 {
            out.push(self.byte_id[chunk[0] as usize]);
            return;
        }
        if chunk.len() <= PACK_MAX {
            let k = pack(chunk);
            let slot = &mut cache.hot[hot_slot(k)];
            if slot.key == k {
                push_hot(out, &slot.ids, slot.n as usize);
                return;
            }
            let start = out.len();
            match self.short_rank.get(&k) {
                Some(&r) => out.push(r),
                None => match cache.merged_short.get(&k) {
                    Some(ids) => out.extend_from_slice(ids),
                    None => {
                        self.merge_small(chunk, out);
                        if cache.merged_short.len() >= CACHE_ENTRIES {
                            cache.merged_short.clear();
                        }
                        cache.merged_short.insert(k, out[start..].into());
                    }
                },
            }
            let n = out.len() - start;
            if n <= HOT_IDS {
                slot.key = k;
                slot.n = n as u32;
                slot.ids[..n].copy_from_slice(&out[start..]);
            }
            return;
        }
        if let Some(&r) = self.rank_of.get(chunk) {
            out.push(r);
            return;
        }
        if let Some(ids) = cache.merged.get(chunk) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        self.merge(chunk, out);
        if cache.merged.len() >= CACHE_ENTRIES {
            cache.merged.clear();
        }
        cache.merged.insert(chunk.into(), out[start..].into());
    }

    /// Merges a chunk that is not a single token (no cache).
    pub fn merge(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if chunk.len() <= SMALL_CHUNK {
            self.merge_small(chunk, out)
        } else {
            self.merge_heap(chunk, out)
        }
    }

    fn merge_small(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let mut ids = [0u32; SMALL_CHUNK];
        let mut ranks = [NONE; SMALL_CHUNK];
        let mut n = chunk.len();
        for (i, &b) in chunk.iter().enumerate() {
            ids[i] = self.byte_id[b as usize];
        }
        for i in 0..n - 1 {
            ranks[i] = self.pair(ids[i], ids[i + 1]);
        }
        loop {
            // Lowest rank, leftmost on ties (strict `<`), as in tiktoken.
            let mut best = NONE;
            let mut at = 0;
            for (i, &r) in ranks[..n - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            ids[at] = best;
            ids.copy_within(at + 2..n, at + 1);
            ranks.copy_within(at + 1..n - 1, at);
            n -= 1;
            if at > 0 {
                ranks[at - 1] = self.pair(ids[at - 1], ids[at]);
            }
            if at + 1 < n {
                ranks[at] = self.pair(ids[at], ids[at + 1]);
            }
            if n == 1 {
                break;
            }
        }
        out.extend_from_slice(&ids[..n]);
    }

    /// O(n log n) merge for long chunks (long CJK runs, long runs of spaces or symbols).
    /// A heap keyed by (rank, position of the left part) pops the same pair the linear scan
    /// would pick; stale entries are skipped by re-checking the pair at that position.
    fn merge_heap(&self, chunk: &[u8], out: &mut Vec<u32>) {
        let n = chunk.len();
        let mut ids: Vec<u32> = chunk.iter().map(|&b| self.byte_id[b as usize]).collect();
        let mut next: Vec<u32> = (1..=n as u32).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let r = self.pair(ids[i], ids[i + 1]);
            if r != NONE {
                heap.push(Reverse((r, i as u32)));
            }
        }
        while let Some(Reverse((r, i))) = heap.pop() {
            let i = i as usize;
            if !alive[i] {
                continue;
            }
            let j = next[i] as usize;
            if j >= n || self.pair(ids[i], ids[j]) != r {
                continue;
            }
            ids[i] = r;
            alive[j] = false;
            let k = next[j];
            next[i] = k;
            if (k as usize) < n {
                prev[k as usize] = i as u32;
                let rk = self.pair(r, ids[k as usize]);
                if rk != NONE {
                    heap.push(Reverse((rk, i as u32)));
                }
            }
            let p = prev[i];
            if p != u32::MAX {
                let rp = self.pair(ids[p as usize], r);
                if rp != NONE {
                    heap.push(Reverse((rp, p)));
                }
            }
        }
        let mut i = 0usize;
        while i < n {
            out.push(ids[i]);
            i = next[i] as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_vocab() -> Vec<(Vec<u8>, u32)> {
        (0..256u32).map(|b| (vec![b as u8], b)).collect()
    }

    /// Naive tiktoken-style merge on byte ranges, the definition the fast paths must match.
    fn naive(bpe: &Bpe, chunk: &[u8]) -> Vec<u32> {
        let mut parts: Vec<Vec<u8>> = chunk.iter().map(|&b| vec![b]).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len().saturating_sub(1) {
                let cat = [parts[i].clone(), parts[i + 1].clone()].concat();
                if let Some(r) = bpe.rank(&cat) {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            match best {
                None => break,
                Some((_, i)) => {
                    let right = parts.remove(i + 1);
                    parts[i].extend(right);
                }
            }
        }
        parts.iter().map(|p| bpe.rank(p).unwrap()).collect()
    }

    #[test]
    fn small_and_heap_paths_match_naive() {
        let mut v = byte_vocab();
        for (i, t) in ["ab", "aa", "aaaa", "ba", "abab", "bb", "aab"].iter().enumerate() {
            v.push((t.as_bytes().to_vec(), 256 + i as u32));
        }
        let bpe = Bpe::new(v).unwrap();
        let mut seed = 12345u64;
        for len in [2usize, 3, 7, 63, 64, 65, 200, 1000] {
            for _ in 0..20 {
                let chunk: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        b"ab"[(seed >> 33) as usize % 2]
                    })
                    .collect();
                let mut out = Vec::new();
                if len <= SMALL_CHUNK {
                    bpe.merge_small(&chunk, &mut out);
                } else {
                    bpe.merge_heap(&chunk, &mut out);
                }
                assert_eq!(out, naive(&bpe, &chunk));
                let mut out2 = Vec::new();
                bpe.merge_heap(&chunk, &mut out2);
                assert_eq!(out2, out);
            }
        }
    }

    #[test]
    fn rejects_bad_vocabularies() {
        assert!(Bpe::new(vec![]).is_err());
        let mut v = byte_vocab();
        v.pop();
        assert!(Bpe::new(v).err().unwrap().contains("0xff"));
        let mut v = byte_vocab();
        v.push((b"ab".to_vec(), 5));
        assert!(Bpe::new(v).err().unwrap().contains("twice"));
        let mut v = byte_vocab();
        v.push((b"ab".to_vec(), i32::MAX as u32));
        assert!(Bpe::new(v).err().unwrap().contains("too large"));
    }
}
