"""Conversation rendering, SFT collation, packing and the mid-train stream (Rust core) against
the plain-Python reference in ref_render.py (tiktoken on the same vocabulary)."""

import json
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rustchat
from rustchat import Tokenizer, collate_sft, pack_rows
from rustchat.conversation import RenderedBatch, render_batch
from rustchat.data.midtrain import MidTrainStream
from ref_render import RefRenderer, make_encoding, ref_collate, ref_midtrain
from helpers import with_states

HYP = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="session")
def tok(corpus):
    texts = [t for text in corpus.values() for t in text.split("\n\n")]
    return Tokenizer.train(texts, vocab_size=1000)


@pytest.fixture(scope="session")
def ref(tok):
    return RefRenderer(make_encoding(tok))


@pytest.fixture(scope="session")
def snippets(corpus):
    text = corpus["code"]
    return [text[i : i + 300] for i in range(0, min(len(text), 200_000), 300)]


# ------------------------------------------------------------------ strategies
tricky = st.lists(
    st.sampled_from(
        list("aAbz sS'\t\r\n09٣½.,!?-_\"()中文é😀🎉\u00a0\u2028")
        + ["'s", "  ", "\r\n", "<|bos|>", "<|assistant_end|>", "\n\n"]
    ),
    max_size=40,
).map("".join)


@st.composite
def texts(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=80))
    if kind == 1:
        return draw(tricky)
    if kind == 2:
        return ""
    return draw(st.sampled_from(SNIPPETS))


SNIPPETS = [
    "def f(x):\n    return x + 1\n",
    "The quick brown fox jumps over the lazy dog.",
    "  indented\n\n\ttabs",
    "1234567 + 89",
]


@st.composite
def parts(draw):
    n = draw(st.integers(0, 4))
    return [
        {"type": draw(st.sampled_from(["text", "python", "python_output"])), "text": draw(texts())} for _ in range(n)
    ]


@st.composite
def conversations(draw, min_turns=1):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(texts())})
    for i in range(draw(st.integers(min_turns, 6))):
        if i % 2 == 0:
            msgs.append({"role": "user", "content": draw(texts())})
        else:
            content = draw(st.one_of(texts(), parts()))
            msgs.append({"role": "assistant", "content": content})
    return {"messages": msgs} if draw(st.booleans()) else msgs


def _assert_same(got, want):
    ids, mask = got
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    assert ids.tolist() == want[0]
    assert mask.tolist() == want[1]


# ------------------------------------------------------------------ rendering
@HYP
@given(conversations())
def test_render_matches_reference_at_every_truncation(tok, ref, conv):
    full = ref.render(conv, max_tokens=None)
    _assert_same(tok.render_conversation(conv, max_tokens=None), full)
    _assert_same(tok.render_conversation(conv), ref.render(conv))
    for k in range(0, len(full[0]) + 2):
        _assert_same(tok.render_conversation(conv, max_tokens=k), (full[0][:k], full[1][:k]))


@HYP
@given(st.lists(conversations(), min_size=0, max_size=30), st.integers(1, 300), st.sampled_from([None, 1, 2, 3]))
def test_batch_matches_reference(tok, ref, convs, max_tokens, threads):
    got = tok.render_conversations(convs, max_tokens=max_tokens, num_threads=threads)
    assert len(got) == len(convs)
    for g, c in zip(got, convs):
        _assert_same(g, ref.render(c, max_tokens))
    flat = render_batch(tok, convs, max_tokens)
    assert flat.offsets[0] == 0 and flat.offsets[-1] == len(flat.ids) == len(flat.mask)
    assert [len(g[0]) for g in got] == flat.lengths.tolist()


