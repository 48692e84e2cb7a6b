"""Continuous batching (rustchat.batching): every request gives exactly the tokens Engine.generate
gives for it alone, whatever else shares its forward passes; slots free when requests end or
are cancelled; calculator tokens are forced per row; top_p sampling keeps the nucleus only."""

import queue
import random

import pytest
import torch

from rustchat.batching import BatchScheduler, GenRequest
from rustchat.common import RustchatError
from rustchat.engine import Engine
from rustchat.sampling import Sampling, sample_next, sample_rows, sampling_probs
from rustchat.model import GPT, GPTConfig
from rustchat.tokenizer import SPECIAL_TOKENS

VOCAB = 300


class _Tok:
    """Byte-level stand-in for the tokenizer: ids 0..255 are bytes, the specials follow."""

    def __init__(self):
        self.special_tokens = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = VOCAB

    def encode_special(self, name):
        return self.special_tokens[name]

    def encode_ordinary(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(1)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)).eval()
    with torch.no_grad():  # init zeroes the residual projections; give every layer a say
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return Engine(model, _Tok(), tools=False)


def run_all(scheduler, requests, timeout=120):
    """Submit (prompt, settings) pairs at once; returns per request (tokens, forced, end event)."""
    queues = [queue.Queue() for _ in requests]
    for q, (prompt, kw) in zip(queues, requests):
        scheduler.submit(GenRequest(prompt, q.put, **kw))
    if scheduler.thread is None:  # a scheduler on this thread: run it until every request ended
        scheduler.drain()
    out = []
    for q in queues:
        toks, forced = [], []
        while True:
            ev = q.get(timeout=timeout)
            if ev[0] != "token":
                break
            toks.append(ev[1])
            forced.append(ev[2])
        out.append((toks, forced, ev))
    return out


def engine_tokens(engine, prompt, max_tokens, temperature, top_k, seed):
    toks, forced = [], []
    for column, f in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed):
        toks.append(column[0])
        forced.append(f[0])
    return toks, forced


@pytest.mark.slow
@pytest.mark.parametrize("background", [True, False], ids=["own thread", "caller's thread"])
def test_batched_requests_equal_engine_alone(engine, background):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print("seed", seed)
    rng.seed(seed)
    requests = []
    for i in range(14):  # more requests than slots: some wait, slots are reused and rows move
        settings = (
            [
                dict(temperature=0.0, top_k=None),
                dict(temperature=1.0, top_k=20),
                dict(temperature=0.7, top_k=None),
                # unseeded: the scheduler's shared draw; a top_p this small keeps
                # only the top token, so the reply is the greedy one
                dict(temperature=1.0, top_k=None, top_p=1e-6, seed=None),
            ]
        )[i % 4]
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 50))]
        requests.append((prompt, {"max_tokens": rng.randint(1, 30), "seed": rng.randrange(1000), **settings}))
    scheduler = BatchScheduler(engine, max_batch=4, background=background)
    try:
        results = run_all(scheduler, requests)
    finally:
        scheduler.close()
    for (prompt, kw), (toks, _forced, end) in zip(requests, results):
        temperature = 0.0 if kw.get("top_p") else kw["temperature"]
        ref, _ = engine_tokens(engine, prompt, kw["max_tokens"], temperature, kw["top_k"], kw["seed"] or 0)
        assert toks == ref, (prompt, kw)
        assert end == ("end", "stop" if ref[-1] in engine.stop_tokens else "length")
    assert scheduler.steps < sum(kw["max_tokens"] for _, kw in requests)  # forward passes were shared


