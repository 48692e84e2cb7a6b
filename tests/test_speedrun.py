"""The speedrun's evaluation: the same as `rustchat eval` on one checkpoint, and every task the
tiny preset trains on is scored on held-out problems."""

import os
import platform
import random
import re
from pathlib import Path

import pytest
import torch

import rustchat
from rustchat.checkpoint import save_checkpoint, stage_dir
from rustchat.cli import main
from rustchat.config import EvalConfig, SpeedrunConfig
from rustchat.evaluate import load_task, parse_tasks
from rustchat.model import GPT, GPTConfig
from rustchat.speedrun import PRESETS, evaluate_stage, stage_configs, summary_table
from rustchat.stages import MIXTURES
from rustchat.tokenizer import load_tokenizer
from rustchat.tasks import Arithmetic, IdentityQuestions, SimpleSpelling, SpellingBee, get_task
from rustchat.tasks.base import assistant_text

DEPTH = PRESETS["tiny"]["common"]["depth"]
EVAL_CLASSES = (Arithmetic, SpellingBee, SimpleSpelling, IdentityQuestions)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus):
    base = tmp_path_factory.mktemp("speedrun_eval")
    text = corpus["code"][:200_000]
    tok = rustchat.Tokenizer.train([text[i : i + 5000] for i in range(0, len(text), 5000)], vocab_size=512)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    # a small random model filed under the preset's depth: its replies run long (it rarely
    # samples the end token), which shows any cap on new tokens
    cfg = GPTConfig(sequence_len=160, vocab_size=tok.vocab_size, n_layer=DEPTH, n_head=2, n_kv_head=2, n_embd=32)
    for stage in ("mid", "sft"):
        save_checkpoint(stage_dir(stage, DEPTH, base), 7, GPT(cfg), None, {"stage": stage})
    return base


def _record_replies(monkeypatch):
    """Every (task, problem prompt, reply) that the tasks' evaluate() is asked to score."""
    seen = []
    for cls in EVAL_CLASSES:

        def evaluate(self, conv, completion, _orig=cls.evaluate):
            seen.append((type(self).__name__, conv["messages"][0]["content"], completion))
            return _orig(self, conv, completion)

        monkeypatch.setattr(cls, "evaluate", evaluate)
    return seen