@HYP
@given(conversations(min_turns=2))
def test_render_for_completion_matches_reference(tok, ref, conv):
    msgs = conv["messages"] if isinstance(conv, dict) else conv
    assume(msgs[-1]["role"] == "assistant")
    got = tok.render_for_completion(conv)
    assert got.dtype == np.int32
    assert got.tolist() == ref.render_for_completion(conv)
    assert got[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.render_for_completion(conv, max_tokens=3).tolist() == got[:3].tolist()
    fl = render_batch(tok, [conv, conv], None, completion=True)
    assert fl[1][0].tolist() == got.tolist()
    assert fl[1][1].tolist() == ref.render(msgs[:-1], None)[1] + [0]


def test_long_conversation_is_not_truncated_for_completion(tok, ref, snippets):
    long = " ".join(snippets[:40])
    conv = [{"role": "user", "content": long}, {"role": "assistant", "content": "x"}]
    ids = tok.render_for_completion(conv)
    assert len(ids) > 2048
    assert ids.tolist() == ref.render_for_completion(conv)
    assert len(tok.render_conversation(conv)[0]) == 2048


def test_real_text_and_surrogates(tok, ref, snippets):
    convs = []
    for i in range(0, len(snippets) - 4, 4):
        a, b, c, d = snippets[i : i + 4]
        convs.append(
            {
                "messages": [
                    {"role": "system", "content": a[:50]},
                    {"role": "user", "content": b},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "python", "text": c},
                            {"type": "python_output", "text": "4"},
                            {"type": "text", "text": d},
                        ],
                    },
                ]
            }
        )
    convs.append(
        [{"role": "user", "content": "lone \ud800 surrogate \udfff"}, {"role": "assistant", "content": "\ud83d!"}]
    )
    got = tok.render_conversations(convs, max_tokens=None)
    for g, c in zip(got, convs):
        _assert_same(g, ref.render(c, None))


def test_tokenizer_methods_and_views(tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = tok.render_conversation({"messages": conv})
    assert ids.tolist() == tok.render_conversation(tuple(conv))[0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.encode_special("<|assistant_end|>")
    pairs = tok.render_conversations([conv, conv])
    assert not pairs[0][0].flags.writeable  # views into one flat buffer
    fl = render_batch(tok, (c for c in [conv, conv]))
    assert isinstance(fl, RenderedBatch) and len(fl) == 2 and fl[-1][0].tolist() == ids.tolist()


def test_render_releases_the_gil_and_is_thread_safe(tok, ref, snippets):
    convs = [[{"role": "user", "content": s}, {"role": "assistant", "content": s[::-1]}] for s in snippets[:200]]
    want = [ref.render(c) for c in convs]
    errors = []

    def work():
        try:
            for _ in range(3):
                for g, w in zip(tok.render_conversations(convs, num_threads=2), want):
                    assert g[0].tolist() == w[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors


# ------------------------------------------------------------------ errors
U, A = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
BAD = [
    ([], "the conversation has no messages"),
    ({"messages": []}, "the conversation has no messages"),
    ({"msgs": [U]}, "'messages' key"),
    ({"messages": "hi"}, "'messages' must be a list, got str"),
    (42, "must be a dict with a 'messages' list or a list of messages"),
    ([A], "message 0: expected role 'user', got 'assistant'"),
    ([U, U], "message 1: expected role 'assistant', got 'user'"),
    ([U, A, A], "message 2: expected role 'user', got 'assistant'"),
    ([U, {"role": "system", "content": "s"}], "message 1: expected role 'assistant', got 'system'"),
    ([{"role": "system", "content": "s"}], "message 0: a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, A], "message 1: expected role 'user', got 'assistant'"),
    ([{"role": "tool", "content": "x"}], "message 0: unknown role 'tool'"),
    ([{"role": 3, "content": "x"}], "message 0: role must be a str, got int"),
    ([{"content": "x"}], "message 0: missing key 'role'"),
    ([{"role": "user"}], "message 0: missing key 'content'"),
    (["hi"], "message 0 is str, expected a dict"),
    ([{"role": "user", "content": ["x"]}], "message 0: user content must be a str, got list"),
    ([{"role": "user", "content": None}], "message 0: user content must be a str, got NoneType"),
    ([{"role": "system", "content": 1}, U], "message 0: system content must be a str, got int"),
    (
        [U, {"role": "assistant", "content": 7}],
        "message 1: assistant content must be a str or a list of parts, got int",
    ),
    (
        [U, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
        "message 1, part 0: unknown part type 'image'",
    ),
    (
        [U, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"text": "x"}]}],
        "message 1, part 1: missing key 'type'",
    ),
    ([U, {"role": "assistant", "content": [{"type": "text"}]}], "message 1, part 0: missing key 'text'"),
    (
        [U, {"role": "assistant", "content": [{"type": "text", "text": b"x"}]}],
        "message 1, part 0: text must be a str, got bytes",
    ),
    ([U, {"role": "assistant", "content": ["x"]}], "message 1, part 0 is str, expected a dict"),
]


@pytest.mark.parametrize("conv,msg", BAD, ids=[m for _, m in BAD])
def test_bad_conversations_raise_value_error(tok, conv, msg):
    with pytest.raises(ValueError, match=None) as e:
        tok.render_conversation(conv)
    assert msg in str(e.value)
    assert not str(e.value).startswith("conversation ")
    good = [[U, A]] * 9
    with pytest.raises(ValueError) as e:
        tok.render_conversations(good[:7] + [conv] + good[7:])
    assert str(e.value).startswith("conversation 7") and msg in str(e.value)


def test_completion_errors(tok):
    with pytest.raises(ValueError, match="message 0: the last message must be from the assistant"):
        tok.render_for_completion([U])
    with pytest.raises(ValueError, match="no messages"):
        tok.render_for_completion([])
    with pytest.raises(ValueError, match="message 2: the last message must be from the assistant"):
        tok.render_for_completion([U, A, U])


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation([U], max_tokens=-1)
    with pytest.raises(TypeError):
        tok.render_conversations({"messages": [U]})
    with pytest.raises(ValueError, match="num_threads"):
        tok.render_conversations([[U], [U]], num_threads=0)


def test_missing_special_token_is_named(tok):
    specials = {k: v for k, v in tok.special_tokens.items() if k != "<|python_end|>"}
    t2 = Tokenizer.from_ranks(tok.mergeable_ranks(), tok.pattern, specials)
    with pytest.raises(ValueError, match=r"'<\|python_end\|>'"):
        t2.render_conversation([U])
    t3 = Tokenizer.from_ranks(tok.mergeable_ranks(), tok.pattern, {})
    with pytest.raises(ValueError, match=r"'<\|bos\|>'"):
        t3.render_conversations([[U]])


# ------------------------------------------------------------------ collation
rows_strategy = st.lists(
    st.integers(0, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 999), min_size=n, max_size=n), st.lists(st.integers(0, 1), min_size=n, max_size=n)
        )
    ),
    min_size=1,
    max_size=12,
)


