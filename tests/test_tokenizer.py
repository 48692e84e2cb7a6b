"""Tokenizer behaviour against independent references: a plain-Python trainer (ref_bpe.py) and
tiktoken built from the same ranks and pattern."""

import gc
import random
import sys
import threading

import numpy as np
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rustchat
from rustchat import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from rustchat._core import CL100K_PATTERN
from ref_bpe import split_chunks, train_reference

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that stresses the split pattern: contractions, CRLF, runs of spaces and digits, CJK, emoji.
tricky_chars = st.sampled_from(
    list("aAbzZ sS'ſ\t\r\n0123456789٣½.,!?-_\"()[]{}#@中文字é😀🎉\u3000\u00a0\u2028")
    + ["'s", "'LL", "'ve", "  ", "\r\n"]
)
tricky_text = st.lists(tricky_chars, max_size=60).map("".join)
# Code points assigned in this Python's Unicode database (hypothesis reads categories from it).
# Characters assigned only in newer Unicode versions are letters to one engine and unassigned to
# another (the `regex` package, regex-syntax and tiktoken's build each carry their own tables),
# so they have no single right answer to test against.
assigned_text = st.text(alphabet=st.characters(exclude_categories=("Cn", "Cs")), max_size=200)
any_text = st.one_of(assigned_text, tricky_text)


def _tiktoken(tok: Tokenizer, name: str = "ref") -> tiktoken.Encoding:
    return tiktoken.Encoding(name=name, pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(), special_tokens={})


# ------------------------------------------------------------------ vocabularies under test
@pytest.fixture(scope="session")
def trained(corpus):
    texts = [t for text in corpus.values() for t in text.split("\n\n")]
    return Tokenizer.train(texts, vocab_size=3000)


@pytest.fixture(scope="session")
def openai_encodings():
    bpe_openai = pytest.importorskip("bpe_openai")
    out = {}
    for name in ("cl100k_base", "o200k_base"):
        e = bpe_openai.get_encoding(name)
        out[name] = (Tokenizer.from_ranks(e._mergeable_ranks, e._pat_str, e._special_tokens), e)
    return out


# ------------------------------------------------------------------ training
TRAIN_CORPORA = {
    "ties": ["ab ab cd cd ef ef", "xy xy zw zw"],
    "emoji_cjk": ["😀😀 😀🎉 🎉🎉 中文中文 字字 中文字", "naïve café 😀 中文"],
    "spaces_digits": ["a" + " " * 40 + "b", "1234567890 " * 5, "\n\n\n   \t\t x  y   z", "99 999 9999 0.5"],
    "mixed": ["The cat's hat. It's the cat's!", "We'll see: they've 3 cats, 42 dogs & 7 birds."] * 3,
}


@pytest.mark.parametrize("name", sorted(TRAIN_CORPORA))
def test_training_matches_reference_trainer(name):
    texts = TRAIN_CORPORA[name]
    n_merges = 60
    expected = train_reference(texts, n_merges, SPLIT_PATTERN)
    tok = Tokenizer.train(texts, vocab_size=256 + len(expected) + len(SPECIAL_TOKENS))
    ranks = tok.mergeable_ranks()
    got = [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256]
    assert got == expected


@pytest.mark.filterwarnings("ignore:the corpus supports only")
@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(list("aab b cd中😀 1 2\n'")), max_size=40).map("".join), min_size=1, max_size=8)
)
def test_training_matches_reference_on_random_corpora(texts):
    expected = train_reference(texts, 40, SPLIT_PATTERN)
    tok = Tokenizer.train(texts, vocab_size=256 + 40, special_tokens=[])
    got = [t for t, r in sorted(tok.mergeable_ranks().items(), key=lambda kv: kv[1]) if r >= 256]
    assert got == expected[: len(got)] and len(got) == len(expected)


