"""Every input the tokenizer can be given: split patterns (empty matches, o200k's lookahead),
text (lone surrogates, long runs of one character) and sizes (vocab_size, ranks), checked
against tiktoken on fresh random inputs."""

import base64
import json
import random
import subprocess
import sys
import textwrap

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ref_bpe import split_chunks
from rustchat import SPLIT_PATTERN, Tokenizer
from rustchat.tokenizer import MAX_VOCAB

BYTES = {bytes([b]): b for b in range(256)}


def _ref(tok: Tokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="ref", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(), special_tokens={})


def _replaced(text: str) -> str:
    """What tiktoken's encode does to a str with lone surrogates before encoding it."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@pytest.fixture(scope="module")
def encodings(corpus):
    """(ours, tiktoken) pairs: GPT-4o's and GPT-4's vocabularies, and vocabularies trained
    here with our default pattern and with o200k's (so training splits with both scanners)."""
    bpe_openai = pytest.importorskip("bpe_openai")
    out = {}
    for name in ("cl100k_base", "o200k_base"):
        e = bpe_openai.get_encoding(name)
        out[name] = Tokenizer.from_ranks(e._mergeable_ranks, e._pat_str, {})
    docs = corpus["code"][:200_000].split("\n\n") + ["中文字 ÉTÉ été e\u0301cole 'S 'll /x //", "١٢٣ 12345 \u3000\t\n"]
    out["trained_default"] = Tokenizer.train(docs, vocab_size=1200)
    out["trained_o200k"] = Tokenizer.train(docs, vocab_size=1200, pattern=out["o200k_base"].pattern)
    return {name: (tok, _ref(tok)) for name, tok in out.items()}


# ------------------------------------------------------------------ split patterns
# (pattern piece, whether it can match the empty string)
PIECES = [
    ("a", False),
    ("a*", True),
    ("a+", False),
    (r"\b", True),
    ("(?:ab)?", True),
    (r"\s+(?!\S)", False),
    ("(?=x)", True),
    ("[0-9]{0,2}", True),
    ("[0-9]{1,2}", False),
    (r"\p{L}+", False),
    ("", True),
    ("x?y", False),
    (r"(?:\s|z)*?", True),
    ("(?>q|qq)", False),
    (r"\s*[\r\n]", False),
    ("(?<=a)", True),
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3), min_size=1, max_size=4),
    st.text(alphabet="axyzqab019 \n\t中", max_size=40),
)
def test_patterns_that_can_match_empty_are_refused(alternatives, text):
    pattern = "|".join("".join(p for p, _ in alt) for alt in alternatives)
    can_be_empty = any(all(empty for _, empty in alt) for alt in alternatives)
    if can_be_empty:
        with pytest.raises(ValueError, match="can match the empty string"):
            Tokenizer.from_ranks(BYTES, pattern, {})
        with pytest.raises(ValueError, match="can match the empty string"):
            Tokenizer.train(["abc"], vocab_size=300, pattern=pattern, special_tokens=[])
    else:
        # Checked against the `regex` package: tiktoken's own engine has bugs on such patterns
        # (it finds "a" in "a" with "a+a*a+").
        tok = Tokenizer.from_ranks(BYTES, pattern, {})
        chunks = split_chunks(text, pattern)
        assert tok.split(text) == chunks
        assert tok.encode_ordinary(text) == list("".join(chunks).encode())


@pytest.mark.parametrize("pattern", ["x*", r"\b", "", "|a", r"(?=a)", "a?"])
def test_reported_empty_patterns_are_a_value_error(pattern):
    with pytest.raises(ValueError, match="can match the empty string"):
        Tokenizer.from_ranks(BYTES, pattern, {})


# ------------------------------------------------------------------ long runs and mixed text
# Units that stress every alternative of the patterns: cased letters (Lu, Ll, Lt, Lm, Lo),
# combining marks, contractions, digits of several scripts, punctuation with o200k's "/" and
# newline tails, every kind of whitespace.
UNITS = [
    "a",
    "A",
    "é",
    "É",
    "ǅ",
    "ʰ",
    "中",
    "ж",
    "Ж",
    "\u0301",
    "'s",
    "'LL",
    "'Ve",
    "'",
    "7",
    "٣",
    "½",
    "!",
    "/",
    "?!",
    "😀",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\u3000",
    "\u00a0",
    " /",
    "!\n/",
]
runs = st.lists(st.tuples(st.sampled_from(UNITS), st.integers(1, 400)), max_size=8).map(
    lambda rs: "".join(u * n for u, n in rs)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs)
