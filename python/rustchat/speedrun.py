"""`rustchat speedrun`: the whole pipeline in one command.

--preset tiny: offline and CPU-sized (under 6 minutes on 2 cores): a byte-level tokenizer and a
depth-2 model (0.5M parameters) pretrained on the Python standard library's own text,
mid-trained on generated arithmetic-with-calculator and spelling tasks, fine-tuned on the same
kinds plus the bundled identity chats, then reinforced (RL) on arithmetic questions, each stage
then scored by `rustchat eval`. Every machine has this
data, so it is the embedded default job.
--preset d10 / d20: nanochat's recipes (48abd7d's stages and data, the 2026 model and rules of
92d63d4) on FineWeb-Edu and the hub task datasets, with CORE during and after base training.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .checkpoint import find_last_step, stage_dir
from .common import RustchatError, get_base_dir, print0
from .config import BaseConfig, EvalConfig, MidConfig, RLConfig, SFTConfig, SpeedrunConfig
from .data.pretrain import download_shards
from .data.textsource import iter_documents
from .evaluate import code_sandbox, run_eval
from .report import write_section
from .stages import train_base, train_mid, train_rl, train_sft
from .tasks.stdlib_text import write_corpus
from .tokenizer import SPECIAL_TOKENS, Tokenizer

# nanochat's base training (48abd7d, 92d63d4) scores CORE (500 examples per task) every 2000 steps and at the end;
# the GPU presets then score the whole suite on the final base model (base_eval "core")
CORE_DURING_BASE = {"core_every": 2000, "core_max_per_task": 500}

# Measured from the seeds' SFT checkpoints (docs/benchmarks.md, "Tuning the tiny RL stage", "RL at
# temperature 1.0" and "More words in tiny SFT"): arithmetic alone for 60 steps at nanochat's 5% of
# the base lrs (the command's default; 10% cost one seed's SpellingBee 21.5 points) and temperature
# 1.0 (the command's default, as nanochat's; 0.85 moved Arithmetic less). 16 questions a step: the
# Arithmetic target (+5 points or >= 97%) held on six seeds of nine, where 8 held on four, for 20 s
# more a run; it holds on no recipe tried for every seed
TINY_RL = {
    "tasks": "arithmetic",
    "examples_per_step": 16,
    "num_samples": 8,
    "device_batch_size": 16,
    "max_new_tokens": 160,
    "max_steps": 60,
    "eval_every": 60,
    "eval_examples": 64,
    "save_every": None,
    "temperature": 1.0,
    "init_lr_frac": 0.05,
}

PRESETS = {
    # stage -> overrides of the stage defaults
    "tiny": {
        # Byte-level (256 bytes + 9 special tokens, no merges): a prompt's " word" and the
        # answer's 'word' are then the same tokens, so spelling and arithmetic become exact
        # copies, which a model this small learns in minutes; with merges it never copies
        # (docs/design.md, "The tiny preset").
        "tokenizer": {"vocab_size": 265, "max_chars": 30_000_000},
        "common": {"depth": 2, "seq_len": 512, "eval_batches": 4},
        # 4 heads of 32 dims instead of one of 128: copying needs several heads per layer.
        # The 2026 architecture: measured on three seeds beside the classic one, it alone kept
        # SpellingBee >= 85% after SFT on every seed (docs/benchmarks.md, "Which architecture").
        # The classic rules (fixed lrs, no warmup) were measured with it: the 2026 rules would
        # scale this 4k-token batch's lrs by sqrt(4096/2^19) = 0.09
        "base": {
            "device_batch_size": 8,
            "total_batch_size": 8 * 512,
            "max_steps": 20,
            "eval_every": 10,
            "head_dim": 32,
            "arch": "2026",
            "rules": "classic",
            "bpb_tokens": 1 << 16,
        },
        # mid-training is where the tasks are learned: most of the budget goes here, in many
        # small steps (the copying skills appear after several hundred). 5 rows a step spend time that
        # the 2026 model's faster steps freed; measured so, on three seeds (docs/benchmarks.md,
        # "Identity in SFT only")
        "mid": {
            "device_batch_size": 5,
            "total_batch_size": 5 * 512,
            "max_steps": 1100,
            "eval_every": 275,
            "tasks": "tiny",
        },
        # SFT starts at a quarter of the base learning rates (nanochat 48abd7d's 2% barely moves a model
        # this small); packed rows, so no step is spent on padding. 330 steps: the 70 over 260 carry
        # the mixture's 800 added SpellingBee problems (stages.MIXTURES, docs/benchmarks.md "More words
        # in tiny SFT"), so the rest is seen about as often as before
        "sft": {
            "device_batch_size": 8,
            "total_batch_conversations": 16,
            "max_steps": 330,
            "eval_every": 165,
            "tasks": "tiny",
            "init_lr_frac": 0.25,
            "pack": True,
            "from_stage": "mid",
        },
        # RL on the SFT model's own replies: 8 samples per arithmetic question,
        # the calculator active; nanochat's learning rates (5% of the base lrs, 48abd7d and 92d63d4)
        "rl": TINY_RL,
        # `rustchat eval --tasks tiny`'s own problems (200 per task): the 800 decode 512 at a time
        # in one continuous batch (greedy replies do not depend on the batch; 512 rows took 17.3 s
        # where 256 took 19.5 s, docs/benchmarks.md "Faster scoring")
        "eval": {"tasks": "tiny", "batch_size": 512},
    },
    "d10": {
        "tokenizer": {"vocab_size": 65536, "max_chars": 2_000_000_000, "num_shards": 8},
        "common": {"depth": 10, "seq_len": 2048},
        "base": {"device_batch_size": 32, "total_batch_size": 524_288, "num_shards": 60, **CORE_DURING_BASE},
        "base_eval": {"core": True},
        "mid": {"device_batch_size": 32, "total_batch_size": 524_288, "tasks": "default"},
        "sft": {"device_batch_size": 4, "total_batch_conversations": 32, "tasks": "default", "from_stage": "mid"},
        "eval": {"tasks": "default"},
    },
    "d20": {
        "tokenizer": {"vocab_size": 65536, "max_chars": 2_000_000_000, "num_shards": 8},
        "common": {"depth": 20, "seq_len": 2048},
        "base": {"device_batch_size": 32, "total_batch_size": 524_288, "num_shards": 240, **CORE_DURING_BASE},
        "base_eval": {"core": True},
        "mid": {"device_batch_size": 32, "total_batch_size": 524_288, "tasks": "default"},
        "sft": {"device_batch_size": 4, "total_batch_conversations": 32, "tasks": "default", "from_stage": "mid"},
        "eval": {"tasks": "default"},
    },
}


def pipeline_path(configs: dict) -> str:
    """The stages a preset runs, in order, and where SFT starts from."""
    rl = " -> rl" if "rl" in configs else ""
    return f"base -> mid -> sft{rl} (SFT from {configs['sft'].from_stage}; base rules {configs['base'].rules})"


def _train_tokenizer(preset: dict, base: Path, tiny: bool, quiet: bool) -> None:
    t = preset["tokenizer"]
    if tiny:
        docs = iter_documents([write_corpus(base / "tiny_data")["train"]])
    else:
        docs = iter_documents(download_shards(range(t["num_shards"]), base / "base_data"))
    t0 = time.time()
    tok = Tokenizer.train(docs, t["vocab_size"], max_chars=t["max_chars"], verbose=not quiet)
    tok.save(base / "tokenizer")
    kind = " (byte-level: 256 bytes + special tokens)" if tok.vocab_size <= 256 + len(SPECIAL_TOKENS) else ""
    print0(f"tokenizer: vocab {tok.vocab_size}{kind} in {time.time() - t0:.1f} s -> {base / 'tokenizer'}")


def stage_configs(cfg: SpeedrunConfig, base: Path) -> dict:
    """The configs the speedrun runs, by step: the same dataclasses `rustchat base|mid|sft|eval`
    build. "mid-eval" and "sft-eval" are the one eval config of the preset with another source,
    so both stages are scored on the same problems with `rustchat eval`'s own defaults."""
    preset = PRESETS[cfg.preset]
    depth = preset["common"]["depth"]
    common = {
        "device": cfg.device,
        "base_dir": str(base),
        "quiet": cfg.quiet,
        "seed": cfg.seed,
        "force": cfg.force,
        **preset["common"],
    }
    base_kw = dict(preset["base"])
    if cfg.arch is not None:  # later stages keep the architecture of the checkpoint they start from
        base_kw["arch"] = cfg.arch
    if cfg.preset == "tiny":
        base_kw["data_dir"] = str(base / "tiny_data")
    eval_kw = {
        "depth": depth,
        "device": cfg.device,
        "base_dir": str(base),
        "quiet": cfg.quiet,
        "allow_unsandboxed": cfg.allow_unsandboxed,
    }
    base_cfg = BaseConfig(**common, **base_kw)
    configs = {
        "base": base_cfg,
        # bits per byte on the very tokens training's own evaluation scored: one number
        "base-eval": EvalConfig(
            source="base", **eval_kw, bpb_tokens=base_cfg.bpb_tokens, **preset.get("base_eval", {})
        ),
        "mid": MidConfig(**common, **preset["mid"]),
        "mid-eval": EvalConfig(source="mid", **eval_kw, **preset["eval"]),
        "sft": SFTConfig(**common, **preset["sft"]),
        "sft-eval": EvalConfig(source="sft", **eval_kw, **preset["eval"]),
    }
    if "rl" in preset:  # the presets that have an RL stage after SFT
        rl_fields = {f.name for f in dataclasses.fields(RLConfig)}  # no rows of a fixed length, no val batches
        rl_common = {k: v for k, v in common.items() if k in rl_fields}
        configs["rl"] = RLConfig(**rl_common, **preset["rl"])
        configs["rl-eval"] = EvalConfig(source="rl", **eval_kw, **preset["eval"])
    return configs