def test_training_is_deterministic_and_batch_independent(corpus):
    texts = corpus["code"][:150_000].split("\n")
    a = Tokenizer.train(texts, vocab_size=700).mergeable_ranks()
    b = Tokenizer.train(iter(texts), vocab_size=700).mergeable_ranks()
    assert a == b


def test_doc_cap_and_max_chars():
    texts = ["abcabc" * 10, "xyxy" * 10]
    capped = Tokenizer.train(texts, vocab_size=256 + 5 + 9, doc_cap=6)
    expected = train_reference(texts, 5, SPLIT_PATTERN, doc_cap=6)
    got = [t for t, r in sorted(capped.mergeable_ranks().items(), key=lambda kv: kv[1]) if r >= 256]
    assert got == expected
    # max_chars stops after the first document: nothing of "xy" is learned.
    only_first = Tokenizer.train(texts, vocab_size=256 + 3 + 9, max_chars=60, doc_cap=None)
    assert all(b"x" not in t for t in only_first.mergeable_ranks() if len(t) > 1)


def test_special_tokens_follow_the_merges(trained):
    assert trained.vocab_size == 3000
    specials = trained.special_tokens
    assert list(specials) == SPECIAL_TOKENS
    assert list(specials.values()) == list(range(3000 - 9, 3000))
    assert trained.bos_token_id == 3000 - 9
    assert trained.encode_special("<|assistant_end|>") == 3000 - 5
    ranks = trained.mergeable_ranks()
    assert sorted(ranks.values()) == list(range(3000 - 9))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_train_rejects_bad_input():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.train(["abc"], vocab_size=300, pattern="(unclosed")
    with pytest.raises(TypeError, match="item 1 is int"):
        Tokenizer.train(["abc", 5], vocab_size=300)
    with pytest.raises(TypeError, match="single string"):
        Tokenizer.train("abc", vocab_size=300)
    with pytest.raises(ValueError, match="unique"):
        Tokenizer.train(["abc"], vocab_size=300, special_tokens=["<|a|>", "<|a|>"])
    with pytest.warns(UserWarning, match="only"):
        small = Tokenizer.train(["ab"], vocab_size=300, special_tokens=["<|bos|>"])
    assert small.vocab_size == 258 and small.bos_token_id == 257


# ------------------------------------------------------------------ identical ids to tiktoken
def test_fast_splitter_is_used_for_known_patterns(openai_encodings, trained):
    assert trained._core.fast_split
    assert openai_encodings["cl100k_base"][0]._core.fast_split
    assert openai_encodings["o200k_base"][0]._core.fast_split


@pytest.mark.parametrize("kind", ["en", "zh", "code"])
def test_matches_tiktoken_on_real_text_trained(trained, corpus, kind):
    if kind not in corpus:
        pytest.skip(f"no {kind} corpus (set RUSTCHAT_TEST_CORPUS)")
    ref = _tiktoken(trained)
    text = corpus[kind]
    assert trained.encode_ordinary(text) == ref.encode_ordinary(text)
    docs = text.split("\n\n")[:500]
    assert trained.encode_batch(docs) == ref.encode_ordinary_batch(docs)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_matches_tiktoken_on_real_text_openai(openai_encodings, corpus, name):
    tok, ref = openai_encodings[name]
    for text in corpus.values():
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


@HYP
@given(any_text)
def test_matches_tiktoken_random_unicode_trained(trained, text):
    assert trained.encode_ordinary(text) == _ref_trained(trained).encode_ordinary(text)


_REF_CACHE = {}


def _ref_trained(tok):
    if id(tok) not in _REF_CACHE:
        _REF_CACHE[id(tok)] = _tiktoken(tok)
    return _REF_CACHE[id(tok)]


@HYP
@given(any_text)
def test_matches_tiktoken_random_unicode_openai(openai_encodings, text):
    for tok, ref in openai_encodings.values():
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


