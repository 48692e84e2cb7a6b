//! Pre-splitting text into chunks before BPE.
//!
//! The GPT-4 family of patterns (ours, nanochat's with `\p{N}{1,k}` at 48abd7d and 92d63d4, and
//! cl100k's) and o200k's are matched by hand-written scanners that give exactly the regex's
//! leftmost-first matches; they are several times faster than a backtracking regex (most of
//! tiktoken's encode time) and need no backtracking stack, whatever the input. Any other pattern
//! goes through `fancy-regex`, the engine tiktoken uses, so semantics never differ; a pattern
//! that can match the empty string is refused (an empty chunk has no BPE encoding).

mod gpt4;
mod o200k;
mod steps;

use crate::unicode::{class_of, classes, decode_at, SPACE};
use fancy_regex::Expr;

/// nanochat's split pattern (`SPLIT_PATTERN` in nanochat/tokenizer.py, the same at 48abd7d and
/// 92d63d4) with `{k}` standing for the digit-group length (2 in the default).
fn gpt4_style_pattern(max_digits: usize) -> String {
    format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{max_digits}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    )
}

/// The default split pattern, nanochat's (48abd7d, 92d63d4): GPT-4's, with digits grouped 1-2 instead of 1-3
/// (docs/design.md, "Split pattern").
pub fn default_pattern() -> String {
    gpt4_style_pattern(2)
}

pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// GPT-4o's (o200k_base) pattern, as tiktoken and bpe-openai spell it.
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

pub enum Splitter {
    /// Hand-written scanner for GPT-4-style patterns.
    Gpt4 {
        max_digits: usize,
        /// cl100k's `\s++$`: trailing whitespace at the end of the text is one chunk.
        ws_to_end: bool,
        table: &'static [u8],
    },
    /// Hand-written scanner for o200k's pattern.
    O200k { table: &'static [u8] },
    /// Any other pattern.
    Regex(fancy_regex::Regex),
}

/// The fewest chars a match of `e` can span (0 if it may be empty, or if unsure).
fn min_chars(e: &Expr) -> usize {
    match e {
        Expr::Any { .. } => 1,
        Expr::Literal { val, .. } => val.chars().count(),
        // Everything before a `\K` is left out of the match.
        Expr::Concat(es) => {
            let kept = es.iter().rposition(|x| matches!(x, Expr::KeepOut)).map_or(0, |k| k + 1);
            es[kept..].iter().map(min_chars).fold(0, usize::saturating_add)
        }
        Expr::Alt(es) => es.iter().map(min_chars).min().unwrap_or(0),
        Expr::Group(x) | Expr::AtomicGroup(x) => min_chars(x),
        Expr::Repeat { child, lo, .. } => min_chars(child).saturating_mul(*lo),
        Expr::Delegate { size, .. } => *size,
        Expr::Conditional { condition, true_branch, false_branch } => {
            (min_chars(condition).saturating_add(min_chars(true_branch))).min(min_chars(false_branch))
        }
        // Empty, assertions, lookarounds, backreferences (the group may be empty), \G, ...
        _ => 0,
    }
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        let table = classes();
        if pattern == CL100K_PATTERN {
            return Ok(Splitter::Gpt4 { max_digits: 3, ws_to_end: true, table });
        }
        if pattern == O200K_PATTERN {
            return Ok(Splitter::O200k { table });
        }
        for k in 1..=9 {
            if pattern == gpt4_style_pattern(k) {
                return Ok(Splitter::Gpt4 { max_digits: k, ws_to_end: false, table });
            }
        }
        let re = fancy_regex::Regex::new(pattern).map_err(|e| format!("split pattern does not compile: {e}"))?;
        let tree = Expr::parse_tree(pattern).map_err(|e| format!("split pattern does not compile: {e}"))?;
        if min_chars(&tree.expr) == 0 {
            return Err(format!(
                "split pattern {pattern:?} can match the empty string; every alternative must match at least one character"
            ));
        }
        Ok(Splitter::Regex(re))
    }

    pub fn is_fast(&self) -> bool {
        !matches!(self, Splitter::Regex(_))
    }

