"""SFT straight from base (nanochat's 2026 path, chat_sft at 92d63d4): the mixture's composition
and ratios against nanochat's numbers, its schedule, and a tiny run that starts from a base checkpoint alone."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from helpers import mmlu_rows, write_jsonl

from rustchat import Tokenizer
from rustchat.checkpoint import find_last_step, load_checkpoint, stage_dir
from rustchat.common import RustchatError
from rustchat.config import STAGE_CONFIGS
from rustchat.schedules import sft_lr_multiplier
from rustchat.stages import MIXTURES, build_mixture, train_base, train_sft

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang songs of spring".split()
TINY = dict(depth=1, seq_len=256, device="cpu", quiet=True, eval_every=0, eval_batches=1)


def test_default_mixture_from_base_is_nanochats():
    """nanochat's 2026 SFT (92d63d4): SmolTalk once, MMLU's auxiliary train 3 times, GSM8K's train 4 times;
    validation SmolTalk test, MMLU test[:5200], GSM8K test[:420]."""
    spec = MIXTURES["default"]["sft-from-base"]
    counts = Counter((name, tuple(sorted(kw.items()))) for name, kw in spec["train"])
    assert counts == {
        ("smoltalk", (("split", "train"),)): 1,
        ("mmlu", (("split", "train"), ("subset", "auxiliary_train"))): 3,
        ("gsm8k", (("split", "train"),)): 4,
    }
    assert spec["val"] == [
        ("smoltalk", {"split": "test"}),
        ("mmlu", {"subset": "all", "split": "test", "stop": 5200}),
        ("gsm8k", {"split": "test", "stop": 420}),
    ]


def test_mixture_from_local_files_has_nanochats_ratios(tmp_path):
    rng = random.Random()
    n_smol, n_mmlu, n_gsm = rng.randint(3, 9), rng.randint(3, 9), rng.randint(3, 9)
    chats = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(n_smol)
    ]
    write_jsonl(tmp_path / "smoltalk-train.jsonl", chats)
    write_jsonl(tmp_path / "mmlu-auxiliary_train-train.jsonl", [{"train": r} for r in mmlu_rows(rng, n_mmlu)])
    write_jsonl(
        tmp_path / "gsm8k-train.jsonl",
        [{"question": f"What is {i}+1?", "answer": f"<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(n_gsm)],
    )
    mix = build_mixture("sft-from-base", "default", "train", str(tmp_path))
    assert len(mix) == n_smol + 3 * n_mmlu + 4 * n_gsm
    assert Counter(type(t).__name__ for t in mix.tasks) == {"SmolTalk": 1, "MMLU": 3, "GSM8K": 4}


def test_tiny_mixture_from_base_folds_mid_into_sft():
    both = len(build_mixture("mid", "tiny", "train")) + len(build_mixture("sft", "tiny", "train"))
    assert len(build_mixture("sft-from-base", "tiny", "train")) == both


def test_sft_schedules():
    # from base: 0.8 of the base lrs, flat for the first half, then linear to 0
    assert sft_lr_multiplier(0, 100, init_lr_frac=0.8, warmdown_ratio=0.5) == 0.8
    assert sft_lr_multiplier(50, 100, init_lr_frac=0.8, warmdown_ratio=0.5) == 0.8
    assert sft_lr_multiplier(75, 100, init_lr_frac=0.8, warmdown_ratio=0.5) == pytest.approx(0.4)
    assert sft_lr_multiplier(100, 100, init_lr_frac=0.8, warmdown_ratio=0.5) == 0.0
    # from mid (unchanged): 0.02, linear to 0 over the whole run
    assert sft_lr_multiplier(25, 100) == pytest.approx(0.015)


@pytest.fixture()
def base_only(tmp_path):
    """A base dir with a tokenizer, text files and a base checkpoint trained one step under the
    2026 rules; no mid checkpoint."""
    rnd = random.Random()
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 60))) for _ in range(200)]
    tok = Tokenizer.train(docs + ["0123456789 +-*/= How many letters in word?"] * 5, vocab_size=300)
    tok.save(tmp_path / "tokenizer")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a_train.txt").write_text("\n\n".join(docs[:180]))
    (tmp_path / "text" / "b_val.txt").write_text("\n\n".join(docs[180:]))
    train_base(
        STAGE_CONFIGS["base"](
            max_steps=1,
            device_batch_size=2,
            total_batch_size=2 * TINY["seq_len"],
            data_dir=str(tmp_path / "text"),
            base_dir=str(tmp_path),
            **TINY,
        )
    )
    return tmp_path


def test_tiny_sft_from_base_runs(base_only):
    d = base_only
    with pytest.raises(RustchatError, match="mid"):  # the default path still needs mid
        train_sft(
            STAGE_CONFIGS["sft"](
                max_steps=2, device_batch_size=2, total_batch_conversations=4, tasks="tiny", base_dir=str(d), **TINY
            )
        )
    res = train_sft(
        STAGE_CONFIGS["sft"](
            from_stage="base",
            max_steps=2,
            device_batch_size=2,
            total_batch_conversations=4,
            tasks="tiny",
            base_dir=str(d),
            **TINY,
        )
    )
    assert len(res["history"]) == 2 and all(h["trained_tokens"] > 0 for h in res["history"])
    assert res["history"][0]["lr_mult"] == 0.8  # nanochat's starting fraction from base
    assert find_last_step(stage_dir("sft", 1, d)) == 2
    # the base run's 2026 learning rates are inherited: matrix 0.02, AdamW embedding 0.3 and
    # head 0.008 (scaled by the width rule (dim/768)^-0.5)
    _, states, _ = load_checkpoint(stage_dir("sft", 1, d), load_optimizer=True)
    per_rank = states if isinstance(states[0], list) else [states]  # sharded: one list of states per rank
    lrs = sorted(g["initial_lr"] for rank in per_rank for st in rank for g in st["param_groups"])
    width = (64 / 768) ** -0.5
    for want in (0.02, 0.3 * width, 0.008 * width):
        assert any(abs(lr - want) < 1e-9 for lr in lrs), (want, lrs)