@HYP
@given(any_text)
def test_fast_split_matches_regex_engine(text):
    """The hand-written scanner cuts text exactly where an independent regex engine does."""
    for pattern in (SPLIT_PATTERN, CL100K_PATTERN):
        tok = Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, pattern, {})
        assert tok._core.fast_split
        assert tok.split(text) == split_chunks(text, pattern)


def test_long_chunks_use_heap_merge_correctly(openai_encodings, trained):
    rnd = random.Random()
    for tok, ref in [*openai_encodings.values(), (trained, _ref_trained(trained))]:
        for text in [
            " " * 5000,
            "a" * 3000,
            "中文字" * 400,
            "!?" * 700,
            "".join(rnd.choice("ab") for _ in range(2000)),
        ]:
            assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


# ------------------------------------------------------------------ round trips and API
@HYP
@given(st.text(max_size=300))  # every code point, unassigned ones too: round trips must hold regardless
def test_decode_encode_roundtrip(trained, text):
    ids = trained.encode_ordinary(text)
    assert trained.decode(ids) == text
    assert trained.decode_bytes(np.array(ids)) == text.encode("utf-8")


def test_specials_are_never_parsed_from_text(trained):
    text = "<|bos|>hi<|assistant_end|>"
    ids = trained.encode(text)
    assert not set(ids) & set(trained.special_tokens.values())
    assert trained.decode(ids) == text
    wrapped = trained.encode("hi", prepend="<|bos|>", append=trained.encode_special("<|assistant_end|>"))
    assert wrapped[0] == trained.bos_token_id and wrapped[-1] == trained.encode_special("<|assistant_end|>")
    assert trained.decode(wrapped) == "<|bos|>hi<|assistant_end|>"


def test_encode_batch_matches_single_and_threads(trained, corpus):
    docs = corpus["code"].split("\n\n")[:300]
    single = [trained.encode_ordinary(d) for d in docs]
    assert trained.encode_batch(docs) == single
    assert trained.encode_batch(docs, num_threads=1) == single
    assert trained.encode_batch(docs, num_threads=3) == single
    ids, offs = trained.encode_batch_numpy(docs, prepend="<|bos|>")
    assert ids.dtype == np.int32 and offs[-1] == len(ids) and len(offs) == len(docs) + 1
    assert ids[offs[5] : offs[6]].tolist() == [trained.bos_token_id] + single[5]
    assert trained.encode_batch(docs[:3], append="<|bos|>")[2][-1] == trained.bos_token_id
    # One thread takes its own path (no pieces or runs): same ids and offsets.
    ids1, offs1 = trained.encode_batch_numpy(docs, prepend="<|bos|>", append="<|bos|>", num_threads=1)
    idsn, offsn = trained.encode_batch_numpy(docs, prepend="<|bos|>", append="<|bos|>", num_threads=2)
    assert ids1.tolist() == idsn.tolist() and offs1.tolist() == offsn.tolist()
    assert ids1[offs1[7] : offs1[8]].tolist() == [trained.bos_token_id] + single[7] + [trained.bos_token_id]


def test_encode_batch_releases_the_gil(trained, corpus):
    """Another Python thread keeps running while a large batch is encoded."""
    docs = corpus["code"].split("\n") * 20
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)

    t = threading.Thread(target=spin)
    t.start()
    before = len(ticks)
    trained.encode_batch_numpy(docs)
    during = len(ticks) - before
    stop.set()
    t.join()
    assert during > 100


