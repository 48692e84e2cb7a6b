//! Steps shared by the hand-written scanners: each matches one alternative (or one part of
//! one) of the GPT-4 family's and o200k's split patterns at a given byte, in one forward scan.

use crate::unicode::{class_of, decode_at, is_other, NUMBER, SPACE};

/// End of the maximal run of chars with class bit `bit` from `j`.
#[inline(always)]
pub(super) fn run_end(t: &[u8], b: &[u8], mut j: usize, bit: u8) -> usize {
    while j < b.len() {
        let (c, l) = decode_at(b, j);
        if class_of(t, c) & bit == 0 {
            break;
        }
        j += l;
    }
    j
}

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

/// `\p{N}{1,max}` from the number char at `i` (`l0` bytes long): its end.
#[inline(always)]
pub(super) fn digits_end(t: &[u8], b: &[u8], i: usize, l0: usize, max: usize) -> usize {
    let mut j = i + l0;
    for _ in 1..max {
        if j >= b.len() {
            break;
        }
        let (c, l) = decode_at(b, j);
        if class_of(t, c) & NUMBER == 0 {
            break;
        }
        j += l;
    }
    j
}

/// ` ?[^\s\p{L}\p{N}]+` and its tail of `\r`, `\n` (and `/` with `slash_tail`, o200k's
/// `[\r\n/]*`) from `i`, whose char is `c0` of class `k0` and `l0` bytes: its end, if it matches.
#[inline(always)]
pub(super) fn punct_end(t: &[u8], b: &[u8], i: usize, c0: u32, l0: usize, k0: u8, slash_tail: bool) -> Option<usize> {
    let n = b.len();
    let tail = |mut j: usize| -> usize {
        while j < n {
            let (c, l) = decode_at(b, j);
            if !is_other(class_of(t, c)) {
                break;
            }
            j += l;
        }
        while j < n && (b[j] == b'\r' || b[j] == b'\n' || (slash_tail && b[j] == b'/')) {
            j += 1;
        }
        j
    };
    if c0 == ' ' as u32 && i + 1 < n {
        let (c1, l1) = decode_at(b, i + 1);
        if is_other(class_of(t, c1)) {
            return Some(tail(i + 1 + l1));
        }
    }
    is_other(k0).then(|| tail(i + l0))
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