def test_runs_and_mixtures_match_tiktoken(encodings, text):
    for name, (tok, ref) in encodings.items():
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text), name
        # Chunks too: BPE can hide a wrong cut (both sides of it may merge the same way).
        assert tok.split(text) == split_chunks(text, tok.pattern), name


def _long_run(chars: str) -> str:
    c = random.choice(chars)
    return c * ((1 << 20) // len(c.encode()))


@pytest.mark.parametrize("chars", ["aAé中Ж", " \t\n\u3000", "0123456789٣"], ids=["letters", "spaces", "digits"])
def test_megabyte_runs_of_one_character(encodings, chars):
    """A megabyte of one character: one encoding picked at random per run (each takes seconds)."""
    text = _long_run(chars)
    name = random.choice(sorted(encodings))
    tok, ref = encodings[name]
    got = tok.encode_ordinary(text)
    assert tok.decode(got) == text
    try:
        want = ref.encode_ordinary(text)
    except BaseException as e:  # tiktoken panics (its regex's backtracking stack overflows)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        # It does so on long whitespace with o200k's pattern, which takes such a run whole.
        assert tok.split(text) == [text], name
        want = ref._encode_single_piece(text.encode())
    assert got == want, name


def test_megabyte_runs_split_in_batches_too(encodings):
    tok, ref = encodings["o200k_base"]
    # The last is cut into pieces at newlines, never before a "/" (o200k's "/\n/" is one chunk).
    docs = [_long_run("aZ中"), "x", _long_run("0123456789"), ("ab /\n/c !\nd\n" * 30_000)]
    assert tok.encode_batch(docs, num_threads=2) == [ref.encode_ordinary(d) for d in docs]


# ------------------------------------------------------------------ lone surrogates
surrogate_text = st.lists(
    st.one_of(st.characters(categories=["Cs"]), st.sampled_from(UNITS), st.sampled_from(["\ud83d\ude00", "x"])),
    max_size=30,
).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(surrogate_text, min_size=1, max_size=6))
def test_lone_surrogates_are_replaced_alike_on_every_path(encodings, texts):
    before = list(texts)
    for name, (tok, ref) in encodings.items():
        want = [ref.encode_ordinary(t) for t in texts]
        assert [tok.encode_ordinary(t) for t in texts] == want, name
        assert [tok.encode(t) for t in texts] == want, name
        assert [tok.encode_to_numpy(t).tolist() for t in texts] == want, name
        for threads in (1, 2):
            assert tok.encode_batch(texts, num_threads=threads) == want, name
            ids, offs = tok.encode_batch_numpy(texts, num_threads=threads)
            assert [ids[a:b].tolist() for a, b in zip(offs[:-1], offs[1:])] == want, name
        assert [tok.split(t) for t in texts] == [tok.split(_replaced(t)) for t in texts], name
    assert texts == before  # the caller's list is left alone


@pytest.mark.filterwarnings("ignore:the corpus supports only")
@settings(max_examples=15, deadline=None)
@given(st.lists(surrogate_text, min_size=1, max_size=6))
def test_training_treats_lone_surrogates_like_encoding(texts):
    got = Tokenizer.train(texts, vocab_size=320, special_tokens=[], doc_cap=None)
    want = Tokenizer.train([_replaced(t) for t in texts], vocab_size=320, special_tokens=[], doc_cap=None)
    assert got.mergeable_ranks() == want.mergeable_ranks()