@HYP
@given(rows_strategy, st.integers(0, 999), st.one_of(st.none(), st.integers(1, 45)))
def test_collate_matches_reference(rows, pad_id, max_len):
    inputs, targets = collate_sft(rows, pad_id, max_len=max_len)
    ri, rt = ref_collate(rows, pad_id, max_len)
    assert inputs.dtype == np.int32 and targets.dtype == np.int64
    assert inputs.flags.writeable and targets.flags.writeable
    assert inputs.shape == (len(rows), len(ri[0]))
    assert inputs.tolist() == ri and targets.tolist() == rt


@HYP
@given(st.lists(conversations(), min_size=1, max_size=8))
def test_collate_rendered(tok, ref, convs):
    pad = tok.encode_special("<|assistant_end|>")
    rows = tok.render_conversations(convs)
    want = ref_collate([ref.render(c) for c in convs], pad)
    for got in (collate_sft(rows, pad), collate_sft(render_batch(tok, convs), pad)):
        assert got[0].tolist() == want[0] and got[1].tolist() == want[1]


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate_sft([], 0)
    with pytest.raises(ValueError, match="equal length"):
        collate_sft([([1, 2], [1])], 0)
    with pytest.raises(ValueError, match="pad_id"):
        collate_sft([([1, 2], [1, 1])], -1)
    with pytest.raises(ValueError, match="max_len"):
        collate_sft([([1, 2], [1, 1])], 0, max_len=0)


