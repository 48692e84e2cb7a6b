"""The 2026 architecture (sliding windows, value embeddings, per-layer lambdas, smear, backout,
rotary base 100k, q/k scale) vs the independent float64 reference (tests/ref_gpt.py), on
sequences longer than the short window: full forward, loss, gradients, packed rows, KV cache."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from ref_gpt import ref_forward, ref_loss, ref_windows  # noqa: E402
from test_model import random_model, ref_weights  # noqa: E402

from rustchat.checkpoint import check_model_config  # noqa: E402
from rustchat.common import RustchatError  # noqa: E402
from rustchat.model import ARCHS, GPT, GPTConfig, KVCache  # noqa: E402

SHORT = 128  # the short window of a 512-token context


def cfg2026(n_head=4, n_kv_head=2, n_layer=3, n_embd=64, vocab=300, seq=512, **kw):
    return GPTConfig(
        sequence_len=seq,
        vocab_size=vocab,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_embd,
        **{**ARCHS["2026"], **kw},
    )


def test_window_sizes_follow_the_pattern_and_rounding():
    for seq, short in ((2048, 512), (512, 128), (64, 128), (1000, 256), (4096, 1024), (1100, 384), (2049, 640)):
        c = cfg2026(seq=seq, n_layer=6)
        assert c.window_sizes() == [short, short, short, seq, short, seq]
        assert c.window_sizes() == ref_windows(c.to_dict())
    assert cfg2026(window_pattern="L", n_layer=3).window_sizes() == [512] * 3
    assert cfg2026(window_pattern="sl", n_layer=3).window_sizes() == [128, 512, 512]
    assert GPTConfig().window_sizes() == [None] * 20 and GPTConfig().arch == "classic"
    assert cfg2026().arch == "2026" and cfg2026(smear=False).arch == "custom"
    # the window pattern is the 2026 model's knob: another pattern is still that model
    assert cfg2026(window_pattern="L").arch == "2026" and cfg2026(window_pattern="SSL").arch == "2026"
    assert GPTConfig(window_pattern="L").arch == "custom"  # windows alone, on the classic model
    # value embeddings: alternating, last layer always
    assert [cfg2026(n_layer=4).has_value_embed(i) for i in range(4)] == [False, True, False, True]
    assert [cfg2026(n_layer=3).has_value_embed(i) for i in range(3)] == [True, False, True]


@pytest.mark.slow
@pytest.mark.parametrize("n_kv_head,n_layer", [(4, 3), (2, 4), (1, 2)])
def test_logits_and_loss_match_reference_across_the_window(n_kv_head, n_layer):
    cfg = cfg2026(n_kv_head=n_kv_head, n_layer=n_layer)
    model = random_model(cfg, seed=10 + n_kv_head)
    g = torch.Generator().manual_seed(20 + n_kv_head)
    B, T = 2, SHORT + 30
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets[0, :7] = -1
    ref = ref_forward(ref_weights(model), cfg.to_dict(), idx)
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)
        for red in ("mean", "none"):
            torch.testing.assert_close(
                model(idx, targets, loss_reduction=red), ref_loss(ref, targets, red), rtol=1e-9, atol=1e-9
            )
    # the window matters: the same weights with every layer full give other logits late in the row
    full = random_model(cfg2026(n_kv_head=n_kv_head, n_layer=n_layer, window_pattern="L"), seed=10 + n_kv_head)
    with torch.no_grad():
        other = full(idx)
    assert torch.allclose(other[:, : SHORT + 1], logits[:, : SHORT + 1], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(other[:, SHORT + 1 :], logits[:, SHORT + 1 :], atol=1e-6)


def test_gradients_match_reference():
    cfg = cfg2026(n_layer=3)
    model = random_model(cfg, seed=3).train()
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, cfg.vocab_size, (1, SHORT + 8), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (1, SHORT + 8), generator=g)
    model(idx, targets).backward()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    ref_loss(ref_forward(weights, cfg.to_dict(), idx), targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every 2026 parameter learns
        torch.testing.assert_close(p.grad, weights[name].grad, rtol=1e-7, atol=1e-10, msg=name)


def test_packed_rows_match_reference():
    """doc_ids: attention, windows and the smear stay inside each document."""
    cfg = cfg2026(n_layer=2)
    model = random_model(cfg, seed=5)
    g = torch.Generator().manual_seed(6)
    T = SHORT + 40
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    doc_ids = torch.zeros(2, T, dtype=torch.long)
    doc_ids[0, 20:] = 1  # row 0: a short document, then one longer than the window
    doc_ids[1, 150:] = 1
    pos = torch.cat([torch.arange(20), torch.arange(T - 20)]).expand(1, T)
    pos = torch.cat([pos, torch.cat([torch.arange(150), torch.arange(T - 150)])[None]])
    ref = ref_forward(ref_weights(model), cfg.to_dict(), idx, positions=pos, doc_ids=doc_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, doc_ids=doc_ids), ref, rtol=1e-9, atol=1e-9)
        # and each document alone gives the same logits
        alone = model(idx[:1, 20:])
    torch.testing.assert_close(ref[:1, 20:], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_kv_cache_matches_full_forward_across_the_window():
    """Prefill, chunks and single tokens through the cache == one full forward: windows, smear
    state and value embeddings carried from call to call."""
    cfg = cfg2026(n_layer=4)
    model = random_model(cfg, seed=8)
    g = torch.Generator().manual_seed(9)
    T = SHORT + 60
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, T)
        pieces, t = [], 0
        for n in (100, 1, 1, 40, 1) + (1,) * (T - 143):
            pieces.append(model(idx[:, t : t + n], kv_cache=cache))
            t += n
        assert t == T and cache.pos == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


def test_kv_cache_prefill_fans_out_the_smear_state():
    cfg = cfg2026(n_layer=2)
    model = random_model(cfg, seed=11)
    idx = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(12))
    nxt = torch.randint(0, cfg.vocab_size, (3, 1), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        one = KVCache.for_model(model, 1, 64)
        model(idx, kv_cache=one)
        many = KVCache.for_model(model, 3, 64)
        many.prefill(one)
        got = model(nxt, kv_cache=many)[:, -1]
        want = model(torch.cat([idx.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_meta_round_trip_and_classic_default():
    cfg = cfg2026()
    meta = {"model_config": cfg.to_dict()}
    assert check_model_config(meta["model_config"], "m") == cfg
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    classic = {k: v for k, v in cfg.to_dict().items() if k not in ARCHS["classic"]}
    assert check_model_config(classic, "m").arch == "classic"
    assert GPTConfig.from_dict(classic).arch == "classic"
    for key, bad in (
        ("window_pattern", "SXL"),
        ("window_pattern", 3),
        ("smear", 1),
        ("rope_base", True),
        ("qk_scale", "1.2"),
        ("window_pattern", ""),
    ):
        with pytest.raises(RustchatError, match=key):
            check_model_config({**cfg.to_dict(), key: bad}, "m")


def test_init_is_nanochat_2026():
    cfg = cfg2026(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, vocab=4096)
    model = GPT(cfg)
    s = 3**0.5 * 256**-0.5
    h = model.transformer.h
    assert h[0].attn.c_q.weight.abs().max() <= s and abs(h[0].attn.c_q.weight.std() - s / 3**0.5) < 2e-3
    assert h[0].mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert h[0].attn.c_proj.weight.abs().max() == 0 and h[0].mlp.c_proj.weight.abs().max() == 0
    assert abs(model.transformer.wte.weight[:4096].std() - 0.8) < 0.01
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    assert sorted(model.value_embeds) == ["1", "3"] and h[1].attn.ve_gate is not None and h[0].attn.ve_gate is None
    # every parameter has an optimizer role
    groups = model.param_groups()
    assert len(groups["value_embeds"]) == 2 and groups["x0"] == [model.x0_lambdas]
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


def test_window_pattern_flag_builds_that_model_or_refuses_in_one_line(tmp_path, capsys):
    """`rustchat base --window-pattern P` (nanochat 92d63d4's --window-pattern): a new 2026 model
    with those windows, still trained with the 2026 optimizer; a bad pattern, or windows on the
    classic model, is refused in one line before any work."""
    import random

    from rustchat.cli import main
    from rustchat.config import BaseConfig
    from rustchat.stages import _load_start, _recipe

    class Tok:
        vocab_size = 300

    pattern = "".join(random.choice("SL") for _ in range(random.randint(1, 5)))
    cfg = BaseConfig(depth=4, aspect_ratio=16, head_dim=16, seq_len=256, window_pattern=pattern, base_dir=str(tmp_path))
    model = _load_start(cfg, "cpu", Tok())[0]
    assert model.config.window_pattern == pattern and model.config.arch == "2026"
    want = [256 if pattern[i % len(pattern)] == "L" else 128 for i in range(3)] + [256]
    assert model.config.window_sizes() == want
    assert _recipe(model, cfg, None) == "2026"
    default = _load_start(BaseConfig(depth=4, aspect_ratio=16, head_dim=16, seq_len=256), "cpu", Tok())[0]
    assert default.config.window_pattern == ARCHS["2026"]["window_pattern"]
    for argv, want in (
        (["--window-pattern", "SXL"], "rustchat: error: --window-pattern must be 1 to 64 letters S and L, got 'SXL'\n"),
        (["--window-pattern", "L" * 65], "rustchat: error: --window-pattern must be 1 to 64 letters S and L, got "),
        (["--arch", "classic", "--window-pattern", "L"], "rustchat: error: --window-pattern: the classic architecture"),
    ):
        assert main(["base", "--depth", "1", "--base-dir", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(want) and err.count("\n") == 1, err