def test_cancelled_request_frees_its_slot_and_others_are_unaffected(engine):
    scheduler = BatchScheduler(engine, max_batch=2)
    try:
        long_q, short_q = queue.Queue(), queue.Queue()
        long_req = GenRequest([5, 6, 7], long_q.put, max_tokens=100, temperature=0.0)
        scheduler.submit(long_req)
        scheduler.submit(GenRequest([9] * 20, short_q.put, max_tokens=40, temperature=0.0))
        assert long_q.get(timeout=60)[0] == "token"
        long_req.cancelled = True
        events = []
        while not events or events[-1][0] == "token":
            events.append(long_q.get(timeout=60))
        assert events[-1] == ("end", "cancelled") and len(events) < 99
        # the waiting third request gets the freed slot while the second still runs
        third = run_all(scheduler, [([1, 2, 3, 4], dict(max_tokens=10, temperature=0.0))])[0]
        second = []
        while True:
            ev = short_q.get(timeout=60)
            if ev[0] != "token":
                break
            second.append(ev[1])
        assert second == engine_tokens(engine, [9] * 20, 40, 0.0, None, 0)[0]
        assert third[0] == engine_tokens(engine, [1, 2, 3, 4], 10, 0.0, None, 0)[0]
        assert scheduler.stats()["running"] == 0 and scheduler.cache.n == 0
    finally:
        scheduler.close()


def test_requests_over_the_context_or_queue_are_refused(engine):
    from rustchat.common import RustchatError

    scheduler = BatchScheduler(engine, max_batch=1, max_queue=0)
    try:
        with pytest.raises(RustchatError, match="context"):
            scheduler.submit(GenRequest([1] * 100, lambda ev: None, max_tokens=29))
        with pytest.raises(RustchatError, match="busy"):
            scheduler.submit(GenRequest([1], lambda ev: None, max_tokens=1))
    finally:
        scheduler.close()