def _mean_ends(history: list[dict], key: str = "loss") -> tuple[float, float, int]:
    """Mean loss (or `key`) of the first and of the last tenth of the steps (single steps are noisy)."""
    h = [x[key] for x in history]
    k = max(1, len(h) // 10)
    return sum(h[:k]) / k, sum(h[-k:]) / k, k


def summary_table(rows: list[dict], tasks: list[str]) -> str:
    """The closing table: one row per stage with its loss, validation metric, task scores and time."""
    lines = [
        "| Stage | Loss first -> last | Val metric | " + " | ".join(tasks) + " | Time |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: |",
    ]
    for r in rows:
        scores = [f"{100 * r['tasks'][t]:.1f}%" if t in r.get("tasks", {}) else "-" for t in tasks]
        lines.append(
            f"| {r['stage']} | {r['loss']} | {r['val']} | " + " | ".join(scores) + f" | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def _val_text(start: dict | None, last: dict | None) -> str:
    key = "val_bpb" if last and "val_bpb" in last else "val_loss"
    if not last or key not in last:  # RL evaluates pass@k, not a validation loss
        return "-"
    name = "val bpb" if key == "val_bpb" else "val loss"
    if start and key in start:
        return f"{name} {start[key]:.4f} -> {last[key]:.4f}"
    return f"{name} {last[key]:.4f}"


def base_val_text(scores: dict) -> str:
    """The base row's metrics: bits per byte, and CORE where the preset scores it."""
    parts = [f"{name} {scores[key]:.4f}" for key, name in (("val_bpb", "val bpb"), ("CORE", "CORE")) if key in scores]
    return ", ".join(parts) or "-"


def evaluate_stage(configs: dict, stage: str) -> dict:
    """Score a stage's checkpoint exactly as `rustchat eval` does: the same function on the same
    config type, with the eval command's defaults for everything the preset does not set."""
    return run_eval(configs[f"{stage}-eval"])


def _check_no_earlier_run(configs: dict, force: bool) -> None:
    """A speedrun's stages start new runs: where an earlier run left checkpoints they would be
    refused after minutes of work, so ask for --force up front."""
    for stage in [st for st in ("base", "mid", "sft", "rl") if st in configs]:
        c = configs[stage]
        d = stage_dir(stage, c.depth, c.base_dir)
        step = find_last_step(d)
        if step is not None and not force:
            raise RustchatError(
                f"{d} holds an earlier run (up to step {step}): run the speedrun with --force "
                "to archive it and start again, or use another --base-dir"
            )


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    tiny = cfg.preset == "tiny"
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    configs = stage_configs(cfg, base)
    _check_no_earlier_run(configs, cfg.force)  # before the tokenizer is replaced under them
    for c in configs.values():  # an eval running model-written code must not refuse hours later
        if isinstance(c, EvalConfig):
            code_sandbox(c)
    print0(f"speedrun {cfg.preset}: {pipeline_path(configs)}")
    _train_tokenizer(PRESETS[cfg.preset], base, tiny, cfg.quiet)
    rows, tasks = [], []
    pipeline = [("base", train_base), ("mid", train_mid), ("sft", train_sft)]
    if "rl" in configs:
        pipeline.append(("rl", train_rl))
    for stage, train in pipeline:
        t0 = time.time()
        res = train(configs[stage])
        key = "reward" if stage == "rl" else "loss"
        first, last, k = _mean_ends(res["history"], key)
        print0(
            f"{stage}: mean {key} of first/last {k} steps {first:.3f} -> {last:.3f} over {len(res['history'])} "
            f"steps ({res['seconds']:.0f} s)"
        )
        # bits per byte for base, the task table for mid, SFT and RL
        scores = evaluate_stage(configs, stage)
        row = {
            "stage": stage,
            "loss": f"{first:.3f} -> {last:.3f}",
            "seconds": time.time() - t0,
            "val": _val_text(res.get("start_eval"), res.get("last_eval")),
        }
        if stage == "rl":  # the policy-gradient loss says little: the reward and pass@k do
            row["loss"] = f"reward {first:.3f} -> {last:.3f}"
            ev = res.get("last_eval") or {}
            row["val"] = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("pass@")) or "-"
        if stage == "base":
            row["val"] = base_val_text(scores)
        else:
            row["tasks"] = {t: v for t, v in scores.items() if t != "ChatCORE"}
            tasks += [t for t in row["tasks"] if t not in tasks]
        rows.append(row)
    total = time.time() - t_all
    table = summary_table(rows, tasks)
    write_section(
        "speedrun",
        {"preset": cfg.preset, "seed": cfg.seed, "path": pipeline_path(configs), "total time": f"{total:.0f} s"},
        base_dir=base,
        table=table,
    )
    print0(
        f"\nspeedrun {cfg.preset} (seed {cfg.seed}) done in {total:.0f} s; {pipeline_path(configs)}; "
        f"report: {base / 'report.md'}\n{table}"
    )
    return {"rows": rows, "seconds": total, "table": table}