# ------------------------------------------------------------------ packing
def check_packed(p, rows, row_len, long, pad_id):
    """Segments are contiguous, row-local spans with positions from 0 and their own doc id;
    every trained target of every placed conversation appears once, except those the
    truncate policy drops (and counts)."""
    R = p.inputs.shape[0]
    assert p.inputs.shape == p.targets.shape == p.position_ids.shape == p.doc_ids.shape == (R, row_len)
    cu = p.cu_seqlens.astype(np.int64)
    assert cu[0] == 0 and cu[-1] == R * row_len and np.all(np.diff(cu) > 0)
    assert len(cu) - 1 == len(p.seg_conv) == len(p.seg_start)
    inputs, targets, pos, doc = (a.reshape(-1) for a in (p.inputs, p.targets, p.position_ids, p.doc_ids))
    assert p.max_seqlen == (np.diff(cu).max() if len(cu) > 1 else 0)
    seen = {}
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        assert a // row_len == (b - 1) // row_len, "segment crosses a row"
        assert pos[a:b].tolist() == list(range(b - a))
        assert np.all(doc[a:b] == s)
        c = int(p.seg_conv[s])
        if c < 0:
            assert np.all(targets[a:b] == -1) and np.all(inputs[a:b] == pad_id)
            continue
        ids, mask = np.asarray(rows[c][0]), np.asarray(rows[c][1])
        j0 = int(p.seg_start[s])
        assert inputs[a:b].tolist() == ids[j0 : j0 + b - a].tolist()
        want = np.where(mask[j0 + 1 : j0 + 1 + b - a] != 0, ids[j0 + 1 : j0 + 1 + b - a], -1)
        assert targets[a:b].tolist() == want.tolist()
        for k in range(b - a):
            if want[k] >= 0:
                assert (c, j0 + 1 + k) not in seen
                seen[c, j0 + 1 + k] = True
    dropped = 0
    left = set(p.leftover.tolist())
    for c, (ids, mask) in enumerate(rows):
        trained = [j for j in range(1, len(ids)) if mask[j]]
        if c in left:
            assert not any((c, j) in seen for j in trained)
            continue
        for j in trained:
            if long == "truncate" and j > row_len:
                dropped += 1
                assert (c, j) not in seen
            else:
                assert (c, j) in seen, f"conversation {c} lost target {j}"
    assert dropped == p.dropped_targets


