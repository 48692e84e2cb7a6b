//! Character classes used by the pre-split patterns (`\p{L}`, `\p{N}`, `\s`, and o200k's
//! cased letter classes).
//!
//! The tables are read out of `regex-syntax` (the same Unicode data the `regex` and
//! `fancy-regex` crates match with, and so tiktoken), so the hand-written splitter and the
//! regex agree on every code point.

use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 4;
/// o200k's `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`: letters that can start a word, and marks.
pub const UPPERISH: u8 = 8;
/// o200k's `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`: letters that can continue a word, and marks.
pub const LOWERISH: u8 = 16;
/// Neither letter, number nor space: `[^\s\p{L}\p{N}]` (marks included).
#[inline(always)]
pub fn is_other(cls: u8) -> bool {
    cls & (LETTER | NUMBER | SPACE) == 0
}

static TABLE: OnceLock<Vec<u8>> = OnceLock::new();

fn ranges_of(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("built-in class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => {
            cls.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

fn table() -> &'static [u8] {
    TABLE.get_or_init(|| {
        // One byte per code point (1.1 MB): a flat lookup beats a range search in the hot loop.
        let mut t = vec![0u8; 0x11_0000];
        for (bit, pat) in [
            (LETTER, r"\p{L}"),
            (NUMBER, r"\p{N}"),
            (SPACE, r"\s"),
            (UPPERISH, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
            (LOWERISH, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
        ] {
            for (lo, hi) in ranges_of(pat) {
                for c in lo..=hi {
                    t[c as usize] |= bit;
                }
            }
        }
        t
    })
}

/// Class bits of one code point.
#[inline(always)]
pub fn class_of(table: &[u8], c: u32) -> u8 {
    // SAFETY-free: `c` comes from valid UTF-8, so it is < 0x110000.
    table[c as usize]
}

/// The shared class table (built on first use).
pub fn classes() -> &'static [u8] {
    table()
}

/// Decode the code point starting at byte `i` of valid UTF-8; returns (code point, length).
#[inline(always)]
pub fn decode_at(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F), 3)
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_and_beyond() {
        let t = classes();
        assert_eq!(class_of(t, 'a' as u32), LETTER | LOWERISH);
        assert_eq!(class_of(t, 'A' as u32), LETTER | UPPERISH);
        assert_eq!(class_of(t, '\u{301}' as u32), UPPERISH | LOWERISH); // combining acute: a mark
        assert!(is_other(class_of(t, '\u{301}' as u32)) && is_other(0) && !is_other(SPACE));
        assert_eq!(class_of(t, '7' as u32), NUMBER);
        assert_eq!(class_of(t, ' ' as u32), SPACE);
        assert_eq!(class_of(t, '\n' as u32), SPACE);
        assert_eq!(class_of(t, '!' as u32), 0);
        assert_eq!(class_of(t, '中' as u32), LETTER | UPPERISH | LOWERISH);
        assert_eq!(class_of(t, '½' as u32), NUMBER);
        assert_eq!(class_of(t, '\u{3000}' as u32), SPACE);
        assert_eq!(class_of(t, '😀' as u32), 0);
    }

    #[test]
    fn decode_matches_std() {
        let s = "aé中😀";
        let b = s.as_bytes();
        let mut i = 0;
        for ch in s.chars() {
            let (c, n) = decode_at(b, i);
            assert_eq!(c, ch as u32);
            assert_eq!(n, ch.len_utf8());
            i += n;
        }
    }
}