def test_tok_train_survives_a_document_with_a_lone_surrogate(tmp_path):
    from rustchat.cli import main

    rows = [{"text": "hello world " * 20}, {"text": "lone \ud800 surrogate " * 5}, {"text": "more text here"}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "tok"
    with pytest.warns(UserWarning, match="only"):
        rc = main(["tok", "train", "--input", str(src), "--out", str(out), "--vocab-size", "400", "--quiet"])
    assert rc in (0, None)
    tok = Tokenizer.load(out)
    assert tok.decode(tok.encode("lone \ud800 surrogate")) == "lone \ufffd surrogate"


# ------------------------------------------------------------------ absurd sizes
@settings(max_examples=30, deadline=None)
@given(st.integers(MAX_VOCAB, 2**64))
def test_ids_past_the_limit_are_refused(n):
    with pytest.raises(ValueError, match="too large"):
        Tokenizer.from_ranks({**BYTES, b"ab": n}, SPLIT_PATTERN, {})
    with pytest.raises(ValueError, match="too large"):
        Tokenizer.from_ranks(BYTES, SPLIT_PATTERN, {"<|x|>": n})
    with pytest.raises(ValueError, match="too large"):
        Tokenizer.train(["abc"], vocab_size=n + 1)


def test_the_largest_allowed_id_still_loads():
    tok = Tokenizer.from_ranks({**BYTES, b"ab": MAX_VOCAB - 1}, SPLIT_PATTERN, {})
    # (encode_to_numpy: a list would first make one Python int per id, 16M of them)
    assert tok.vocab_size == MAX_VOCAB and tok.encode_to_numpy("ab").tolist() == [MAX_VOCAB - 1]


def test_absurd_sizes_are_refused_before_allocating(tmp_path):
    """Under a 4 GiB address-space limit (tens of GB were asked for before), every way in
    raises ValueError instead of aborting."""
    d = tmp_path / "tok"
    Tokenizer.from_ranks(BYTES, SPLIT_PATTERN, {}).save(d)
    with open(d / "ranks.tiktoken", "a") as f:
        f.write(f"{base64.b64encode(b'ab').decode()} 2147483647\n")
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from rustchat import Tokenizer, _core
        calls = [
            lambda: Tokenizer.train(["abc abd"], vocab_size=2**40),
            lambda: Tokenizer.load({str(d)!r}),
            lambda: _core.CoreTokenizer([(bytes([b]), b) for b in range(256)] + [(b"ab", 2**31 - 1)], "a+|[^a]", []),
            lambda: _core.BpeTrainer("a+|[^a]").learn(2**40),
        ]
        for i, call in enumerate(calls):
            try:
                call()
                print("accepted", i)
            except ValueError as e:
                assert "too large" in str(e) or "too many" in str(e), e
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


def _process_threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_num_threads_is_capped_at_the_cores_and_must_be_positive():
    """A caller asking for a million threads gets at most one per core (it once started 15,000+
    OS threads); zero or a negative count is a one-line ValueError on every batch path."""
    import os

    from rustchat.conversation import render_batch

    rng = random.Random()
    tok = Tokenizer.train(["".join(rng.choice("abc de\n") for _ in range(2000))], 300)
    texts = ["".join(rng.choice("abcde fg") for _ in range(rng.randrange(1, 80))) for _ in range(64)]
    conv = [
        {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]} for t in texts[:8]
    ]
    want = tok.encode_batch(texts, num_threads=1)
    before = _process_threads()
    cores = os.cpu_count()
    # 64 first: an uncapped pool would show here as 64 new threads (and a million would hang).
    for n in (64, cores + 1, 10**6, 2**62):
        assert tok.encode_batch(texts, num_threads=n) == want
        ids, offs = tok.encode_batch_numpy(texts, num_threads=n)
        assert [ids[a:b].tolist() for a, b in zip(offs[:-1], offs[1:])] == want
        list(render_batch(tok, conv, num_threads=n))
        # At most one pool per thread count up to the cores: never more threads than that.
        assert _process_threads() - before <= cores * (cores + 1) // 2, (
            f"num_threads={n} started more threads than cores"
        )
    for n in (0, -1, -(10**9)):
        with pytest.raises(ValueError, match="num_threads must be a positive int"):
            tok.encode_batch(texts, num_threads=n)
        with pytest.raises(ValueError, match="num_threads must be a positive int"):
            tok.encode_batch_numpy(texts, num_threads=n)
        with pytest.raises(ValueError, match="num_threads must be a positive int"):
            list(render_batch(tok, conv, num_threads=n))
