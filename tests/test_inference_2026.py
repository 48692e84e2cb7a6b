"""Inference on the 2026 model: greedy decoding with the KV cache (Engine) and with continuous
batching (BatchScheduler) equals the full-sequence forward token for token, on random prompts
whose replies cross the short window (sliding windows in the cache, the smear state through
prefill and decode, value embeddings per position)."""

import queue
import random

import torch

from test_batching import VOCAB, _Tok
from test_model import random_model
from test_model_2026 import SHORT, cfg2026

from rustchat.batching import BatchScheduler, GenRequest
from rustchat.engine import Engine


def _model(seed):
    model = random_model(cfg2026(n_layer=3, vocab=VOCAB), seed=seed)
    with torch.no_grad():  # special tokens never win: replies run their full length
        model.lm_head.weight[256:].zero_()
    return model


def full_forward_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def _prompts(rng, k):
    # lengths below, at and past the short window, so decoding crosses it or starts beyond it
    return [
        [rng.randrange(256) for _ in range(rng.choice([SHORT - 20, SHORT - 3, SHORT + 1, SHORT + 30]))]
        for _ in range(k)
    ]


def test_engine_greedy_equals_full_forward_alone_and_fanned_out():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = _model(seed % 1000)
    engine = Engine(model, _Tok(), tools=False)
    prompt = [rng.randrange(256) for _ in range(SHORT - 8)]
    want = full_forward_greedy(model, prompt, 20)
    assert engine.generate_batch(prompt, 1, max_tokens=20, temperature=0.0) == [want], seed
    assert engine.generate_batch(prompt, 3, max_tokens=20, temperature=0.0) == [want] * 3, seed
    # prompts of one length, prefilled together
    same = [[rng.randrange(256) for _ in range(SHORT + 5)] for _ in range(2)]
    assert engine.complete_prompts(same, max_tokens=8, temperature=0.0) == [
        full_forward_greedy(model, p, 8) for p in same
    ], seed


def test_continuous_batching_greedy_equals_full_forward():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = _model(seed % 1000 + 1)
    engine = Engine(model, _Tok(), tools=False)
    prompts = _prompts(rng, 4)
    lengths = [rng.randint(6, 20) for _ in prompts]
    scheduler = BatchScheduler(engine, max_batch=2)  # more requests than slots: rows move
    queues = [queue.Queue() for _ in prompts]
    try:
        for q, p, n in zip(queues, prompts, lengths):
            scheduler.submit(GenRequest(p, q.put, max_tokens=n, temperature=0.0, top_k=None))
        got = []
        for q in queues:
            toks = []
            while (ev := q.get(timeout=300))[0] == "token":
                toks.append(ev[1])
            assert ev == ("end", "length"), ev
            got.append(toks)
    finally:
        scheduler.close()
    for p, n, toks in zip(prompts, lengths, got):
        assert toks == full_forward_greedy(model, p, n), (seed, len(p))
    assert scheduler.steps < sum(lengths)  # forward passes were shared


def full_forward_logprobs(model, prompt, reply):
    """log-softmax of the full-sequence forward before each reply token, [len(reply), V]."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(reply)]))[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), dim=-1)


def test_continuous_batching_logprobs_equal_full_forward():
    """Every step's log-probabilities, not only the argmax: the windowed layers' ring of keys
    (prompts longer than the ring when admitted, replies that wrap it) and the prefill of
    several prompts in one padded forward (their smear state, their last positions) must give
    the full forward's numbers. Greedy tokens alone would hide a wrong key: a random model's
    top token rarely moves."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = _model(seed % 1000 + 2)
    engine = Engine(model, _Tok(), tools=False)
    # short prompts are prefilled together (one padded forward); long ones start past the ring
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 17, 40, SHORT + 1, SHORT + 60, 2 * SHORT + 9)]
    rng.shuffle(prompts)
    lengths = [rng.randint(10, 40) for _ in prompts]
    scheduler = BatchScheduler(engine, max_batch=4)
    queues = [queue.Queue() for _ in prompts]
    try:
        for q, p, n in zip(queues, prompts, lengths):
            scheduler.submit(GenRequest(p, q.put, max_tokens=n, temperature=0.0, top_k=None, logprobs=3))
        got = []
        for q in queues:
            events = []
            while (ev := q.get(timeout=300))[0] == "token":
                events.append(ev)
            assert ev == ("end", "length"), ev
            got.append(events)
    finally:
        scheduler.close()
    for p, events in zip(prompts, got):
        reply = [ev[1] for ev in events]
        want = full_forward_logprobs(model, p, reply)
        for step, ev in enumerate(events):
            chosen, alts = ev[3]
            assert abs(chosen - float(want[step, ev[1]])) < 1e-4, (seed, len(p), step)
            for tok, lp in alts:
                assert abs(lp - float(want[step, tok])) < 1e-4, (seed, len(p), step, tok)
