//! BPE training: count unique pre-split chunks, then merge the most frequent adjacent pair
//! until the vocabulary is full.
//!
//! Rules, as nanochat's rustbpe trains (rustbpe/src/lib.rs at 48abd7d): merge i gets id 256+i;
//! the most frequent pair wins and ties go to the smaller pair (lexicographic on the two ids),
//! so training is deterministic. One rule of ours on top: a pair whose concatenated bytes
//! already exist as a token is skipped, so every token has unique bytes and the ranks export
//! losslessly to tiktoken.
//!
//! The merge loop keeps, per pair, its count and a list of words it may occur in (stale entries
//! are allowed and skipped), plus a max-queue with lazy re-checking (`PairQueue`). Existing
//! pairs only lose count when a merge happens, new pairs (with the new id) get pushed once after
//! each merge.

use crate::pretokenize::Splitter;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// The pairs still to merge, most frequent first (ties: the smaller key), with lazy re-checking:
/// an entry's count may be stale (a pair's count only falls once it exists), and the caller
/// compares it with the pair's current count and pushes it again if it fell.
///
/// Only entries whose count is at least `2^level` live in the binary heap; the rest wait in one
/// list per power of two. Most pairs are rare and never reach the top, and a heap of all of them
/// (hundreds of thousands of entries) made every pop a chain of cache misses. This is exact
/// because the top count never rises: a pair's count only falls after the merge that creates it,
/// and a new pair's count is at most that merge's count. While the heap holds anything, its top
/// beats every waiting entry (each below `2^level`, ties included); once it is empty, the next
/// lower power of two moves in.
struct PairQueue {
    heap: BinaryHeap<(i64, Reverse<u64>)>,
    /// `waiting[l]`: entries with a count in `[2^l, 2^(l+1))`, for `l < level`.
    waiting: Vec<Vec<(i64, u64)>>,
    level: u32,
}

impl PairQueue {
    fn new(entries: impl Iterator<Item = (i64, u64)>) -> PairQueue {
        let all: Vec<(i64, u64)> = entries.filter(|e| e.0 > 0).collect();
        let top = all.iter().map(|e| e.0).max().unwrap_or(1);
        // About the top count / 1024: a few hundred pairs start in the heap.
        let level = (63 - top.leading_zeros()).saturating_sub(10);
        let mut q = PairQueue { heap: BinaryHeap::new(), waiting: vec![Vec::new(); level as usize], level };
        for (count, k) in all {
            q.push(count, k);
        }
        q
    }

    /// Queues a pair whose count is `count` (> 0).
    fn push(&mut self, count: i64, k: u64) {
        let l = 63 - count.leading_zeros();
        if l >= self.level {
            self.heap.push((count, Reverse(k)));
        } else {
            self.waiting[l as usize].push((count, k));
        }
    }

    /// The entry with the highest (possibly stale) count, or None when nothing is left.
    fn pop(&mut self) -> Option<(i64, u64)> {
        while self.heap.is_empty() && self.level > 0 {
            self.level -= 1;
            let moved = std::mem::take(&mut self.waiting[self.level as usize]);
            self.heap.extend(moved.into_iter().map(|(c, k)| (c, Reverse(k))));
        }
        self.heap.pop().map(|(count, Reverse(k))| (count, k))
    }
}

/// Accumulates chunk counts from a stream of documents.
pub struct ChunkCounter {
    splitter: Splitter,
    doc_cap: Option<usize>,
    max_chars: Option<u64>,
    chars_seen: u64,
    counts: FxHashMap<Box<str>, u64>,
}

/// Keeps at most `cap` chars of `s` (a prefix on a char boundary).
fn char_prefix(s: &str, cap: usize) -> (&str, usize) {
    match s.char_indices().nth(cap) {
        Some((i, _)) => (&s[..i], cap),
        None => (s, s.chars().count()),
    }
}

impl ChunkCounter {
    pub fn new(splitter: Splitter, doc_cap: Option<usize>, max_chars: Option<u64>) -> Self {
        ChunkCounter { splitter, doc_cap, max_chars, chars_seen: 0, counts: FxHashMap::default() }
    }

