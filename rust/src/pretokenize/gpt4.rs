//! Hand-written matcher for the GPT-4 family of split patterns (ours, with `\p{N}{1,k}`, and
//! cl100k's): the chunk that starts at a given byte, exactly as the regex's leftmost-first
//! match, in one forward scan.

use super::steps::{contraction_end, digits_end, punct_end, run_end, whitespace_end};
use crate::unicode::{class_of, decode_at, LETTER, NUMBER, SPACE};

/// End (exclusive byte offset) of the chunk that starts at `i`, following the alternatives of
/// the GPT-4-style pattern in order (leftmost-first, as the regex engines do).
#[inline(always)]
pub(super) fn chunk_end(t: &[u8], b: &[u8], i: usize, max_digits: usize, ws_to_end: bool) -> usize {
    let n = b.len();
    let (c0, l0) = decode_at(b, i);
    let k0 = class_of(t, c0);

    // '(?i:[sdmt]|ll|ve|re)
    if c0 == '\'' as u32 {
        if let Some(end) = contraction_end(b, i) {
            return end;
        }
    }

    // [^\r\n\p{L}\p{N}]?+\p{L}+
    if k0 & LETTER != 0 {
        return run_end(t, b, i + l0, LETTER);
    }
    if k0 & NUMBER == 0 && c0 != '\r' as u32 && c0 != '\n' as u32 && i + l0 < n {
        let (c1, l1) = decode_at(b, i + l0);
        if class_of(t, c1) & LETTER != 0 {
            return run_end(t, b, i + l0 + l1, LETTER);
        }
    }

    // \p{N}{1,k}
    if k0 & NUMBER != 0 {
        return digits_end(t, b, i, l0, max_digits);
    }

    // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
    if let Some(end) = punct_end(t, b, i, c0, l0, k0, false) {
        return end;
    }

    debug_assert!(k0 & SPACE != 0);
    whitespace_end(t, b, i, l0, ws_to_end)
}
