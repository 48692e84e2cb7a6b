"""GPT vs the independent reference (tests/ref_gpt.py), KV cache, packed rows, padded vocab."""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from ref_gpt import ref_forward, ref_loss  # noqa: E402

from rustchat.model import GPT, GPTConfig, KVCache, ReluSquared, positions_from_doc_ids  # noqa: E402


def tiny(n_head=4, n_kv_head=4, vocab=300, n_embd=64, n_layer=2, seq=64):
    return GPTConfig(
        sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd
    )


def random_model(cfg, seed, dtype=torch.float64, use_kernels=True):
    """GPT with every weight random (the real init zeroes projections, which would hide bugs).
    Same seed -> same weights whatever the dtype. float64 models take the plain-torch path
    (the kernels stop at fp32); fp32 models go through rustchat.kernels."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(cfg, use_kernels=use_kernels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if name == "transformer.wte.weight" else 2.0 * p.size(-1) ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return model.to(dtype).eval()


def ref_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cfg_dict(cfg):
    return cfg.to_dict()


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_logits_and_loss_match_reference(n_head, n_kv_head):
    cfg = tiny(n_head, n_kv_head)
    model = random_model(cfg, seed=n_kv_head)
    g = torch.Generator().manual_seed(100 + n_kv_head)
    B, T = 2, 24
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets[0, :5] = -1
    targets[1, 10:] = -1

    ref = ref_forward(ref_weights(model), cfg_dict(cfg), idx)
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (B, T, cfg.vocab_size)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)
    assert logits.abs().max() <= 15.0  # softcap

    for red in ("mean", "sum", "none"):
        with torch.no_grad():
            loss = model(idx, targets, loss_reduction=red)
        torch.testing.assert_close(loss, ref_loss(ref, targets, red), rtol=1e-9, atol=1e-9)
    assert model(idx, targets, loss_reduction="none").shape == (B, T)


def test_gradients_match_reference():
    cfg = tiny(4, 2)
    model = random_model(cfg, seed=7).train()
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    targets[:, ::3] = -1

    model(idx, targets).backward()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    ref_loss(ref_forward(weights, cfg_dict(cfg), idx), targets).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, weights[name].grad, rtol=1e-7, atol=1e-10, msg=name)


def test_padded_vocab_never_leaks():
    cfg = tiny(vocab=300)
    assert cfg.padded_vocab_size == 320
    model = random_model(cfg, seed=3)
    assert model.lm_head.weight.shape[0] == 320 and model.transformer.wte.weight.shape[0] == 320
    with torch.no_grad():
        model.lm_head.weight[300:] = 1e4  # would dominate any softmax they reached
    idx = torch.randint(0, 300, (2, 12))
    targets = torch.randint(0, 300, (2, 12))
    ref = ref_forward(ref_weights(model), cfg_dict(cfg), idx)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model(idx, targets), ref_loss(ref, targets), rtol=1e-9, atol=1e-9)


def test_kernel_path_matches_plain_path_fp32():
    """fp32: rustchat.kernels (rotary, fused head + loss) vs the plain-torch twins, incl. grads."""
    cfg = tiny(4, 2)
    fast = random_model(cfg, seed=11, dtype=torch.float32).train()
    plain = random_model(cfg, seed=11, dtype=torch.float32, use_kernels=False).train()
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, cfg.vocab_size, (2, 20), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 20), generator=g)
    targets[1, ::2] = -1
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), plain(idx), rtol=1e-5, atol=1e-5)
        for red in ("mean", "sum", "none"):
            torch.testing.assert_close(
                fast(idx, targets, loss_reduction=red), plain(idx, targets, loss_reduction=red), rtol=1e-5, atol=1e-5
            )
        doc_ids = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])  # kernel rotary with position_ids
        torch.testing.assert_close(fast(idx, doc_ids=doc_ids), plain(idx, doc_ids=doc_ids), rtol=1e-5, atol=1e-5)
    fast(idx, targets).backward()
    plain(idx, targets).backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fp32_close_to_float64_reference():
    cfg = tiny(4, 2)
    m32 = random_model(cfg, seed=13, dtype=torch.float32)
    w64 = {k: v.double() for k, v in m32.state_dict().items()}
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    targets = torch.randint(0, cfg.vocab_size, (2, 20))
    ref = ref_forward(w64, cfg_dict(cfg), idx)
    with torch.no_grad():
        torch.testing.assert_close(m32(idx).double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m32(idx, targets).double(), ref_loss(ref, targets), rtol=1e-5, atol=1e-5)


def test_all_targets_ignored_gives_zero_not_nan():
    cfg = tiny()
    for model in (random_model(cfg, 1, torch.float32), random_model(cfg, 1)):
        idx = torch.randint(0, cfg.vocab_size, (2, 8))
        loss = model(idx, torch.full((2, 8), -1))
        assert loss.item() == 0.0


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    cfg = tiny(4, n_kv_head)
    model = random_model(cfg, seed=21)
    B, T = 2, 20
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=B, max_len=32)
        assert cache.k.shape == (cfg.n_layer, B, n_kv_head, 32, cfg.head_dim)
        parts = [model(idx[:, :7], kv_cache=cache)]  # prefill (empty cache, causal)
        assert cache.pos == 7
        for t in range(7, 12):  # token by token
            parts.append(model(idx[:, t : t + 1], kv_cache=cache))
        parts.append(model(idx[:, 12:], kv_cache=cache))  # a chunk on top of a non-empty cache
        assert cache.pos == T
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)

    cache.reset()
    assert cache.pos == 0


def test_kv_cache_prefill_fans_out():
    cfg = tiny(4, 2)
    model = random_model(cfg, seed=22)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    N = 3
    nxt = torch.randint(0, cfg.vocab_size, (N, 4))
    with torch.no_grad():
        one = KVCache.for_model(model, batch_size=1, max_len=16)
        model(prompt, kv_cache=one)
        many = KVCache.for_model(model, batch_size=N, max_len=16)
        many.prefill(one)
        assert many.pos == 9
        out = torch.cat([model(nxt[:, i : i + 1], kv_cache=many) for i in range(4)], dim=1)
        full = model(torch.cat([prompt.expand(N, -1), nxt], dim=1))[:, 9:]
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)


def test_kv_cache_overflow_is_a_clear_error():
    from rustchat.common import RustchatError

    model = random_model(tiny(), seed=1)
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with torch.no_grad(), pytest.raises(RustchatError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_packed_rows_match_separate_documents(n_kv_head):
    cfg = tiny(4, n_kv_head)
    model = random_model(cfg, seed=31)
    lengths = [[5, 11, 8], [24]]
    T = 24
    g = torch.Generator().manual_seed(32)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    doc_ids = torch.tensor([sum([[d] * n for d, n in enumerate(row)], []) for row in lengths])
    pos = torch.tensor([sum([list(range(n)) for n in row], []) for row in lengths])
    assert torch.equal(positions_from_doc_ids(doc_ids), pos)
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids, position_ids=pos)
        packed_default_pos = model(idx, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(idx[b : b + 1, start : start + n])
                torch.testing.assert_close(packed[b, start : start + n], alone[0], rtol=1e-9, atol=1e-9)
                start += n
    torch.testing.assert_close(packed_default_pos, packed, rtol=1e-12, atol=1e-12)
    # and the reference agrees with the packed run
    ref = ref_forward(ref_weights(model), cfg_dict(cfg), idx, positions=pos, doc_ids=doc_ids)
    torch.testing.assert_close(packed, ref, rtol=1e-9, atol=1e-9)


def test_packed_loss_matches_reference():
    cfg = tiny(4, 2)
    model = random_model(cfg, seed=33)
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    targets = torch.randint(0, cfg.vocab_size, (1, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])
    pos = positions_from_doc_ids(doc_ids)
    ref = ref_forward(ref_weights(model), cfg_dict(cfg), idx, positions=pos, doc_ids=doc_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, doc_ids=doc_ids), ref_loss(ref, targets), rtol=1e-9, atol=1e-9)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=1000, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0
        assert block.mlp.c_proj.weight.abs().max() == 0
        assert abs(block.attn.c_q.weight.std().item() - 128**-0.5) < 0.01
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert abs(wte[:1000].std().item() - 1.0) < 0.02
    assert abs(head[:1000].std().item() - 0.001) < 0.0001
    assert wte[1000:].abs().max() == 0 and head[1000:].abs().max() == 0
    # a fresh model predicts a near-uniform distribution
    idx = torch.randint(0, 1000, (2, 16))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(1000)) < 0.05


def test_from_depth_and_param_count():
    c10 = GPTConfig.from_depth(10)
    assert (c10.n_embd, c10.n_head, c10.n_kv_head, c10.head_dim, c10.n_layer) == (640, 5, 5, 128, 10)
    c20 = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (c20.n_embd, c20.n_head, c20.head_dim) == (1280, 10, 128)
    assert (c20.vocab_size, c20.sequence_len) == (65536, 2048)
    for d in range(1, 13):  # odd depths still give equal, even head widths
        c = GPTConfig.from_depth(d)
        assert c.n_embd == 64 * d and c.n_embd % c.n_head == 0 and c.head_dim % 2 == 0
    # nanochat 92d63d4's shape knobs: width per layer and head width (the tiny preset: d2, 4 heads of 32)
    tiny = GPTConfig.from_depth(2, aspect_ratio=64, head_dim=32)
    assert (tiny.n_embd, tiny.n_head, tiny.head_dim) == (128, 4, 32)
    rng = np.random.default_rng()
    for _ in range(20):
        d, ar, hd = int(rng.integers(1, 9)), 2 * int(rng.integers(1, 65)), int(rng.integers(2, 257))
        c = GPTConfig.from_depth(d, aspect_ratio=ar, head_dim=hd)
        # the fewest heads that are at most hd wide (when an even width divides), all of one even width
        want = next(
            n
            for n in range(1, d * ar + 1)
            if (d * ar) % n == 0 and (d * ar // n) % 2 == 0 and n >= math.ceil(d * ar / hd)
        )
        assert (c.n_embd, c.n_head, c.head_dim % 2) == (d * ar, want, 0), (d, ar, hd)
    from rustchat.common import RustchatError

    with pytest.raises(RustchatError, match="must be even"):
        GPTConfig.from_depth(3, aspect_ratio=33)
    with torch.device("meta"):
        m = GPT(c20, init=False)
    assert abs(m.num_params() - 561e6) < 1e6  # docs/design.md: d20 ~561M params
    blocks = 20 * 12 * 1280**2
    assert m.estimate_flops() == 6 * (blocks + 65536 * 1280) + 12 * 20 * 10 * 128 * 2048


def test_gqa_config_validation():
    from rustchat.common import RustchatError

    with pytest.raises(RustchatError):
        GPTConfig(sequence_len=8, vocab_size=10, n_layer=1, n_head=4, n_kv_head=3, n_embd=64)


def test_bf16_autocast_path_runs_and_is_close():
    """The CUDA recipe (bf16 autocast, fp32 master weights) exercised on CPU."""
    cfg = tiny(4, 2)
    model = random_model(cfg, seed=41, dtype=torch.float32)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 2)
    with torch.no_grad():
        ref = model(idx, targets, doc_ids=doc_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets, doc_ids=doc_ids)
        logits = model(idx)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)


def test_relu_squared_function_equals_autograd_of_the_composite():
    """The MLP's own relu^2 Function gives what autograd of F.relu(x).square() gives, to the bit,
    in float64 and in bf16 (x*x is pow(x, 2); doubling is exact)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh inputs every run
    x = torch.randn(3, 50, 64, generator=g, dtype=torch.float64)
    x[0, :5] = 0.0  # relu's kink: both give gradient 0 there
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16):
        a = x.to(dtype).clone().requires_grad_(True)
        b = x.to(dtype).clone().requires_grad_(True)
        ya, yb = ReluSquared.apply(a), F.relu(b).square()
        ya.backward(dy.to(dtype))
        yb.backward(dy.to(dtype))
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad), dtype
    assert torch.autograd.gradcheck(ReluSquared.apply, (torch.randn(4, 7, dtype=torch.float64, requires_grad=True),))