    pub fn chars_seen(&self) -> u64 {
        self.chars_seen
    }

    /// True once `max_chars` is reached: the caller may stop feeding.
    pub fn full(&self) -> bool {
        self.max_chars.is_some_and(|m| self.chars_seen >= m)
    }

    pub fn unique_chunks(&self) -> usize {
        self.counts.len()
    }

    /// Counts the chunks of a batch of documents, in parallel.
    pub fn feed(&mut self, texts: &[&str]) -> Result<(), String> {
        // Caps are applied in stream order, so the result does not depend on batching.
        let mut capped: Vec<&str> = Vec::with_capacity(texts.len());
        for &t in texts {
            if self.full() {
                break;
            }
            let (mut t, mut n) = match self.doc_cap {
                Some(cap) => char_prefix(t, cap),
                None => (t, t.chars().count()),
            };
            if let Some(m) = self.max_chars {
                let left = (m - self.chars_seen) as usize;
                if n > left {
                    (t, n) = char_prefix(t, left);
                }
            }
            self.chars_seen += n as u64;
            capped.push(t);
        }
        let threads = rayon::current_num_threads().max(1);
        let per = capped.len().div_ceil(threads).max(1);
        let splitter = &self.splitter;
        let locals: Vec<Result<FxHashMap<&str, u64>, String>> = capped
            .par_chunks(per)
            .map(|docs| {
                let mut local: FxHashMap<&str, u64> = FxHashMap::default();
                for d in docs {
                    splitter.for_each_chunk(d, |c| *local.entry(c).or_insert(0) += 1)?;
                }
                Ok(local)
            })
            .collect();
        for local in locals {
            for (k, v) in local? {
                match self.counts.get_mut(k) {
                    Some(c) => *c += v,
                    None => {
                        self.counts.insert(k.into(), v);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a pre-counted chunk (used by tests and by resumable callers).
    pub fn add_count(&mut self, chunk: &str, count: u64) {
        *self.counts.entry(chunk.into()).or_insert(0) += count;
    }

    pub fn into_counts(self) -> FxHashMap<Box<str>, u64> {
        self.counts
    }
}

/// One unique chunk in the merge loop: where its symbols are in `syms`, how many it has now,
/// how often it occurs, and the last merge step that rewrote it. One struct, not four arrays:
/// a merge visits its words in no useful order, and each visit then waits for one cache line
/// instead of four.
#[derive(Clone, Copy)]
struct Word {
    count: i64,
    start: u32,
    len: u32,
    visited: u32,
}

/// How many words ahead the merge loop prefetches a word's record (and half as far, its symbols).
const WORD_PREFETCH: usize = 8;

#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The pairs with the new id `x` that one merge creates, gathered in dense per-id slots rather
/// than the pair map: `x` is brand new, so none of them is in the map yet, and they take half
/// of the merge loop's updates. Moved into the map (and queued) once the merge is done.
#[derive(Default)]
struct NewPairs {
    /// `first[y]`: 1 + the index in `list` of the pair (x, y) (0: none yet).
    first: Vec<u32>,
    /// `second[y]`: 1 + the index in `list` of the pair (y, x), for y != x.
    second: Vec<u32>,
    list: Vec<(u64, PairStat)>,
}

impl NewPairs {
    /// Adds `d` to the count of `k`, a pair with `x` (and on a gain, word `w` to its words).
    #[inline(always)]
    fn bump(&mut self, x: u32, k: u64, d: i64, w: u32) {
        let (hi, lo) = ((k >> 32) as u32, k as u32);
        let slot = if hi == x { &mut self.first[lo as usize] } else { &mut self.second[hi as usize] };
        if *slot == 0 {
            self.list.push((k, PairStat { count: 0, words: Vec::new() }));
            *slot = self.list.len() as u32;
        }
        let st = &mut self.list[*slot as usize - 1].1;
        st.count += d;
        if d > 0 && st.words.last() != Some(&w) {
            st.words.push(w);
        }
    }

    /// The gathered pairs, slots cleared for the next merge.
    fn drain(&mut self, x: u32) -> std::vec::Drain<'_, (u64, PairStat)> {
        for &(k, _) in &self.list {
            let (hi, lo) = ((k >> 32) as u32, k as u32);
            if hi == x {
                self.first[lo as usize] = 0;
            } else {
                self.second[hi as usize] = 0;
            }
        }
        self.list.drain(..)
    }
}

struct PairStat {
    count: i64,
    /// Words that may contain the pair (duplicates and stale entries allowed).
    words: Vec<u32>,
}

extern "C" {
    /// mimalloc's `mi_collect` (its C API; the allocator of lib.rs compiles it in, and the
    /// `libmimalloc-sys` crate declares it only under a feature that needs one more crate).
    fn mi_collect(force: bool);
}

/// Hands the memory freed so far back to the OS now, not after mimalloc's purge delay (a
/// second). The counting's maps and the chunk strings are freed just before the merge loop
/// allocates its tables, and a run that gets there within that second kept those freed pages
/// in its RSS: a 28 MB training run peaked about 10 MiB higher (median of 8) without this.
fn release_freed_memory() {
    // SAFETY: no arguments to uphold; mi_collect only frees and purges memory nobody holds.
    unsafe { mi_collect(true) }
}

/// Learns `n_merges` merges from chunk counts. Returns the bytes of each new token, in
/// order (token 256+i). Stops early if no pair is left. `progress` is called now and then
/// with the number of merges done.
pub fn learn_merges(
    counts: FxHashMap<Box<str>, u64>,
    n_merges: usize,
    mut progress: impl FnMut(usize),
) -> Vec<Vec<u8>> {
    // Words sorted by bytes: a deterministic layout, whatever the hash map's order.
    let mut entries: Vec<(Box<str>, u64)> = counts.into_iter().filter(|(k, _)| k.len() >= 2).collect();
    entries.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let total: usize = entries.iter().map(|(k, _)| k.len()).sum();
    let mut syms: Vec<u32> = Vec::with_capacity(total);
    let mut ws: Vec<Word> = Vec::with_capacity(entries.len());
    for (k, c) in entries.drain(..) {
        ws.push(Word { count: c as i64, start: syms.len() as u32, len: k.len() as u32, visited: u32::MAX });
        syms.extend(k.bytes().map(|b| b as u32));
    }
    drop(entries);
    release_freed_memory();

    let mut pairs: FxHashMap<u64, PairStat> = FxHashMap::default();
    for (w, wd) in ws.iter().enumerate() {
        let s = wd.start as usize;
        let word = &syms[s..s + wd.len as usize];
        for p in word.windows(2) {
            let st = pairs.entry(key(p[0], p[1])).or_insert(PairStat { count: 0, words: Vec::new() });
            st.count += wd.count;
            if st.words.last() != Some(&(w as u32)) {
                st.words.push(w as u32);
            }
        }
    }
    let mut queue = PairQueue::new(pairs.iter().map(|(&k, st)| (st.count, k)));

    // Bytes of each id: the 256 single bytes, then merge i's as id 256+i (the result, in the
    // end). Not reserved for `n_merges`: a corpus runs out of pairs long before an absurd request.
    let mut tokens: Vec<Vec<u8>> = (0..256u32).map(|b| vec![b as u8]).collect();
    let mut existing: FxHashSet<Vec<u8>> = tokens.iter().cloned().collect();
    let mut new_pairs: Vec<u64> = Vec::new();
    let mut with_x = NewPairs::default();

    while tokens.len() - 256 < n_merges {
        let Some((count, pk)) = queue.pop() else { break };
        let current = pairs.get(&pk).map_or(0, |s| s.count);
        if current != count {
            if current > 0 {
                queue.push(current, pk);
            }
            continue;
        }
        if count <= 0 {
            break;
        }
        let (a, b) = ((pk >> 32) as u32, pk as u32);
        let mut bytes = tokens[a as usize].clone();
        bytes.extend_from_slice(&tokens[b as usize]);
        if existing.contains(&bytes) {
            // Skip: never re-pushed, since only pairs with a brand-new id are pushed later.
            pairs.remove(&pk);
            continue;
        }
        let x = tokens.len() as u32;
        let step = x - 256;
        existing.insert(bytes.clone());
        tokens.push(bytes);

        let words = std::mem::take(&mut pairs.get_mut(&pk).unwrap().words);
        new_pairs.clear();
        with_x.first.resize(tokens.len(), 0);
        with_x.second.resize(tokens.len(), 0);
        let bump = |pairs: &mut FxHashMap<u64, PairStat>, k: u64, d: i64, w: u32, new_pairs: &mut Vec<u64>| {
            let st = pairs.entry(k).or_insert_with(|| {
                new_pairs.push(k);
                PairStat { count: 0, words: Vec::new() }
            });
            st.count += d;
            if d > 0 {
                if st.words.last() != Some(&w) {
                    st.words.push(w);
                }
            } else if st.count == 0 {
                // No occurrence left: free its word list now (a queued entry, if any, is stale).
                pairs.remove(&k);
            }
        };
        for (j, &w) in words.iter().enumerate() {
            if let Some(&ahead) = words.get(j + WORD_PREFETCH) {
                prefetch(&ws[ahead as usize]);
            }
            if let Some(&near) = words.get(j + WORD_PREFETCH / 2) {
                // Its record was prefetched WORD_PREFETCH / 2 words ago.
                prefetch(syms.as_ptr().wrapping_add(ws[near as usize].start as usize));
            }
            let wd = &mut ws[w as usize];
            if wd.visited == step {
                continue;
            }
            wd.visited = step;
            let (s, l, c) = (wd.start as usize, wd.len as usize, wd.count);
            let word = &mut syms[s..s + l];
            // In-place left-to-right merge; `o` is the write index.
            let mut i = 0;
            let mut o = 0;
            let mut hit = false;
            while i < l {
                if i + 1 < l && word[i] == a && word[i + 1] == b {
                    hit = true;
                    if o > 0 {
                        // `prev` is x where the previous occurrence was just merged.
                        let prev = word[o - 1];
                        if prev == x {
                            with_x.bump(x, key(prev, a), -c, w);
                        } else {
                            bump(&mut pairs, key(prev, a), -c, w, &mut new_pairs);
                        }
                        with_x.bump(x, key(prev, x), c, w);
                    }
                    if i + 2 < l {
                        // `nxt` is not merged yet, so never x.
                        let nxt = word[i + 2];
                        bump(&mut pairs, key(b, nxt), -c, w, &mut new_pairs);
                        with_x.bump(x, key(x, nxt), c, w);
                    }
                    word[o] = x;
                    i += 2;
                } else {
                    word[o] = word[i];
                    i += 1;
                }
                o += 1;
            }
            if hit {
                ws[w as usize].len = o as u32;
                if let Some(st) = pairs.get_mut(&pk) {
                    // Each removed occurrence of (a, b) loses this word's count.
                    st.count -= c * ((l - o) as i64);
                }
            }
        }
        if let Some(st) = pairs.get_mut(&pk) {
            debug_assert_eq!(st.count, 0);
            st.count = 0;
        }
        pairs.remove(&pk);
        for (k, st) in with_x.drain(x) {
            if st.count > 0 {
                queue.push(st.count, k);
                pairs.insert(k, st);
            }
        }
        for &k in &new_pairs {
            if let Some(st) = pairs.get(&k) {
                if st.count > 0 {
                    queue.push(st.count, k);
                }
            }
        }
        // Pairs that already existed but gained count (only possible with the new id, so they
        // are in new_pairs) are covered above; others only lost count and are re-checked lazily.
        if (tokens.len() - 256).is_multiple_of(1024) {
            progress(tokens.len() - 256);
        }
    }
    progress(tokens.len() - 256);
    tokens.drain(..256);
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_example() {
        // "aaabdaaabac": the first merge is (a, a) with count 4.
        let mut counts = FxHashMap::default();
        counts.insert("aaabdaaabac".into(), 1u64);
        let merges = learn_merges(counts, 3, |_| {});
        assert_eq!(merges[0], b"aa".to_vec());
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        let mut counts = FxHashMap::default();
        counts.insert("zy".into(), 3u64);
        counts.insert("ba".into(), 3u64);
        let merges = learn_merges(counts, 2, |_| {});
        assert_eq!(merges, vec![b"ba".to_vec(), b"zy".to_vec()]);
    }

    #[test]
    fn stops_when_pairs_run_out() {
        let mut counts = FxHashMap::default();
        counts.insert("abab".into(), 2u64);
        // "ab" (count 4), then "abab" (count 2), then nothing: ("ab","ab") was used up.
        let merges = learn_merges(counts, usize::MAX, |_| {});
        assert_eq!(merges, vec![b"ab".to_vec(), b"abab".to_vec()]);
    }

    /// The rules applied literally: recount every pair after every merge.
    fn naive_merges(counts: &FxHashMap<Box<str>, u64>, n_merges: usize) -> Vec<Vec<u8>> {
        let mut words: Vec<(Vec<u32>, i64)> =
            counts.iter().map(|(k, &c)| (k.bytes().map(u32::from).collect(), c as i64)).collect();
        let mut tokens: Vec<Vec<u8>> = (0..256u32).map(|b| vec![b as u8]).collect();
        let mut merges = Vec::new();
        let mut skipped: FxHashSet<u64> = FxHashSet::default();
        while merges.len() < n_merges {
            let mut pc: FxHashMap<u64, i64> = FxHashMap::default();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *pc.entry(key(p[0], p[1])).or_insert(0) += c;
                }
            }
            // Most frequent, ties to the smaller pair; pairs whose bytes already exist are skipped.
            let Some(pk) =
                pc.iter().filter(|(k, _)| !skipped.contains(k)).max_by_key(|(&k, &c)| (c, Reverse(k))).map(|(&k, _)| k)
            else {
                break;
            };
            let (a, b) = ((pk >> 32) as u32, pk as u32);
            let bytes = [tokens[a as usize].clone(), tokens[b as usize].clone()].concat();
            if tokens.contains(&bytes) {
                skipped.insert(pk);
                continue;
            }
            let x = tokens.len() as u32;
            tokens.push(bytes.clone());
            merges.push(bytes);
            for (w, _) in words.iter_mut() {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                        out.push(x);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    #[test]
    fn matches_the_literal_rules_with_large_counts() {
        // Counts in the hundreds of thousands put most pairs below the queue's heap threshold,
        // so its waiting lists and level changes are exercised; seeded xorshift, many corpora.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..20 {
            let mut counts: FxHashMap<Box<str>, u64> = FxHashMap::default();
            for _ in 0..(20 + next(60)) {
                let len = 2 + next(7) as usize;
                let word: String = (0..len).map(|_| (b'a' + next(5) as u8) as char).collect();
                // Heavy-tailed counts: a few huge, most small.
                let scale = 1u64 << (1 + next(18));
                let c = 1 + next(4) * next(scale);
                *counts.entry(word.into()).or_insert(0) += c;
            }
            let want = naive_merges(&counts, 60);
            assert_eq!(learn_merges(counts, 60, |_| {}), want);
        }
    }

    #[test]
    fn counter_respects_caps() {
        let sp = Splitter::new(&crate::pretokenize::default_pattern()).unwrap();
        let mut c = ChunkCounter::new(sp, Some(5), Some(8));
        c.feed(&["hello world", "abcdef"]).unwrap();
        assert_eq!(c.chars_seen(), 8);
        assert!(c.full());
        let counts = c.into_counts();
        assert_eq!(counts.get("hello").copied(), Some(1));
        assert_eq!(counts.get("abc").copied(), Some(1));
    }
}