@HYP
@given(
    st.lists(
        st.integers(0, 70).flatmap(
            lambda n: st.tuples(
                st.lists(st.integers(0, 999), min_size=n, max_size=n),
                st.lists(st.integers(0, 1), min_size=n, max_size=n),
            )
        ),
        max_size=25,
    ),
    st.integers(1, 48),
    st.sampled_from(["best_fit", "next_fit"]),
    st.sampled_from(["truncate", "split"]),
    st.one_of(st.none(), st.integers(0, 6)),
    st.integers(0, 999),
)
def test_packing_keeps_conversations_apart(rows, row_len, policy, long, max_rows, pad_id):
    p = pack_rows(rows, row_len, pad_id=pad_id, policy=policy, long=long, max_rows=max_rows)
    assert p.inputs.flags.writeable and p.targets.flags.writeable
    check_packed(p, rows, row_len, long, pad_id)
    positions = sum(min(len(r[0]) - 1, row_len) if long == "truncate" else len(r[0]) - 1 for r in rows if len(r[0]) > 1)
    if max_rows is None:
        assert len(p.leftover) == 0
        assert p.inputs.shape[0] >= -(-positions // row_len)
        assert (1 - p.padding_fraction) * p.inputs.size == pytest.approx(positions)
    else:
        assert p.inputs.shape[0] == max_rows


@HYP
@given(st.lists(conversations(), min_size=1, max_size=20), st.integers(8, 200))
def test_packing_rendered_conversations(tok, convs, row_len):
    batch = render_batch(tok, convs)
    pad = tok.encode_special("<|assistant_end|>")
    for long in ("truncate", "split"):
        p = pack_rows(batch, row_len, pad_id=pad, long=long)
        check_packed(p, list(batch), row_len, long, pad)


def test_best_fit_pads_less_than_plain_collation():
    rng = np.random.default_rng()
    lens = np.clip(rng.lognormal(np.log(400), 0.8, 2000).astype(int), 2, 2049)
    rows = [(np.arange(n) % 1000, np.ones(n, np.uint8)) for n in lens]
    p = pack_rows(rows, 2048)
    assert p.padding_fraction < 0.05
    assert pack_rows(rows, 2048, policy="next_fit").padding_fraction > p.padding_fraction
    inputs, _ = collate_sft(rows[:32], 0)
    assert 1 - (lens[:32] - 1).sum() / inputs.size > p.padding_fraction


def test_pack_errors():
    rows = [([1, 2, 3], [0, 1, 1])]
    for kw, msg in (({"policy": "first"}, "policy"), ({"long": "drop"}, "long"), ({"max_rows": -1}, "max_rows")):
        with pytest.raises(ValueError, match=msg):
            pack_rows(rows, 4, **kw)
    with pytest.raises(ValueError, match="row_len"):
        pack_rows(rows, 0)
    p = pack_rows([], 4)
    assert p.inputs.shape == (0, 4) and p.cu_seqlens.tolist() == [0]


# ------------------------------------------------------------------ mid-train stream
@pytest.fixture(scope="module")
def chat_data(snippets):
    rng = np.random.default_rng()
    out = []
    for i in range(60):
        k = int(rng.integers(1, 5))
        msgs = []
        for t in range(k):
            s = snippets[int(rng.integers(len(snippets)))][: int(rng.integers(0, 300))]
            msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": s})
        out.append({"messages": msgs})
    return out


@pytest.mark.parametrize("B,T", [(1, 7), (3, 64), (2, 300)])
def test_midtrain_matches_concatenation(tok, ref, chat_data, B, T):
    stream = MidTrainStream(tok, chat_data, B, T, max_tokens=150, render_chunk=7)
    want = ref_midtrain(ref, chat_data, B, T, 12, max_tokens=150)
    for (inputs, targets, cursor), (wi, wt) in zip(with_states(stream), want):
        assert inputs.dtype == np.int32 and targets.dtype == np.int64 and inputs.shape == (B, T)
        assert inputs.tolist() == wi and targets.tolist() == wt
        assert set(cursor) == {"conversation", "offset", "epoch"}


@pytest.mark.parametrize("B,T,chunk", [(1, 5, 3), (2, 33, 1), (4, 200, 50)])
def test_midtrain_resumes_from_cursor(tok, chat_data, B, T, chunk):
    full = MidTrainStream(tok, chat_data, B, T, render_chunk=chunk)
    states = with_states(full)
    run = [next(states) for _ in range(25)]
    for k in (0, 1, 7, 24):
        cursor = json.loads(json.dumps(run[k][2]))  # survives a checkpoint as JSON
        resumed = with_states(MidTrainStream(tok, chat_data, B, T, state=cursor, render_chunk=chunk + 1))
        for j in range(k + 1, 25):
            inputs, targets, c = next(resumed)
            assert inputs.tolist() == run[j][0].tolist() and targets.tolist() == run[j][1].tolist()
            assert c == run[j][2]
    assert full.state() == run[-1][2]


def test_midtrain_epochs_and_ranks(tok, ref, chat_data):
    data = chat_data[:10]
    total = sum(len(ref.render(c, 2048)[0]) for c in data)
    T = 16
    batches = list(with_states(MidTrainStream(tok, data, 1, T, num_epochs=2)))
    assert len(batches) == (2 * total) // (T + 1)
    assert batches[-1][2]["epoch"] in (1, 2)
    # Two ranks take alternate conversations.
    r0 = MidTrainStream(tok, data, 1, T, rank=0, world_size=2, num_epochs=1)
    r1 = MidTrainStream(tok, data, 1, T, rank=1, world_size=2, num_epochs=1)
    s0 = np.concatenate([np.append(i[0], t[0, -1]) for i, t in r0])
    s1 = np.concatenate([np.append(i[0], t[0, -1]) for i, t in r1])
    cat = lambda cs: [x for c in cs for x in ref.render(c)[0]]  # noqa: E731
    assert s0.tolist() == cat(data[0::2])[: len(s0)]
    assert s1.tolist() == cat(data[1::2])[: len(s1)]


def test_midtrain_errors(tok, chat_data):
    with pytest.raises(ValueError, match="empty"):
        MidTrainStream(tok, [], 1, 4)
    with pytest.raises(ValueError, match="invalid cursor"):
        MidTrainStream(tok, chat_data, 1, 4, state={"conversation": len(chat_data), "offset": 0, "epoch": 0})
    with pytest.raises(ValueError, match="beyond conversation 0"):
        next(MidTrainStream(tok, chat_data, 1, 4, state={"conversation": 0, "offset": 10**6, "epoch": 0}))
    bad = list(chat_data[:5]) + [[A]]
    with pytest.raises(ValueError, match="conversation 5, message 0"):
        for _ in MidTrainStream(tok, bad, 1, 64, num_epochs=1, render_chunk=2):
            pass


def test_package_exports():
    assert rustchat.collate_sft is collate_sft and "pack_rows" in rustchat.__all__