def test_batch_lists_hold_exact_references(trained, corpus):
    """encode_batch lists share one int object per id and take references in bulk: after the
    lists are gone, every int's reference count is back where it was, on every path (one
    thread, several, prepend/append, documents cut into pieces)."""
    rng = random.Random()
    # Whatever kinds of text this machine's corpus has (stdlib code at least), plus CJK.
    paras = [p for text in corpus.values() for p in text.split("\n\n")] + ["中文段落，带标点。" * 5, "日本語のテキスト"]
    docs = [rng.choice(paras) for _ in range(400)] + ["", rng.choice(paras) * 800]
    rng.shuffle(docs)
    single = [trained.encode_ordinary(d) for d in docs]
    ids = sorted({i for d in single for i in d})
    probe = [i for i in ids if i > 256][:50]
    objs = {i: trained.encode_batch([trained.decode([i])])[0] for i in probe}
    objs = {i: l[0] for i, l in objs.items() if l == [i]}
    assert len(objs) > 10

    # Counts are kept in lists: a dict keyed by these ints would hold references of its own.
    def counts():
        return [sys.getrefcount(o) for o in objs.values()]

    base = counts()
    bos = trained.bos_token_id
    for threads in (1, 2, 3, None):
        for pre, post in ((None, None), ("<|bos|>", None), (None, bos)):
            want = [([bos] if pre else []) + d + ([bos] if post else []) for d in single]
            before = counts()
            got = trained.encode_batch(docs, num_threads=threads, prepend=pre, append=post)
            assert got == want
            held = [sum(row.count(i) for row in got) for i in objs]
            assert counts() == [b + h for b, h in zip(before, held)]
            assert all(x is objs[x] for row in got for x in row if x in objs)
            del got
            assert counts() == before
            del want
    gc.collect()
    assert counts() == base


def test_batch_from_several_python_threads(trained, corpus):
    """Worker threads take the GIL to build lists; concurrent callers must not deadlock or mix
    up results."""
    paras = corpus["code"].split("\n\n")
    batches = [paras[k::4] * 3 for k in range(4)]
    want = [[trained.encode_ordinary(d) for d in b] for b in batches]
    got = [None] * 4

    def run(k):
        got[k] = trained.encode_batch(batches[k], num_threads=2)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_invalid_ids_raise_value_error(trained):
    with pytest.raises(ValueError, match="invalid token id 3000 at position 1"):
        trained.decode([1, 3000])
    with pytest.raises(ValueError, match="invalid token id -1"):
        trained.decode([-1])
    with pytest.raises(ValueError, match="integers"):
        trained.decode([1.5])
    with pytest.raises(ValueError):
        trained.decode([2**40])
    assert trained.decode([]) == ""


def test_token_bytes(trained):
    tb = trained.token_bytes()
    assert tb.dtype == np.int32 and len(tb) == trained.vocab_size
    ranks = trained.mergeable_ranks()
    for tok, r in list(ranks.items())[:500]:
        assert tb[r] == len(tok)
    assert all(tb[i] == 0 for i in trained.special_tokens.values())


def test_save_load_roundtrip(trained, corpus, tmp_path):
    trained.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    assert again.mergeable_ranks() == trained.mergeable_ranks()
    assert again.special_tokens == trained.special_tokens and again.pattern == trained.pattern
    text = corpus["code"][:50_000]
    assert again.encode_ordinary(text) == trained.encode_ordinary(text)


def test_load_errors_name_the_file_and_line(trained, tmp_path):
    trained.save(tmp_path / "tok")
    p = tmp_path / "tok" / "ranks.tiktoken"
    lines = p.read_text().splitlines()
    lines[6] = "not-base64!! 6"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ranks.tiktoken line 7"):
        Tokenizer.load(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


def test_to_tiktoken_roundtrip(trained, corpus):
    enc = trained.to_tiktoken()
    text = corpus["code"][:20_000]
    assert enc.encode_ordinary(text) == trained.encode_ordinary(text)
    assert Tokenizer.from_tiktoken(enc).mergeable_ranks() == trained.mergeable_ranks()


def test_from_ranks_rejects_bad_vocabularies():
    base = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="single byte 0x41"):
        Tokenizer.from_ranks({k: v for k, v in base.items() if k != b"A"}, SPLIT_PATTERN, {})
    with pytest.raises(ValueError, match="given twice"):
        Tokenizer.from_ranks({**base, b"ab": 5}, SPLIT_PATTERN, {})
    with pytest.raises(ValueError, match="already uses"):
        Tokenizer.from_ranks(base, SPLIT_PATTERN, {"<|x|>": 7})
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.from_ranks(base, "[", {})
    with pytest.raises(TypeError):
        Tokenizer.from_ranks({"a": 0}, SPLIT_PATTERN, {})
    tok = Tokenizer.from_ranks(base, SPLIT_PATTERN, {"<|x|>": 300})
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("a", prepend="<|nope|>")
    with pytest.raises(TypeError, match="texts\\[1\\] is bytes"):
        tok.encode_batch(["a", b"b"])
    with pytest.raises(TypeError):
        tok.encode_ordinary(b"bytes")


