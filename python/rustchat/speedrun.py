"""`rustchat speedrun`: the whole pipeline in one command.

--preset tiny: offline and CPU-sized (a few minutes): a tokenizer and a depth-2 model
pretrained on the Python standard library's own text, mid-trained and fine-tuned on
generated arithmetic-with-calculator, spelling tasks and the bundled identity chats, then a
short evaluation. Every machine has this data, so it is the embedded default job.
--preset d10 / d20: nanochat's recipes on FineWeb-Edu and the hub task datasets.
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import get_base_dir, print0
from .config import BaseConfig, EvalConfig, MidConfig, SFTConfig, SpeedrunConfig
from .data.pretrain import download_shards
from .data.textsource import iter_documents
from .evaluate import run_eval
from .report import write_section
from .stages import train_base, train_mid, train_sft
from .tasks.stdlib_text import write_corpus
from .tokenizer import Tokenizer

PRESETS = {
    # stage -> overrides of the stage defaults
    "tiny": {
        "tokenizer": {"vocab_size": 4096, "max_chars": 30_000_000},
        "common": {"depth": 2, "seq_len": 256, "eval_batches": 4},
        "base": {"device_batch_size": 8, "total_batch_size": 8 * 256, "max_steps": 150, "eval_every": 50},
        "mid": {"device_batch_size": 8, "total_batch_size": 8 * 256, "max_steps": 100, "eval_every": 50,
                "tasks": "tiny"},
        "sft": {"device_batch_size": 8, "total_batch_size": 16, "max_steps": 100, "eval_every": 50, "tasks": "tiny"},
        "eval": {"tasks": "tiny", "max_problems": 40},
    },
    "d10": {
        "tokenizer": {"vocab_size": 65536, "max_chars": 2_000_000_000, "num_shards": 8},
        "common": {"depth": 10, "seq_len": 2048},
        "base": {"device_batch_size": 32, "total_batch_size": 524_288, "num_shards": 60},
        "mid": {"device_batch_size": 32, "total_batch_size": 524_288, "tasks": "default"},
        "sft": {"device_batch_size": 4, "total_batch_size": 32, "tasks": "default"},
        "eval": {"tasks": "default"},
    },
    "d20": {
        "tokenizer": {"vocab_size": 65536, "max_chars": 2_000_000_000, "num_shards": 8},
        "common": {"depth": 20, "seq_len": 2048},
        "base": {"device_batch_size": 32, "total_batch_size": 524_288, "num_shards": 240},
        "mid": {"device_batch_size": 32, "total_batch_size": 524_288, "tasks": "default"},
        "sft": {"device_batch_size": 4, "total_batch_size": 32, "tasks": "default"},
        "eval": {"tasks": "default"},
    },
}


def _train_tokenizer(preset: dict, base: Path, tiny: bool, quiet: bool) -> None:
    t = preset["tokenizer"]
    if tiny:
        docs = iter_documents([write_corpus(base / "tiny_data")["train"]])
    else:
        docs = iter_documents(download_shards(range(t["num_shards"]), base / "base_data"))
    t0 = time.time()
    tok = Tokenizer.train(docs, t["vocab_size"], max_chars=t["max_chars"], verbose=not quiet)
    tok.save(base / "tokenizer")
    print0(f"tokenizer: vocab {tok.vocab_size} in {time.time() - t0:.1f} s -> {base / 'tokenizer'}")


def stage_configs(cfg: SpeedrunConfig, base: Path) -> dict:
    """The configs the speedrun runs, by command: the same dataclasses `rustchat base|mid|sft|eval` build."""
    preset = PRESETS[cfg.preset]
    common = {"device": cfg.device, "base_dir": str(base), "quiet": cfg.quiet, "seed": cfg.seed, **preset["common"]}
    base_kw = dict(preset["base"])
    if cfg.preset == "tiny":
        base_kw["data_dir"] = str(base / "tiny_data")
    return {
        "base": BaseConfig(**common, **base_kw),
        "mid": MidConfig(**common, **preset["mid"]),
        "sft": SFTConfig(**common, **preset["sft"]),
        "eval": EvalConfig(source="sft", depth=preset["common"]["depth"], device=cfg.device, base_dir=str(base),
                           seed=cfg.seed, quiet=cfg.quiet, **preset["eval"]),
    }


def run_speedrun(cfg: SpeedrunConfig) -> dict:
    tiny = cfg.preset == "tiny"
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    _train_tokenizer(PRESETS[cfg.preset], base, tiny, cfg.quiet)
    configs = stage_configs(cfg, base)
    results = {}
    for stage, train in (("base", train_base), ("mid", train_mid), ("sft", train_sft)):
        res = train(configs[stage])
        h = [x["loss"] for x in res["history"]]
        k = max(1, len(h) // 10)  # single steps are noisy: compare the first and last tenth
        first, last = sum(h[:k]) / k, sum(h[-k:]) / k
        results[stage] = {"first_loss": first, "last_loss": last, "eval": res.get("last_eval")}
        evals = "; ".join(f"{key} {v:.4f}" for key, v in (res.get("last_eval") or {}).items() if key != "step")
        print0(f"{stage}: mean loss of first/last {k} steps {first:.3f} -> {last:.3f} over {len(h)} steps "
               f"({res['seconds']:.0f} s){'; ' + evals if evals else ''}")
    results["eval"] = run_eval(configs["eval"])
    rows = {f"{s} loss": f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" for s, r in results.items() if s != "eval"}
    rows["total time"] = f"{time.time() - t_all:.0f} s"
    write_section("speedrun", rows, base_dir=base)
    print0(f"speedrun {cfg.preset} done in {time.time() - t_all:.0f} s; report: {base / 'report.md'}")
    return results
