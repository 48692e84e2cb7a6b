//! Hand-written matcher for o200k's split pattern (GPT-4o):
//!
//! 1. `[^\r\n\p{L}\p{N}]?[UP]*[LO]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 2. `[^\r\n\p{L}\p{N}]?[UP]+[LO]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
//! 3. `\p{N}{1,3}`
//! 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
//! 5. `\s*[\r\n]+`, 6. `\s+(?!\S)`, 7. `\s+`
//!
//! with UP = `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]` and LO = `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`. The
//! lookahead makes regex engines run it by backtracking, which overflows their stack on long
//! runs (a megabyte of spaces). The backtracking order is resolved here in closed form instead:
//! in alternative 1, `[UP]*` gives back characters until `[LO]+` can start, so `[LO]+` starts
//! at the last LO character of the longest UP run (or right after the run). Each position is
//! scanned a bounded number of times, so splitting is linear in the text.

use super::steps::{contraction_end, digits_end, punct_end, run_end, whitespace_end};
use crate::unicode::{class_of, decode_at, LETTER, LOWERISH, NUMBER, UPPERISH};

/// Alternative 1's `[UP]*[LO]+` from `s`: its end, if it matches.
#[inline(always)]
fn upper_star_lower_plus(t: &[u8], b: &[u8], s: usize) -> Option<usize> {
    // The longest UP run, remembering where its last LO char ends.
    let (mut j, mut last_lo) = (s, None);
    while j < b.len() {
        let (c, l) = decode_at(b, j);
        let k = class_of(t, c);
        if k & UPPERISH == 0 {
            if k & LOWERISH != 0 {
                return Some(run_end(t, b, j, LOWERISH));
            }
            break;
        }
        if k & LOWERISH != 0 {
            last_lo = Some(j + l);
        }
        j += l;
    }
    // `[UP]*` gives back up to the run's last LO char, which is all `[LO]+` then takes: the
    // chars after it in the run are not LO, nor is the one after the run.
    last_lo
}

/// Alternative 2's `[UP]+[LO]*` from `s`: its end, if it matches.
#[inline(always)]
fn upper_plus_lower_star(t: &[u8], b: &[u8], s: usize) -> Option<usize> {
    let e = run_end(t, b, s, UPPERISH);
    (e > s).then(|| run_end(t, b, e, LOWERISH))
}

/// End (exclusive byte offset) of the chunk that starts at `i`, following the alternatives
/// in order (leftmost-first, as the regex engines do).
#[inline(always)]
pub(super) fn chunk_end(t: &[u8], b: &[u8], i: usize) -> usize {
    let n = b.len();
    let (c0, l0) = decode_at(b, i);
    let k0 = class_of(t, c0);

    // Alternatives 1 and 2, each first with the optional prefix char taken, then without.
    let prefixed = k0 & (LETTER | NUMBER) == 0 && c0 != '\r' as u32 && c0 != '\n' as u32;
    if prefixed || k0 & (UPPERISH | LOWERISH) != 0 {
        let p = (prefixed && i + l0 < n).then_some(i + l0);
        let word = p
            .and_then(|p| upper_star_lower_plus(t, b, p))
            .or_else(|| upper_star_lower_plus(t, b, i))
            .or_else(|| p.and_then(|p| upper_plus_lower_star(t, b, p)))
            .or_else(|| upper_plus_lower_star(t, b, i));
        if let Some(end) = word {
            return if end < n { contraction_end(b, end).unwrap_or(end) } else { end };
        }
    }

    // \p{N}{1,3}
    if k0 & NUMBER != 0 {
        return digits_end(t, b, i, l0, 3);
    }

    // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
    if let Some(end) = punct_end(t, b, i, c0, l0, k0, true) {
        return end;
    }

    whitespace_end(t, b, i, l0, false)
}