    /// `text` cut into pieces of about `target` bytes at places where a chunk always ends, so
    /// encoding the pieces separately gives the same ids as the whole. A cut goes right after a
    /// "\n" that is followed by a non-space: no alternative of the GPT-4-style patterns
    /// crosses it (whitespace runs and the `[\r\n]*` tail stop at a non-space, and the letter
    /// alternative never contains "\n"), and a whitespace run ending in "\n" is one chunk
    /// either way (`\s*[\r\n]`, or cl100k's `\s++$` at a piece's end). o200k's punctuation
    /// tail `[\r\n/]*` also runs on over "/", so there the char after the cut must not be "/".
    /// Other patterns (and short texts) give the text whole. Always at least one piece.
    pub fn safe_pieces<'a>(&self, text: &'a str, target: usize) -> Vec<&'a str> {
        let (table, slash_continues) = match self {
            Splitter::Gpt4 { table, .. } => (table, false),
            Splitter::O200k { table } => (table, true),
            Splitter::Regex(_) => return vec![text],
        };
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
                if class_of(table, c) & SPACE == 0 && !(slash_continues && c == '/' as u32) {
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
                    let end = gpt4::chunk_end(table, b, i, *max_digits, *ws_to_end);
                    // SAFETY: chunk ends always fall on char boundaries (the scanner steps by
                    // whole UTF-8 sequences).
                    f(unsafe { text.get_unchecked(i..end) });
                    i = end;
                }
                Ok(())
            }
            Splitter::O200k { table } => {
                let b = text.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    let end = o200k::chunk_end(table, b, i);
                    // SAFETY: as above.
                    f(unsafe { text.get_unchecked(i..end) });
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on input: {e}"))?;
                    // Patterns that can match empty are refused in `new`; should one slip
                    // through, an empty match carries no text and BPE must never see it.
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }
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
            "HELLO World's CamelCase iPhone ÉTÉ été DŽungla ǅx 'S'LL'ʼ",
            "e\u{301}cole \u{301}\u{301}A\u{301}a 中A中A 中Ab ΑΒΓαβγ ᾈᾀ ˆˆa",
            "!\n/x //\n\n/ a/b !?/\r\n/ \t\u{301}x 😀ABC 😀abc",
            "x'sY'T  'Ve\u{3000}'re\n\n\t1234567 ١٢٣٤",
        ];
        let pats =
            [("ours", default_pattern()), ("cl100k", CL100K_PATTERN.to_string()), ("o200k", O200K_PATTERN.to_string())];
        for (name, pat) in pats {
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
            let next = ["中文", "x", "12 apples", "(paren)", "'ll", "  indented", "!!", "/slash", "!/"][i % 9];
            // "{next}" right after "!\n" too: o200k's "!\n/" is one chunk, so no cut before "/".
            text.push_str(&format!("line {i}  with  words'll!\n{next}\n \n\t{next}\n"));
        }
        for pat in [default_pattern(), CL100K_PATTERN.to_string(), O200K_PATTERN.to_string()] {
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

    #[test]
    fn patterns_that_can_match_empty_are_refused() {
        for pat in ["x*", r"\b", "", "a|", "(?:ab)?", r"(?=a)", r"a\K", r"(a?)\1", "a{0}", r"\s*$"] {
            let e = Splitter::new(pat).err().unwrap_or_else(|| panic!("{pat:?} accepted"));
            assert!(e.contains("empty string"), "{pat:?}: {e}");
        }
        for pat in ["x+", r"\w+|\s", r"a(?=b)", r"(?>a|ab)c?", r"\p{L}{2,3}", r"(a)\1"] {
            assert!(Splitter::new(pat).is_ok(), "{pat:?} refused");
        }
    }

    #[test]
    fn long_runs_split_without_a_backtracking_limit() {
        let s = Splitter::new(O200K_PATTERN).unwrap();
        for unit in [" ", "a", "A", "7", "!", "中", "\u{301}", " \n", "aA"] {
            let text = unit.repeat(1 << 20);
            let chunks = split(&s, &text);
            assert_eq!(chunks.concat(), text);
            // Checked against the regex on a prefix small enough for its stack.
            let head = &text[..unit.len() * 3000];
            let slow = Splitter::Regex(fancy_regex::Regex::new(O200K_PATTERN).unwrap());
            assert_eq!(split(&s, head), split(&slow, head), "{unit:?}");
        }
    }
}
