//! The tokenizer core: a BPE vocabulary, a pre-split pattern and special tokens, with
//! single and parallel batch encoding and decoding.

use crate::bpe::{Bpe, MAX_VOCAB};
use crate::pretokenize::Splitter;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// A run of pieces encoded into one buffer: (the ids of all pieces, the number of ids of each).
pub type EncodedRun = (Vec<u32>, Vec<u32>);

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
            if *id as usize >= MAX_VOCAB {
                return Err(format!(
                    "special token {name:?} has id {id}, which is too large: ids must be below {MAX_VOCAB}"
                ));
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
        self.bpe
            .with_cache(|cache| self.splitter.for_each_chunk(text, |c| self.bpe.encode_chunk(cache, c.as_bytes(), out)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Encodes a run of pieces into one buffer (not one allocation per text).
    pub fn encode_run(&self, pieces: &[(usize, &str)]) -> Result<EncodedRun, String> {
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        self.encode_run_into(pieces, &mut ids, &mut lens)?;
        Ok((ids, lens))
    }

    /// `encode_run` into buffers the caller may reuse (they are cleared first).
    pub fn encode_run_into(
        &self,
        pieces: &[(usize, &str)],
        ids: &mut Vec<u32>,
        lens: &mut Vec<u32>,
    ) -> Result<(), String> {
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
    pub fn encode_flat(
        &self,
        texts: &[&str],
        prepend: Option<u32>,
        append: Option<u32>,
    ) -> Result<(Vec<u32>, Vec<u64>), String> {
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
        let runs: Vec<Result<EncodedRun, String>> = pieces.par_chunks(run).map(|ps| self.encode_run(ps)).collect();
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

    /// UTF-8 byte length of each id's token (0 for specials and unused ids).
    pub fn token_lengths(&self) -> Vec<i32> {
        (0..self.n_vocab as u32)
            .map(|id| if self.bpe.has_id(id) { self.bpe.token(id).len() as i32 } else { 0 })
            .collect()
    }
}

/// Texts longer than twice this are encoded in pieces of about this size, in parallel.
const PIECE_BYTES: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::default_pattern;
    use crate::threads::with_threads;
    use crate::train::{learn_merges, ChunkCounter};

    const CORPUS: &[&str] = &[
        "the cat sat on the mat, the cat's hat is flat.",
        "  indented  lines\n\tand tabs 12345 67 中文中文 字 😀😀!",
        "the theme: then there, these the thethe",
    ];

    /// A vocabulary trained on CORPUS (bytes, then merges), with two specials after it.
    fn trained(n_merges: usize) -> Core {
        let mut counter = ChunkCounter::new(Splitter::new(&default_pattern()).unwrap(), None, None);
        counter.feed(CORPUS).unwrap();
        let merges = learn_merges(counter.into_counts(), n_merges, |_| {});
        let mut ranks: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], b as u32)).collect();
        ranks.extend(merges.into_iter().zip(256u32..));
        let n = ranks.len() as u32;
        Core::new(ranks, &default_pattern(), vec![("<|bos|>".into(), n), ("<|eos|>".into(), n + 1)]).unwrap()
    }

    fn decode(core: &Core, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        core.decode_into(ids, &mut out).unwrap();
        out
    }

    #[test]
    fn encode_decode_round_trip() {
        let core = trained(60);
        let long = CORPUS.concat().repeat(50);
        for text in CORPUS.iter().copied().chain(["", " ", "\n\n\n", "zebra 999 '  ", long.as_str()]) {
            let ids = core.encode(text).unwrap();
            assert_eq!(decode(&core, &ids), text.as_bytes(), "{text:?}");
            assert!(ids.iter().all(|&id| core.bpe.has_id(id)), "plain text never yields a special");
        }
        // Merges compress the text they were learned from.
        let ids = core.encode(CORPUS[0]).unwrap();
        assert!(ids.len() < CORPUS[0].len() / 2, "{} ids for {} bytes", ids.len(), CORPUS[0].len());
    }

    #[test]
    fn frequent_words_become_single_tokens() {
        let core = trained(40);
        // " the" and "the" are the most frequent chunks of CORPUS: each is one token.
        for word in ["the", " the", " cat"] {
            assert_eq!(core.encode(word).unwrap().len(), 1, "{word:?}");
            assert_eq!(core.bpe.rank(word.as_bytes()), core.encode(word).unwrap().first().copied());
        }
        // Special-looking text is plain text.
        let ids = core.encode("<|bos|>").unwrap();
        assert!(ids.len() > 1 && !ids.contains(&core.special_by_name["<|bos|>"]));
    }

    #[test]
    fn flat_batch_matches_single_encodes() {
        let core = trained(80);
        // Long enough to be cut into pieces on the parallel path.
        let big = format!("{}\n", CORPUS.join("\n")).repeat(3 * PIECE_BYTES / 100);
        let texts: Vec<&str> = CORPUS.iter().copied().chain(["", big.as_str(), "x"]).collect();
        let bos = core.special_by_name["<|bos|>"];
        for threads in [1, 2, 3] {
            let (ids, offsets) =
                with_threads(Some(threads), || core.encode_flat(&texts, Some(bos), None)).unwrap().unwrap();
            assert_eq!(offsets.len(), texts.len() + 1);
            for (i, t) in texts.iter().enumerate() {
                let mut want = vec![bos];
                want.extend(core.encode(t).unwrap());
                assert_eq!(ids[offsets[i] as usize..offsets[i + 1] as usize], want[..], "text {i}, {threads} threads");
            }
        }
    }

    #[test]
    fn specials_decode_and_are_checked() {
        let core = trained(10);
        let (bos, eos) = (core.special_by_name["<|bos|>"], core.special_by_name["<|eos|>"]);
        assert_eq!(core.n_vocab, eos as usize + 1);
        assert_eq!(decode(&core, &[bos, b'h' as u32, eos]), b"<|bos|>h<|eos|>");
        let mut out = Vec::new();
        let e = core.decode_into(&[1, eos + 1], &mut out).unwrap_err();
        assert_eq!(e, format!("invalid token id {} at position 1 (vocabulary has {} ids)", eos + 1, eos + 1));
        let lens = core.token_lengths();
        assert_eq!((lens[b'a' as usize], lens[bos as usize], lens.len()), (1, 0, core.n_vocab));

        let bytes = || (0..=255u8).map(|b| (vec![b], b as u32)).collect::<Vec<_>>();
        let pat = default_pattern();
        let err = |specials: Vec<(&str, u32)>| {
            Core::new(bytes(), &pat, specials.into_iter().map(|(n, i)| (n.to_string(), i)).collect()).err().unwrap()
        };
        assert!(err(vec![("<|a|>", 7)]).contains("already uses"));
        assert!(err(vec![("<|a|>", 300), ("<|a|>", 301)]).contains("given twice"));
        assert!(err(vec![("<|a|>", 300), ("<|b|>", 300)]).contains("given twice"));
        assert!(err(vec![("", 300)]).contains("empty"));
        assert!(err(vec![("<|a|>", u32::MAX)]).contains("too large"));
    }
}
