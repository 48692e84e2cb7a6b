"""Attention on the CPU in query tiles (rustchat.attention.masked): each tile of queries scores only
the keys its queries may see. Checked against attention written out by hand in float64 (scores,
mask, softmax, weighted sum), on fresh random inputs longer than one tile: one document per row
with and without a window, packed documents, GQA, and the gradients."""

import math
import random

import pytest
import torch

from rustchat import attention
from rustchat.attention import CPU_QUERY_TILE, DocAttention, causal, query_tiles


def allowed(doc_ids, window):
    """[B, T, T] bool by the definition: key j is seen by query i when j <= i, both lie in the same
    document, and i - j <= window (any distance when the window is None)."""
    B, T = doc_ids.shape
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = (j <= i) & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return ok & (i - j <= window) if window is not None else ok


def by_hand(q, k, v, ok):
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, T, D] where ok [B, T, T] allows."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~ok[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_docs(rng, B, T):
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < T:
            ids += [doc] * rng.randint(1, 3 * CPU_QUERY_TILE // 2)
            doc += 1
        rows.append(ids[:T])
    return torch.tensor(rows)


def qkv(gen, B, H, Hkv, T, D):
    shape = lambda h: (B, h, T, D)  # noqa: E731
    return [torch.randn(shape(h), generator=gen, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv)]


def assert_same_values_and_grads(got, want, inputs, rng):
    """Outputs equal, and the gradients of one random weighting of them."""
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)), dtype=got.dtype)
    g_got = torch.autograd.grad((got * weight).sum(), inputs, retain_graph=True)
    g_want = torch.autograd.grad((want * weight).sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("trial", range(4))
def test_causal_in_tiles_equals_attention_by_hand(trial):
    rng = random.Random()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    T = rng.randint(CPU_QUERY_TILE + 1, 4 * CPU_QUERY_TILE + 37)
    H, Hkv = rng.choice([(2, 2), (4, 2), (4, 1)])
    window = [None, rng.randint(1, T - 2), CPU_QUERY_TILE, rng.randint(T, 2 * T)][trial]
    q, k, v = qkv(gen, 2, H, Hkv, T, 16)
    got = causal(q, k, v, window, gqa=H != Hkv)
    want = by_hand(q, k, v, allowed(torch.zeros(2, T, dtype=torch.long), window))
    assert_same_values_and_grads(got, want, (q, k, v), rng)


@pytest.mark.parametrize("window", [None, "short"])
def test_packed_rows_in_tiles_equal_attention_by_hand(window):
    rng = random.Random()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    B, T = 3, rng.randint(2 * CPU_QUERY_TILE, 4 * CPU_QUERY_TILE)
    w = rng.randint(16, CPU_QUERY_TILE) if window else None
    doc_ids = random_docs(rng, B, T)
    q, k, v = qkv(gen, B, 4, 2, T, 8)
    got = DocAttention(doc_ids)(q, k, v, True, w)
    want = by_hand(q, k, v, allowed(doc_ids, w))
    assert_same_values_and_grads(got, want, (q, k, v), rng)


def test_tiles_cover_exactly_the_keys_their_queries_may_see():
    rng = random.Random()
    B, T = 2, rng.randint(3 * CPU_QUERY_TILE, 5 * CPU_QUERY_TILE)
    doc_ids = random_docs(rng, B, T)
    for w in (None, rng.randint(1, 2 * CPU_QUERY_TILE)):
        ok = allowed(doc_ids, w)
        tiles = query_tiles(ok[:, None])
        assert [(s, e) for s, e, _, _ in tiles] == [
            (s, min(s + CPU_QUERY_TILE, T)) for s in range(0, T, CPU_QUERY_TILE)
        ]
        for s, e, lo, hi in tiles:
            seen = ok[:, s:e].any(dim=0).any(dim=0).nonzero().flatten().tolist()
            # the range starts at the first key any query of the tile sees and ends after the last
            assert (lo, hi) == (seen[0], seen[-1] + 1)
            assert hi == e  # causal: no key after the tile's last query


def test_tiles_only_on_the_cpu_and_beyond_one_tile(monkeypatch):
    """One SDPA call where tiles cannot help (rows of at most one tile); tiles of CPU_QUERY_TILE beyond."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].size(2))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(gen, 1, 2, 2, CPU_QUERY_TILE, 8)
    causal(q, k, v, 7, gqa=False)
    assert calls == [CPU_QUERY_TILE]
    calls.clear()
    q, k, v = qkv(gen, 1, 2, 2, 2 * CPU_QUERY_TILE + 1, 8)
    causal(q, k, v, 7, gqa=False)
    assert calls == [CPU_QUERY_TILE, CPU_QUERY_TILE, 1]
    assert f"query tiles of {CPU_QUERY_TILE}" in attention.backend_name("cpu")  # the banner says so
