//! Hand-written matcher for the GPT-4 family of split patterns (ours, with `\p{N}{1,k}`, and
//! cl100k's): the chunk that starts at a given byte, exactly as the regex's leftmost-first
//! match, in one forward scan.

use crate::unicode::{class_of, decode_at, is_other, LETTER, NUMBER, SPACE};

/// ASCII-lowercase plus the one non-ASCII simple case fold that matters for the contractions
/// (U+017F LATIN SMALL LETTER LONG S matches `(?i:s)`).
#[inline(always)]
fn fold(c: u32) -> u32 {
    if c == 0x17F {
        's' as u32
    } else if ('A' as u32..='Z' as u32).contains(&c) {
        c + 32
    } else {
        c
    }
}

/// End of the contraction `'(?i:[sdmt]|ll|ve|re)` if one starts at `i` (GPT-4's first
/// alternative; o200k's `(?i:'s|'t|'re|'ve|'m|'ll|'d)` suffix is the same set).
#[inline(always)]
pub(super) fn contraction_end(b: &[u8], i: usize) -> Option<usize> {
    let n = b.len();
    if b[i] != b'\'' || i + 1 >= n {
        return None;
    }
    let (c1, l1) = decode_at(b, i + 1);
    let f1 = fold(c1);
    if f1 == 's' as u32 || f1 == 'd' as u32 || f1 == 'm' as u32 || f1 == 't' as u32 {
        return Some(i + 1 + l1);
    }
    if (f1 == 'l' as u32 || f1 == 'v' as u32 || f1 == 'r' as u32) && i + 1 + l1 < n {
        let (c2, l2) = decode_at(b, i + 1 + l1);
        let f2 = fold(c2);
        if (f1 == 'l' as u32 && f2 == 'l' as u32) || (f1 != 'l' as u32 && f2 == 'e' as u32) {
            return Some(i + 1 + l1 + l2);
        }
    }
    None
}

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
    let scan_letters = |mut j: usize| -> usize {
        while j < n {
            let (c, l) = decode_at(b, j);
            if class_of(t, c) & LETTER == 0 {
                break;
            }
            j += l;
        }
        j
    };
    if k0 & LETTER != 0 {
        return scan_letters(i + l0);
    }
    if k0 & NUMBER == 0 && c0 != '\r' as u32 && c0 != '\n' as u32 && i + l0 < n {
        let (c1, l1) = decode_at(b, i + l0);
        if class_of(t, c1) & LETTER != 0 {
            return scan_letters(i + l0 + l1);
        }
    }

    // \p{N}{1,k}
    if k0 & NUMBER != 0 {
        let mut j = i + l0;
        let mut count = 1;
        while count < max_digits && j < n {
            let (c, l) = decode_at(b, j);
            if class_of(t, c) & NUMBER == 0 {
                break;
            }
            j += l;
            count += 1;
        }
        return j;
    }

    // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
    let scan_punct_tail = |mut j: usize| -> usize {
        while j < n {
            let (c, l) = decode_at(b, j);
            if !is_other(class_of(t, c)) {
                break;
            }
            j += l;
        }
        while j < n && (b[j] == b'\r' || b[j] == b'\n') {
            j += 1;
        }
        j
    };
    if c0 == ' ' as u32 && i + 1 < n {
        let (c1, l1) = decode_at(b, i + 1);
        if is_other(class_of(t, c1)) {
            return scan_punct_tail(i + 1 + l1);
        }
    }
    if is_other(k0) {
        return scan_punct_tail(i + l0);
    }

    debug_assert!(k0 & SPACE != 0);
    whitespace_end(t, b, i, l0, ws_to_end)
}

/// End of the chunk starting with whitespace at `i` (its first char `l0` bytes long), by the
/// whitespace alternatives shared by the GPT-4 family and o200k: `\s*[\r\n]` (o200k's
/// `\s*[\r\n]+` ends at the same place), `\s+(?!\S)`, then one whitespace char; `ws_to_end`
/// adds cl100k's `\s++$` before them.
#[inline(always)]
pub(super) fn whitespace_end(t: &[u8], b: &[u8], i: usize, l0: usize, ws_to_end: bool) -> usize {
    let n = b.len();
    // Measure the maximal whitespace run.
    let mut j = i;
    let mut last_char_start = i;
    let mut last_newline_end = 0usize;
    while j < n {
        let (c, l) = decode_at(b, j);
        if class_of(t, c) & SPACE == 0 {
            break;
        }
        if c == '\r' as u32 || c == '\n' as u32 {
            last_newline_end = j + l;
        }
        last_char_start = j;
        j += l;
    }
    // \s++$ (cl100k only)
    if ws_to_end && j == n {
        return n;
    }
    // \s*[\r\n]
    if last_newline_end != 0 {
        return last_newline_end;
    }
    // \s+(?!\S)
    if j == n {
        return n;
    }
    if last_char_start > i {
        return last_char_start;
    }
    // \s+ (or \s): a single whitespace char before a non-space
    i + l0
}