class _ScriptedByPosition(torch.nn.Module):
    """Logits make script[k] the top token at generated step k, k counted from each row's own
    rotary position (position_ids when the batcher passes them, else the cache length)."""

    def __init__(self, prompt_len, script, end):
        super().__init__()
        self.config = GPTConfig(sequence_len=128, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.lm_head = torch.nn.Linear(8, VOCAB, bias=False)
        self.prompt_len, self.script, self.end = prompt_len, script, end

    def get_device(self):
        return self.lm_head.weight.device

    def forward(self, idx, targets=None, *, kv_cache=None, position_ids=None, **kw):
        B, T = idx.shape
        last = position_ids[:, -1].tolist() if position_ids is not None else [kv_cache.pos + T - 1] * B
        logits = torch.zeros(B, T, VOCAB)
        for b in range(B):
            k = last[b] + 1 - self.prompt_len
            logits[b, -1, self.script[k] if 0 <= k < len(self.script) else self.end] = 10.0
        kv_cache.advance(T)
        return logits


def test_calculator_tokens_are_forced_per_row_in_a_batch():
    tok = _Tok()
    sp = tok.encode_special
    script = [*b"ok ", sp("<|python_start|>"), *b"6*7", sp("<|python_end|>"), 0, 0, 0, 0, *b" done"]
    eng = Engine(_ScriptedByPosition(5, script, sp("<|assistant_end|>")), tok)
    ref_toks, ref_forced = engine_tokens(eng, [1, 2, 3, 4, 5], 40, 0.0, None, 0)
    assert tok.decode(ref_toks) == "ok 6*742 done" and any(ref_forced)
    scheduler = BatchScheduler(eng, max_batch=3)
    try:  # 5 requests through 3 slots: they join the batch at different steps
        results = run_all(scheduler, [([1, 2, 3, 4, 5], dict(max_tokens=40, temperature=0.0))] * 5)
    finally:
        scheduler.close()
    for toks, forced, end in results:
        assert (toks, forced) == (ref_toks, ref_forced)
        assert end == ("end", "stop")


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for top_p, support in ((0.4, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        draws = [int(sample_next(logits, gen, 1.0, None, top_p)) for _ in range(400)]
        assert set(draws) == support, top_p
    # inside the nucleus the odds keep their ratio (0.5 : 0.3); 2000 draws: sd of the share ~0.011
    draws = [int(sample_next(logits, gen, 1.0, None, 0.7)) for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.625) < 0.05
    # top_k applies first
    assert {int(sample_next(logits, gen, 1.0, 1 + 1, 0.99)) for _ in range(200)} == {0, 1}


class _NaNAtPosition(GPT):
    """A GPT whose logits are NaN for a row whose new token sits at rotary position `poison`
    (a model failing for one row only)."""

    poison = -1

    def forward(self, idx, targets=None, *, kv_cache=None, position_ids=None, **kw):
        start = kv_cache.pos if kv_cache is not None else 0
        logits = super().forward(idx, targets, kv_cache=kv_cache, position_ids=position_ids, **kw)
        last = position_ids[:, -1] if position_ids is not None else torch.full((idx.size(0),), start + idx.size(1) - 1)
        logits[last == self.poison] = float("nan")
        return logits


@pytest.mark.parametrize("background", [True, False], ids=["own thread", "caller's thread"])
def test_a_failing_row_fails_alone(engine, background):
    """A row whose logits turn NaN mid-batch ends with an error; every other row gives the
    tokens it gives alone, and the scheduler goes on serving."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print("seed", seed)
    rng.seed(seed)
    model = _NaNAtPosition(engine.model.config).eval()
    model.load_state_dict(engine.model.state_dict())
    model.poison = 80
    poisoned = Engine(model, engine.tok, tools=False)
    # the others never reach position 80 (prompt <= 40 + 30 tokens); the poisoned row's prompt of
    # 77 (positions 0..76) does when its fourth token is fed: it fails on drawing its fifth
    settings = [dict(temperature=0.0, top_k=None), dict(temperature=1.0, top_k=20), dict(temperature=0.7, top_k=None)]
    requests = [
        (
            [rng.randrange(256) for _ in range(rng.randint(1, 40))],
            {"max_tokens": rng.randint(5, 30), "seed": rng.randrange(1000), **settings[i % 3]},
        )
        for i in range(7)
    ]
    # a poisoned prompt whose greedy reply alone runs past 4 tokens (a drawn stop token would end it first)
    for _ in range(100):
        poisoned_prompt = [rng.randrange(256) for _ in range(77)]
        if len(engine_tokens(engine, poisoned_prompt, 5, 0.0, None, 0)[0]) == 5:
            break
    requests.insert(3, (poisoned_prompt, {"max_tokens": 20, "temperature": 0.0}))
    scheduler = BatchScheduler(poisoned, max_batch=8, background=background)
    try:
        results = run_all(scheduler, requests)
        after = run_all(scheduler, [requests[0]])[0]  # still serving
    finally:
        scheduler.close()
    toks, _, end = results[3]
    assert len(toks) == 4 and end[0] == "error" and "not finite" in end[1]
    for (prompt, kw), (toks, _forced, end) in zip(requests[:3] + requests[4:], results[:3] + results[4:]):
        ref, _ = engine_tokens(engine, prompt, kw["max_tokens"], kw["temperature"], kw["top_k"], kw["seed"])
        assert toks == ref and end[0] == "end", (prompt, kw)
    assert after[0] == results[0][0]
    with pytest.raises(RustchatError, match="not finite"):  # the engine's own loop: the same step
        list(poisoned.generate(requests[3][0], 1, 20, 0.0))


@pytest.fixture
def denormals_kept():
    """Denormal floats as they are: rustchat's CPU training (runtime.setup_cpu_math) flushes them
    to zero for the whole process, Python's own float comparisons included, and an earlier test
    in the same process may have trained."""
    flushing = not 5e-324 > 0
    torch.set_flush_denormal(False)
    yield
    if flushing:
        torch.set_flush_denormal(True)


@pytest.mark.usefixtures("denormals_kept")
@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1e-300),
        dict(temperature=1.0, top_p=1e-300),
        dict(temperature=1.0, top_p=1e-46),
        dict(temperature=5e-324, top_p=5e-324),
    ],
)
def test_degenerate_settings_sample_greedily(engine, settings):
    """Values that underflow float32 give the greedy reply instead of inf/NaN probabilities."""
    prompt = list(range(10, 30))
    greedy, _ = engine_tokens(engine, prompt, 12, 0.0, None, 0)
    scheduler = BatchScheduler(engine, max_batch=2)
    try:
        ((toks, _, end),) = run_all(scheduler, [(prompt, dict(max_tokens=12, seed=5, **settings))])
    finally:
        scheduler.close()
    assert toks == greedy and end[0] == "end"
    logits = torch.randn(3, VOCAB)
    picked = sample_next(logits, torch.Generator().manual_seed(1), settings["temperature"], None, settings.get("top_p"))
    assert picked.tolist() == logits.argmax(-1).tolist()


def test_prefill_groups_bound_the_padding():
    """Prompts admitted together share prefill forwards only while the padded forward stays
    within PREFILL_TOKENS; every request is prefilled exactly once."""
    from rustchat.batching import PREFILL_TOKENS, prefill_groups

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(50):
        reqs = [
            GenRequest([1] * rng.choice([1, rng.randint(1, 80), rng.randint(100, 700)]), lambda e: None, max_tokens=1)
            for _ in range(rng.randint(1, 12))
        ]
        groups = prefill_groups(reqs)
        assert sorted(map(id, (r for g in groups for r in g))) == sorted(map(id, reqs)), seed
        for g in groups:
            width = max(len(r.prompt) for r in g)
            assert len(g) == 1 or len(g) * width <= PREFILL_TOKENS, (seed, [len(r.prompt) for r in g])
        # short prompts do share: two prompts that fit together are never alone both
        singles = sorted(len(g[0].prompt) for g in groups if len(g) == 1)
        assert not (len(singles) >= 2 and 2 * singles[1] <= PREFILL_TOKENS), (seed, singles)


def test_sample_rows_draws_what_multinomial_draws_from_each_rows_generator():
    """sample_rows picks each row's token as torch.multinomial would from the same generator (its
    own seeded one, or one shared by several rows in one call), for temperature, top-k and top-p
    rows mixed with greedy rows and a NaN row, and leaves every generator in the same state."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print("seed", seed)
    rng.seed(seed)
    torch.manual_seed(seed)
    for _ in range(60):
        n, vocab = rng.randint(1, 12), rng.choice([5, 64, 265])
        logits = torch.randn(n, vocab) * rng.uniform(0.5, 8)
        shared = torch.Generator().manual_seed(rng.randrange(1 << 30))  # the unseeded rows' one
        rows, ref_gens = [], []
        for _ in range(n):
            kind = rng.choice(["seeded", "seeded", "shared", "greedy"])
            settings = rng.choice(
                [
                    dict(temperature=rng.uniform(0.3, 1.5)),
                    dict(temperature=0.9, top_k=rng.randint(1, vocab)),
                    dict(temperature=0.9, top_p=rng.uniform(0.05, 1.0)),
                    dict(temperature=0.9, top_k=3, top_p=0.5),
                ]
            )
            if kind == "greedy":
                settings = dict(temperature=0.0)
            s = rng.randrange(1 << 30)
            gen = shared if kind == "shared" else torch.Generator().manual_seed(s)
            rows.append(Sampling(**settings, generator=gen))
            ref_gens.append(None if kind == "shared" else torch.Generator().manual_seed(s))
        nan_row = rng.randrange(n) if rng.random() < 0.3 else None
        if nan_row is not None:
            logits[nan_row, 0] = float("nan")
        ref_shared = torch.Generator().set_state(shared.get_state())
        got = sample_rows(logits, rows)
        # the reference: settings groups in first-seen order; per group, the shared generator's
        # rows in one multinomial call and every other row alone, as sample_rows documents
        want: list = [None] * n
        groups: dict = {}
        for i, r in enumerate(rows):
            if r.greedy:
                want[i] = None if torch.isnan(logits[i]).any() else int(logits[i].argmax())
            else:
                groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
        for (t, k, p), idx in groups.items():
            probs, ids = sampling_probs(logits[idx], t, k, p)
            good = [j for j, i in enumerate(idx) if torch.isfinite(probs[j]).all() and probs[j].sum() > 0]
            mine = [j for j in good if ref_gens[idx[j]] is not None]
            together = [j for j in good if ref_gens[idx[j]] is None]
            calls = [([j], ref_gens[idx[j]]) for j in mine] + ([(together, ref_shared)] if together else [])
            for js, g in calls:
                picked = torch.multinomial(probs[js], 1, generator=g).squeeze(-1)
                if ids is not None:
                    picked = ids[js].gather(-1, picked[:, None]).squeeze(-1)
                for j, tok in zip(js, picked.tolist()):
                    want[idx[j]] = tok
        assert got == want, (settings, nan_row)
        assert torch.equal(shared.get_state(), ref_shared.get_state())
        for r, g in zip(rows, ref_gens):
            if g is not None:
                assert torch.equal(r.generator.get_state(), g.get_state())