def test_batch_errors_name_the_text(trained):
    """A text the split pattern fails on (catastrophic backtracking) raises ValueError naming
    its index on every batch path; num_threads=0 is refused."""
    base = {bytes([i]): i for i in range(256)}
    tok = Tokenizer.from_ranks(base, r"(?:a|aa)+(?=c)|[\s\S]", {})
    rng = random.Random()
    bad = rng.randrange(3000)
    texts = [rng.choice(["x y", "zz", ""]) for _ in range(3000)]
    texts[bad] = "a" * 40
    for threads in (1, 2, 3, None):
        with pytest.raises(ValueError, match=rf"texts\[{bad}\]: split pattern failed"):
            tok.encode_batch(texts, num_threads=threads)
        with pytest.raises(ValueError, match=rf"texts\[{bad}\]: split pattern failed"):
            tok.encode_batch_numpy(texts, num_threads=threads)
    texts[bad] = "ok"
    assert tok.encode_batch(texts, num_threads=2) == [list(t.encode()) for t in texts]
    for call in (trained.encode_batch, trained.encode_batch_numpy):
        with pytest.raises(ValueError, match="num_threads must be a positive int, got 0"):
            call(["a", "b"], num_threads=0)


def test_surrogates_are_replaced_like_tiktoken(trained):
    text = "a\ud800b"
    assert trained.encode_ordinary(text) == _ref_trained(trained).encode_ordinary(text)


def test_kernels_reachable_from_package():
    import importlib.util

    assert importlib.util.find_spec("rustchat.kernels") is not None
    assert hasattr(rustchat, "__version__")


def test_encode_batch_splits_huge_documents_identically(trained, openai_encodings, corpus):
    """Documents over the piece size are encoded in parallel pieces: ids must not change."""
    big = "\n".join(corpus.values())
    while len(big.encode()) < 400_000:
        big += "\n" + big
    docs = [big, "small one", "", big[:200_001]]
    cl100k = openai_encodings["cl100k_base"][0]
    for tok, ref in [(trained, _ref_trained(trained)), (cl100k, _tiktoken(cl100k))]:
        expected = [ref.encode_ordinary(d) for d in docs]
        assert tok.encode_batch(docs) == expected
        ids, offs = tok.encode_batch_numpy(docs, prepend="<|bos|>" if "<|bos|>" in tok.special_tokens else None)
        assert len(offs) == len(docs) + 1


def test_batch_encoders_refuse_out_of_range_prepend_and_append(trained):
    """Both core batch encoders (bytes and lists) check the ids they add, also when called
    without the Python wrapper's own check; the last id of the vocabulary is accepted."""
    core, n = trained._core, trained.vocab_size
    texts = ["hello world", "again"]
    for encode in (core.encode_batch, core.encode_batch_lists):
        for pre, post in ((n, None), (None, n), (n + 7, 0)):
            with pytest.raises(ValueError, match=f"token id {n if pre != n + 7 else n + 7} is out of range"):
                encode(texts, pre, post, None)
    ids, offsets = core.encode_batch(texts, n - 1, n - 1, None)
    lists = core.encode_batch_lists(texts, n - 1, n - 1, None)
    assert lists == [[n - 1, *trained.encode_ordinary(t), n - 1] for t in texts]
    assert np.frombuffer(ids, "<u4").tolist() == [i for row in lists for i in row]