def test_speedrun_evaluates_exactly_as_rustchat_eval(base_dir, monkeypatch):
    n = 2
    monkeypatch.setitem(PRESETS["tiny"], "eval", {**PRESETS["tiny"]["eval"], "max_problems": n})
    seen = _record_replies(monkeypatch)
    configs = stage_configs(
        SpeedrunConfig(preset="tiny", device="cpu", base_dir=str(base_dir), quiet=True, seed=5), base_dir
    )
    speedrun_scores = evaluate_stage(configs, "sft")
    speedrun_replies = list(seen)
    seen.clear()
    rc = main(
        [
            "eval",
            "-i",
            "sft",
            "--tasks",
            PRESETS["tiny"]["eval"]["tasks"],
            "--max-problems",
            str(n),
            "--batch-size",
            str(PRESETS["tiny"]["eval"]["batch_size"]),
            "--depth",
            str(DEPTH),
            "--base-dir",
            str(base_dir),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    # the same problems got the very same replies, so the same scores
    assert speedrun_replies == seen and len(seen) == n * len(EVAL_CLASSES)
    report = (base_dir / "report.md").read_text()
    table = report.split("## eval")[1].split("\n## ")[0]
    for task, acc in speedrun_scores.items():
        if task != "ChatCORE":
            assert re.search(rf"\| {task} \| generative \| {n} \| {100 * acc:.2f}% \|", table), (task, table)
    # the config is the one the eval command builds from those flags: its generation limits
    # (512 new tokens, capped by the context) and sampling defaults included
    assert configs["sft-eval"] == EvalConfig(
        source="sft",
        depth=DEPTH,
        device="cpu",
        base_dir=str(base_dir),
        quiet=True,
        tasks="tiny",
        max_problems=n,
        batch_size=PRESETS["tiny"]["eval"]["batch_size"],
    )
    tok = load_tokenizer(base_dir)
    longest = max(len(tok.encode_ordinary(reply)) for _, _, reply in seen)
    assert longest > 64  # no short cap on the replies (the speedrun used to stop at 64)


def test_mid_and_sft_tables_both_stay_in_the_report(base_dir):
    configs = stage_configs(SpeedrunConfig(preset="tiny", device="cpu", base_dir=str(base_dir), quiet=True), base_dir)
    for stage in ("mid", "sft"):
        configs[f"{stage}-eval"].max_problems = 1
        configs[f"{stage}-eval"].max_new_tokens = 4
        scores = evaluate_stage(configs, stage)
        assert {"Arithmetic", "SpellingBee", "SimpleSpelling", "Identity"} <= set(scores)
    # the two stages are scored on the same tasks and problems: only the source differs
    assert {**vars(configs["mid-eval"]), "source": "sft"} == vars(configs["sft-eval"])
    report = (base_dir / "report.md").read_text()
    assert f"| model | mid d{DEPTH} step 7 |" in report and f"| model | sft d{DEPTH} step 7 |" in report
    assert report.count("| Task | Type | Problems | Accuracy | Centered |") >= 2
    # each section says where it ran: the same seed gives other numbers on another CPU
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        first = cpuinfo.read_text().split("\n\n")[0].splitlines()
        field = {
            k: next(ln.split(":", 1)[1].strip() for ln in first if ln.split(":")[0].strip() == k)
            for k in ("model name", "cpu family", "model")
        }
        cpu = f"{field['model name']}, family {field['cpu family']} model {field['model']}"
        isa = torch.backends.cpu.get_cpu_capability()
        where = re.findall(r"^_\d{4}-\d\d-\d\d \d\d:\d\d:\d\d on (.*)_$", report, re.M)
        assert len(where) == report.count("\n## ") and set(where) == {
            f"{platform.node()} ({cpu}, {len(os.sched_getaffinity(0))} CPUs, torch {isa})"
        }


def test_summary_table_has_a_row_per_stage():
    rows = [
        {"stage": "base", "loss": "8.1 -> 4.2", "val": "val bpb 1.9", "seconds": 30.2},
        {
            "stage": "mid",
            "loss": "3.0 -> 1.0",
            "val": "val loss 2.0 -> 0.9",
            "seconds": 50,
            "tasks": {"Arithmetic": 0.25, "SpellingBee": 0.5},
        },
        {
            "stage": "sft",
            "loss": "0.9 -> 0.8",
            "val": "val loss 0.9 -> 0.7",
            "seconds": 40,
            "tasks": {"Arithmetic": 0.5, "SpellingBee": 0.875},
        },
    ]
    lines = summary_table(rows, ["Arithmetic", "SpellingBee"]).splitlines()
    assert lines[0] == "| Stage | Loss first -> last | Val metric | Arithmetic | SpellingBee | Time |"
    assert lines[2] == "| base | 8.1 -> 4.2 | val bpb 1.9 | - | - | 30 s |"
    assert lines[4] == "| sft | 0.9 -> 0.8 | val loss 0.9 -> 0.7 | 50.0% | 87.5% | 40 s |"


def _words_and_numbers(conv):
    """The problem's identifying content: the spelled word, else the numbers of the worked answer,
    else the question."""
    if "word" in conv:
        return conv["word"]
    text = assistant_text(conv)
    if "####" in text:
        return " ".join(re.findall(r"\d+", text.split("####")[0]))
    return conv["messages"][0]["content"]


def test_every_trained_task_is_evaluated_on_held_out_problems():
    def key(name):
        return "".join(c for c in name.lower() if c.isalnum())

    evaluated = {key(n): load_task(n, 200) for n in parse_tasks(PRESETS["tiny"]["eval"]["tasks"])}
    for stage in ("mid", "sft"):
        assert PRESETS["tiny"][stage]["tasks"] == "tiny"
        for name, kwargs in MIXTURES["tiny"][stage]["train"]:
            assert key(name) in evaluated, f"{stage} trains on {name} but the speedrun does not evaluate it"
            train = get_task(name, **kwargs)
            test = evaluated[key(name)]
            assert len(test) >= 17 and test.eval_type == "generative"
            trained = {_words_and_numbers(c) for c in train}
            trained_users = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
            for conv in test:
                assert _words_and_numbers(conv) not in trained, (name, conv)
                assert conv["messages"][0]["content"] not in trained_users, (name, conv)


def test_sft_validation_holds_out_what_only_sft_teaches():
    """The tiny SFT val loss is measured on every task that SFT trains on and mid does not
    (identity), so it sees what SFT alone teaches, and on conversations no tiny stage trains on."""
    import json

    sft = MIXTURES["tiny"]["sft"]
    only_sft = {n for n, _ in sft["train"]} - {n for n, _ in MIXTURES["tiny"]["mid"]["train"]}
    assert only_sft and only_sft <= {n for n, _ in sft["val"]}
    trained = {
        json.dumps(c["messages"], sort_keys=True)
        for stage in ("mid", "sft")
        for name, kwargs in MIXTURES["tiny"][stage]["train"]
        for c in get_task(name, **kwargs)
    }
    val = [json.dumps(c["messages"], sort_keys=True) for n, kw in sft["val"] for c in get_task(n, **kw)]
    assert len(val) >= 200 and not trained.intersection(val)


def test_arch_replaces_the_presets_for_the_base_model(tmp_path):
    """`speedrun --arch` picks the new model's architecture; without it the preset's stands."""
    from rustchat.config import SpeedrunConfig
    from rustchat.speedrun import PRESETS, stage_configs

    preset_arch = PRESETS["tiny"]["base"]["arch"]
    assert stage_configs(SpeedrunConfig(preset="tiny"), tmp_path)["base"].arch == preset_arch
    other = "2026" if preset_arch == "classic" else "classic"
    assert stage_configs(SpeedrunConfig(preset="tiny", arch=other), tmp_path)["base"].arch == other


def test_base_row_names_the_metrics_the_preset_scored():
    """The tiny preset scores bpb only; the GPU presets add CORE."""
    from rustchat.speedrun import base_val_text

    bpb = random.uniform(0.5, 5.0)
    core = random.uniform(0.0, 0.3)
    assert base_val_text({"val_bpb": bpb}) == f"val bpb {bpb:.4f}"
    assert base_val_text({"val_bpb": bpb, "CORE": core}) == f"val bpb {bpb:.4f}, CORE {core:.4f}"
    assert base_val_text({}) == "-"


def test_val_text_of_each_stage_kind():
    """base reports bpb, mid/SFT a validation loss, RL pass@k only (its row says "-" here)."""
    from rustchat.speedrun import _val_text

    a, b = random.uniform(1, 5), random.uniform(0, 1)
    assert _val_text({"val_bpb": a}, {"val_bpb": b}) == f"val bpb {a:.4f} -> {b:.4f}"
    assert _val_text(None, {"val_loss": b}) == f"val loss {b:.4f}"
    assert _val_text({"pass@1": a}, {"step": 30, "pass@1": b, "pass@8": a}) == "-"
    assert _val_text(None, None) == "-"
