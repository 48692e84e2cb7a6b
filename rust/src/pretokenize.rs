//! Pre-splitting text into chunks before BPE.
//!
//! The GPT-4 family of patterns (ours from SPEC, with `\p{N}{1,k}`, and cl100k's) is matched by
//! a hand-written scanner that gives exactly the regex's leftmost-first matches; it is several
//! times faster than a backtracking regex, which is most of tiktoken's encode time. Any other
//! pattern goes through `fancy-regex`, the engine tiktoken uses, so semantics never differ.

use crate::unicode::{class_of, classes, decode_at, LETTER, NUMBER, SPACE};

/// SPEC's pattern with `{k}` standing for the digit-group length (2 in the default).
fn gpt4_style_pattern(max_digits: usize) -> String {
    format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{max_digits}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    )
}

/// The default split pattern (SPEC): GPT-4's, with digits grouped 1-2.
pub fn default_pattern() -> String {
    gpt4_style_pattern(2)
}

pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

pub enum Splitter {
    /// Hand-written scanner for GPT-4-style patterns.
    Gpt4 {
        max_digits: usize,
        /// cl100k's `\s++$`: trailing whitespace at the end of the text is one chunk.
        ws_to_end: bool,
        table: &'static [u8],
    },
    /// Any other pattern.
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        let table = classes();
        if pattern == CL100K_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 3, ws_to_end: true, table });
        }
        for k in 1..=9 {
            if pattern == gpt4_style_pattern(k) {
                return Ok(Splitter::Gpt4 { max_digits: k, ws_to_end: false, table });
            }
        }
        fancy_regex::Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| format!("split pattern does not compile: {e}"))
    }

    pub fn is_fast(&self) -> bool {
        matches!(self, Splitter::Gpt4 { .. })
    }

    /// `text` cut into pieces of about `target` bytes at places where a chunk always ends, so
    /// encoding the pieces separately gives the same ids as the whole. A cut goes right after a
    /// "\n" that is followed by a non-space: no alternative of the GPT-4-style patterns
    /// crosses it (whitespace runs and the `[\r\n]*` tail stop at a non-space, and the letter
    /// alternative never contains "\n"), and a whitespace run ending in "\n" is one chunk
    /// either way (`\s*[\r\n]`, or cl100k's `\s++$` at a piece's end). Other patterns (and
    /// short texts) give the text whole. Always at least one piece.
    pub fn safe_pieces<'a>(&self, text: &'a str, target: usize) -> Vec<&'a str> {
        let Splitter::Gpt4 { table, .. } = self else { return vec![text] };
        if text.len() <= 2 * target {
            return vec![text];
        }
        let b = text.as_bytes();
        let mut out = Vec::with_capacity(b.len() / target + 1);
        let mut start = 0;
        'cuts: while start + target < b.len() {
            let mut j = start + target;
            loop {
                let Some(k) = b[j..].iter().position(|&x| x == b'\n') else { break 'cuts };
                let p = j + k + 1;
                if p >= b.len() {
                    break 'cuts;
                }
                let (c, _) = decode_at(b, p);
                if class_of(table, c) & SPACE == 0 {
                    // SAFETY: p follows an ASCII byte, so it is a char boundary.
                    out.push(unsafe { text.get_unchecked(start..p) });
                    start = p;
                    continue 'cuts;
                }
                j = p;
            }
        }
        out.push(&text[start..]);
        out
    }

    /// Calls `f` on each chunk of `text`, in order. Chunks cover the text exactly.
    #[inline]
    pub fn for_each_chunk<'a, F: FnMut(&'a str)>(&self, text: &'a str, mut f: F) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits, ws_to_end, table } => {
                let b = text.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    let end = gpt4_chunk_end(table, b, i, *max_digits, *ws_to_end);
                    // SAFETY: chunk ends always fall on char boundaries (the scanner steps by
                    // whole UTF-8 sequences).
                    f(unsafe { text.get_unchecked(i..end) });
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on input: {e}"))?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }
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

#[inline(always)]
fn is_punct(cls: u8) -> bool {
    cls == 0
}

/// End (exclusive byte offset) of the chunk that starts at `i`, following the alternatives of
/// the GPT-4-style pattern in order (leftmost-first, as the regex engines do).
#[inline(always)]
fn gpt4_chunk_end(t: &[u8], b: &[u8], i: usize, max_digits: usize, ws_to_end: bool) -> usize {
    let n = b.len();
    let (c0, l0) = decode_at(b, i);
    let k0 = class_of(t, c0);

    // '(?i:[sdmt]|ll|ve|re)
    if c0 == '\'' as u32 && i + 1 < n {
        let (c1, l1) = decode_at(b, i + 1);
        let f1 = fold(c1);
        if f1 == 's' as u32 || f1 == 'd' as u32 || f1 == 'm' as u32 || f1 == 't' as u32 {
            return i + 1 + l1;
        }
        if (f1 == 'l' as u32 || f1 == 'v' as u32 || f1 == 'r' as u32) && i + 1 + l1 < n {
            let (c2, l2) = decode_at(b, i + 1 + l1);
            let f2 = fold(c2);
            if (f1 == 'l' as u32 && f2 == 'l' as u32) || (f1 != 'l' as u32 && f2 == 'e' as u32) {
                return i + 1 + l1 + l2;
            }
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
            if !is_punct(class_of(t, c)) {
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
        if is_punct(class_of(t, c1)) {
            return scan_punct_tail(i + 1 + l1);
        }
    }
    if is_punct(k0) {
        return scan_punct_tail(i + l0);
    }

    // c0 is whitespace: measure the maximal whitespace run.
    debug_assert!(k0 & SPACE != 0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &Splitter, text: &str) -> Vec<String> {
        let mut v = Vec::new();
        s.for_each_chunk(text, |c| v.push(c.to_string())).unwrap();
        v
    }

    #[test]
    fn fast_equals_regex_on_tricky_strings() {
        let cases = [
            "Hello world, it's   a test!\n\n  x 12345 'LL 'Ve \u{17f}'ſ",
            "  \n\t \r\n  end   ",
            "中文 text，标点。 ١٢٣ ½ 😀😀 !!\n\n",
            "a'b 'sx 're're' '  ' \t'\n",
            "   ",
            "\n",
            "x  ",
            " !\r\n\r\n?a",
        ];
        for (name, pat) in [("ours", default_pattern()), ("cl100k", CL100K_PATTERN.to_string())] {
            let fast = Splitter::new(&pat).unwrap();
            assert!(fast.is_fast(), "{name} should use the fast scanner");
            let slow = Splitter::Regex(fancy_regex::Regex::new(&pat).unwrap());
            for c in cases {
                assert_eq!(split(&fast, c), split(&slow, c), "{name} on {c:?}");
            }
        }
    }

    #[test]
    fn safe_pieces_split_only_at_chunk_ends() {
        let mut text = String::new();
        for i in 0..3000 {
            let next = ["中文", "x", "12 apples", "(paren)", "'ll", "  indented", "!!"][i % 7];
            text.push_str(&format!("line {i}  with  words'll\n \n\t{next}\n"));
        }
        for pat in [default_pattern(), CL100K_PATTERN.to_string()] {
            let s = Splitter::new(&pat).unwrap();
            let pieces = s.safe_pieces(&text, 1000);
            assert!(pieces.len() > 10);
            assert_eq!(pieces.concat(), text);
            let whole = split(&s, &text);
            let parts: Vec<String> = pieces.iter().flat_map(|p| split(&s, p)).collect();
            assert_eq!(parts, whole);
        }
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
