"""The 2026 training rules against a table worked out by hand from nanochat's formulas (base_train
at 92d63d4), and the classic rules against the January recipe (48abd7d).

The table (vocab 32,768 = nanochat 92d63d4's tokenizer, aspect ratio 64, head dim 128):
  width d = depth*64 rounded up to a multiple of 128, heads h = d/128;
  scaling params = block params + head
                 = depth*12*d^2 (q, k, v, o: 4 d^2; MLP: 8 d^2)
                   + ceil(depth/2)*12*h (value-embedding gates: 12 channels -> h heads, alternate layers)
                   + 32768*d (head);
  D = int(12 * params); D_ref = 12 * params(d12);
  B = 2^round(log2(2^19 * (D/D_ref)^0.383)); steps = D // B;
  lr scale = sqrt(B/2^19); weight decay = 0.28 * lr scale * D_ref/D.

depth 4:  d=256,  h=2:  4*12*65536 = 3,145,728 + 2*24 = 3,145,776; head 32768*256 = 8,388,608
          params 11,534,384; D = 138,412,608
depth 12: d=768,  h=6:  12*12*589,824 = 84,934,656 + 6*72 = 84,935,088; head 25,165,824
          params 110,100,912; D_ref = 1,321,210,944
depth 20: d=1280, h=10: 20*12*1,638,400 = 393,216,000 + 10*120 = 393,217,200; head 41,943,040
          params 435,160,240; D = 5,221,922,880
depth 26: d=1664, h=13: 26*12*2,768,896 = 863,895,552 + 13*156 = 863,897,580; head 54,525,952
          params 918,423,532; D = 11,021,082,384

depth 4:  D/D_ref = 0.104762, log2 = -3.2548, *0.383 = -1.2466 -> log2 B = 17.753 -> 2^18 = 262,144;
          steps 138,412,608 // 262,144 = 528; scale sqrt(1/2) = 0.707107; wd 0.28*0.707107/0.104762 = 1.889903
depth 12: ratio 1 -> B = 524,288; steps 1,321,210,944 // 524,288 = 2520; scale 1; wd 0.28
depth 20: D/D_ref = 3.952376, log2 = 1.9828, *0.383 = 0.7594 -> 19.759 -> 2^20 = 1,048,576;
          steps 4980; scale sqrt(2) = 1.414214; wd 0.28*1.414214/3.952376 = 0.100188
depth 26: D/D_ref = 8.341652, log2 = 3.0603, *0.383 = 1.1721 -> 20.172 -> 2^20 = 1,048,576;
          steps 10510; scale 1.414214; wd 0.28*1.414214/8.341652 = 0.047470
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rustchat import rules
from rustchat.common import RustchatError
from rustchat.config import BaseConfig
from rustchat.model import GPT, GPTConfig
from rustchat.schedules import base_lr_multiplier, muon_momentum_2026, muon_weight_decay
from rustchat.stages import base_plan, scaling_param_counts

REF_PARAMS = 110_100_912
# depth: (scaling params, tokens D, batch B, steps, lr scale, weight decay)
TABLE = {
    4: (11_534_384, 138_412_608, 262_144, 528, 0.7071068, 1.889903),
    12: (110_100_912, 1_321_210_944, 524_288, 2520, 1.0, 0.28),
    20: (435_160_240, 5_221_922_880, 1_048_576, 4980, 1.4142136, 0.100188),
    26: (918_423_532, 11_021_082_384, 1_048_576, 10510, 1.4142136, 0.047470),
}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_2026_rules_match_the_hand_table(depth):
    params, tokens, batch, steps, scale, wd = TABLE[depth]
    p = rules.plan_2026(params, REF_PARAMS)
    assert p.target_tokens == tokens and p.ref_tokens == 1_321_210_944
    assert p.total_batch_size == batch and p.batch_auto and p.num_steps == steps
    assert p.lr_scale == pytest.approx(scale, rel=1e-6)
    assert p.weight_decay == pytest.approx(wd, rel=1e-5)
    # the base learning rates (matrix 0.02, embedding 0.3, unembedding 0.008, scalars 0.5) times the scale
    assert (p.matrix_lr, p.embedding_lr, p.unembedding_lr, p.scalar_lr) == pytest.approx(
        (0.02 * scale, 0.3 * scale, 0.008 * scale, 0.5 * scale), rel=1e-6
    )
    assert (p.warmup_steps, p.warmdown_ratio, p.final_lr_frac, p.packing) == (40, 0.65, 0.05, "bos_bestfit")
    line = p.describe()
    for shown in (
        f"{tokens:,}",
        f"{batch:,}",
        f"{steps:,}",
        f"{p.lr_scale:.4f}",
        f"{p.weight_decay:.6g}",
        "warmup 40",
        "warmdown 0.65",
        "0.05",
    ):
        assert shown in line


def test_given_batch_and_steps_still_scale_lr_and_decay():
    """A given --total-batch-size / --max-steps replaces the derived value; the lr scale and
    the weight decay follow the batch given and the ratio's horizon (as nanochat 92d63d4's do)."""
    params, tokens = TABLE[20][:2]
    p = rules.plan_2026(params, REF_PARAMS, total_batch_size=2**17, num_steps=7)
    assert (p.total_batch_size, p.batch_auto, p.num_steps) == (2**17, False, 7)
    assert p.lr_scale == pytest.approx(0.5)  # sqrt(2^17 / 2^19)
    assert p.weight_decay == pytest.approx(0.28 * 0.5 * 1_321_210_944 / tokens)
    # another ratio moves D and D_ref together: the d12 reference keeps B_ref
    p8 = rules.plan_2026(REF_PARAMS, REF_PARAMS, tokens_per_param=8)
    assert p8.total_batch_size == 2**19 and p8.target_tokens == 8 * REF_PARAMS


def test_auto_batch_size_is_the_nearest_power_of_two_in_log2():
    rng = random.Random()
    for _ in range(200):
        ratio = math.exp(rng.uniform(-6, 6))
        b = rules.auto_batch_size(ratio * 1e9, 1e9)
        exact = math.log2(2**19 * ratio**0.383)
        assert b == 2 ** int(math.log2(b)) and abs(math.log2(b) - exact) <= 0.5 + 1e-9


def test_classic_rules_are_the_january_recipe():
    p = rules.plan_classic(123_456_789)
    assert p.total_batch_size == 524_288 and p.num_steps == math.ceil(20 * 123_456_789 / 524_288)
    assert (p.lr_scale, p.weight_decay, p.warmup_steps, p.warmdown_ratio, p.final_lr_frac) == (1.0, 0.0, 0, 0.2, 0.0)
    assert p.packing == "stream"
    assert (p.matrix_lr, p.embedding_lr, p.unembedding_lr) == (0.02, 0.2, 0.004)


def test_a_horizon_shorter_than_a_batch_is_refused_in_one_line():
    with pytest.raises(RustchatError, match="less than one batch"):
        rules.plan_2026(1000, REF_PARAMS, total_batch_size=2**19)


def test_2026_schedules():
    n = 1000
    # lr: (s+1)/40 during warmup, 1 until step n - 650, then linear to 0.05 at step n
    assert base_lr_multiplier(0, n, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05) == 1 / 40
    assert base_lr_multiplier(39, n, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05) == 1.0
    assert base_lr_multiplier(350, n, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05) == 1.0
    assert base_lr_multiplier(675, n, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05) == pytest.approx(
        0.5 + 0.5 * 0.05
    )
    assert base_lr_multiplier(n, n, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05) == pytest.approx(0.05)
    # momentum: 0.85 -> 0.97 over 400 steps, then 0.97 -> 0.90 across the warmdown (from step 350 here)
    assert muon_momentum_2026(0, 2000) == 0.85 and muon_momentum_2026(200, 2000) == pytest.approx(0.91)
    assert muon_momentum_2026(500, 2000) == 0.97 and muon_momentum_2026(700, 2000) == 0.97
    assert muon_momentum_2026(700 + 650, 2000) == pytest.approx(0.935)
    # weight decay: half a cosine to 0
    assert muon_weight_decay(0, n, 0.2) == 0.2 and muon_weight_decay(500, n, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(n, n, 0.2) == pytest.approx(0.0, abs=1e-12)


def _meta_model(depth: int, vocab: int, **kw) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig.from_depth(depth, vocab_size=vocab, **kw))


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_base_derives_the_table_from_depth_alone(depth):
    """`rustchat base --depth N` on the 2026 model (nanochat 92d63d4's vocabulary) counts the table's
    scaling parameters and derives the table's plan."""
    cfg = BaseConfig(depth=depth, arch="2026")
    model = _meta_model(depth, 32768, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, arch=cfg.arch)
    params, tokens, batch, steps, scale, wd = TABLE[depth]
    p = base_plan(cfg, model)
    assert (p.params, p.ref_params, p.target_tokens, p.total_batch_size, p.num_steps) == (
        params,
        REF_PARAMS,
        tokens,
        batch,
        steps,
    )
    assert p.weight_decay == pytest.approx(wd, rel=1e-5)


def test_the_base_banner_prints_the_plan(tmp_path, capsys):
    from rustchat import Tokenizer
    from rustchat.stages import train_base

    rnd = random.Random()
    docs = [" ".join(rnd.choice("abc de fgh ij klm".split()) for _ in range(rnd.randint(3, 40))) for _ in range(60)]
    Tokenizer.train(docs, vocab_size=270).save(tmp_path / "tokenizer")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("\n\n".join(docs[:50]))
    (tmp_path / "text" / "b.txt").write_text("\n\n".join(docs[50:]))
    res = train_base(
        BaseConfig(
            depth=1,
            seq_len=32,
            device_batch_size=2,
            total_batch_size=64,
            max_steps=2,
            device="cpu",
            quiet=True,
            eval_every=0,
            data_dir=str(tmp_path / "text"),
            base_dir=str(tmp_path),
        )
    )
    out = capsys.readouterr().out
    p = res["plan"]
    assert "rules 2026" in out and "rows: bos_bestfit" in out
    for shown in (
        f"{p['target_tokens']:,} tokens",
        f"lr scale {p['lr_scale']:.4f}",
        f"weight decay {p['weight_decay']:.6g}",
        "warmup 40 steps",
        "warmdown 0.65 to 0.05",
    ):
        assert shown in out
    # the matrices' weight decay follows its half cosine: at step 1 of 2, half the peak
    from rustchat.checkpoint import load_checkpoint, stage_dir

    _, states, _ = load_checkpoint(stage_dir("base", 1, tmp_path), load_optimizer=True)
    per_rank = states if isinstance(states[0], list) else [states]  # sharded: one list of states per rank
    decays = [
        g.get("weight_decay") for rank in per_rank for st in rank for g in st["param_groups"] if g.get("kind") == "muon"
    ]
    assert any(d == pytest.approx(p["weight_decay"] / 2, rel=1e-9) for d in decays), (decays, p["weight_decay"])


def test_base_plan_counts_the_models_blocks_and_head():
    """`rustchat base` feeds the rules the block + head count of the model it trains and of its
    d12 sibling; the classic rules count every parameter."""
    vocab = random.choice([32768, 50000, 65536])
    depth = random.choice([2, 4, 6])
    model = _meta_model(depth, vocab)
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    assert scaling_param_counts(model) == blocks + model.config.padded_vocab_size * model.config.n_embd
    p = base_plan(BaseConfig(depth=depth), model)
    ref = _meta_model(12, vocab)
    assert p.params == scaling_param_counts(model) and p.ref_params == scaling_param_counts(ref)
    assert p == rules.plan_2026(p.params, p.ref_params)
    c = base_plan(BaseConfig(depth=depth, rules="classic", total_batch_size=4096), model)
    assert c.params == model.num_params() and c.total_batch_size == 4096
