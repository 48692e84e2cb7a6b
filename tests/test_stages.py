"""Training stages on the CPU with tiny models: per-token SFT normalisation (invariant to the
device batch size), resume == uninterrupted, 2 gloo processes == 1 process, losses fall, and
one-line errors for bad input."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import arc_rows, mmlu_rows, write_jsonl

from rustchat import Tokenizer
from rustchat.checkpoint import find_last_step, load_checkpoint, save_checkpoint, stage_dir
from rustchat.common import RustchatError
from rustchat.model import GPT, GPTConfig
from rustchat.stages import train_base, train_mid, train_sft
from rustchat.config import STAGE_CONFIGS
from rustchat.data.textsource import iter_documents

WORDS = (
    "the cat sat on a mat while dogs ran far away from home and birds sang songs of spring "
    "rain water fire light dark night day sun moon star river stone tree leaf"
).split()
TINY = dict(depth=1, seq_len=64, device="cpu", quiet=True, eval_every=0, eval_batches=1)


def _doc(rnd):
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 80)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with a tokenizer, pretraining text files and a random-init mid checkpoint."""
    d = tmp_path_factory.mktemp("rcbase")
    rnd = random.Random()
    docs = [_doc(rnd) for _ in range(400)]
    tok = Tokenizer.train(docs + ["0123456789 +-*/= How many letters in word?"] * 5, vocab_size=400)
    tok.save(d / "tokenizer")
    data = d / "text"
    data.mkdir()
    (data / "a_train.txt").write_text("\n\n".join(docs[:350]))
    (data / "b_val.txt").write_text("\n\n".join(docs[350:]))
    torch.manual_seed(random.randrange(1 << 30))
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    # A random, non-degenerate start (zero-init projections would make the first steps trivial).
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.normal_(0, 0.05)
    save_checkpoint(stage_dir("mid", 1, d), 0, model, None, {"stage": "mid"})
    return d


def _copy(base_dir, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(base_dir, dst)
    return dst


def _weights(d, stage, step=None):
    state, _, meta = load_checkpoint(stage_dir(stage, 1, d), step, load_optimizer=False)
    return state, meta


def _assert_same_weights(a, b, tol, outliers=4):
    """Equal up to float summation order. Adam and Muon normalise their updates, so rounding
    noise in tiny gradients is amplified up to ~1e-5 here; a different data split or a
    different weighting of micro-batches moves weights by about a full step (~1e-2) nearly
    everywhere. A few elements may differ by a step: AdamW's first update is about
    lr * sign(g), and a gradient element within rounding noise of zero can change sign with
    the summation order (measured: about one run in 300-1000 has one such element)."""
    assert a.keys() == b.keys()
    for k in a:
        bad = ~torch.isclose(a[k], b[k], rtol=tol, atol=tol)
        assert int(bad.sum()) <= outliers, (k, int(bad.sum()), (a[k] - b[k]).abs().max())


def test_sft_update_does_not_depend_on_device_batch_size(base_dir, tmp_path):
    results = []
    for dbs in (1, 2, 4):
        d = _copy(base_dir, tmp_path, f"dbs{dbs}")
        cfg = STAGE_CONFIGS["sft"](
            device_batch_size=dbs, total_batch_conversations=8, max_steps=2, tasks="tiny", base_dir=str(d), **TINY
        )
        res = train_sft(cfg)
        results.append((_weights(d, "sft")[0], [h["loss"] for h in res["history"]]))
    for w, losses in results[1:]:
        _assert_same_weights(results[0][0], w, 2e-4)
        assert losses == pytest.approx(results[0][1], rel=1e-4)


def test_sft_micro_batch_without_trained_tokens_adds_zero():
    """All targets ignored -> loss 0 and zero gradients (never NaN)."""
    from rustchat.trainer import train_step

    model = GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    opts = model.setup_optimizers(recipe="classic")  # no weight decay: zero gradients leave every weight as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 300, (2, 16))
    y = torch.full((2, 16), -1)
    loss, n = train_step(model, opts, [(x, y)], torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert loss == 0.0 and n == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("stage", ["base", "sft"])
def test_resume_matches_uninterrupted(base_dir, tmp_path, stage):
    kw = dict(max_steps=4, base_dir=None, **TINY)
    if stage == "base":
        kw.update(device_batch_size=2, total_batch_size=2 * 64 * 2)
        fn = train_base
    else:
        kw.update(device_batch_size=2, total_batch_conversations=4, tasks="tiny")
        fn = train_sft
    full = _copy(base_dir, tmp_path, "full")
    part = _copy(base_dir, tmp_path, "part")
    extra = {"data_dir": str(full / "text")} if stage == "base" else {}
    r_full = fn(STAGE_CONFIGS[stage](**{**kw, "base_dir": str(full)}, **extra))
    extra = {"data_dir": str(part / "text")} if stage == "base" else {}
    r1 = fn(STAGE_CONFIGS[stage](**{**kw, "base_dir": str(part), "stop_at_step": 2}, **extra))
    assert find_last_step(stage_dir(stage, 1, part)) == 2
    r2 = fn(STAGE_CONFIGS[stage](**{**kw, "base_dir": str(part), "resume": True}, **extra))
    losses_full = [h["loss"] for h in r_full["history"]]
    losses_resumed = [h["loss"] for h in r1["history"] + r2["history"]]
    assert losses_resumed == pytest.approx(losses_full, rel=1e-5)
    _assert_same_weights(_weights(full, stage)[0], _weights(part, stage)[0], 1e-5)


def test_mid_loss_falls(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "mid")
    # mid loads a base checkpoint: file the random model as base too
    state, _, meta = load_checkpoint(stage_dir("mid", 1, d), load_optimizer=False)
    shutil.copytree(stage_dir("mid", 1, d), stage_dir("base", 1, d))
    shutil.rmtree(stage_dir("mid", 1, d))
    res = train_mid(
        STAGE_CONFIGS["mid"](
            device_batch_size=4, total_batch_size=4 * 64, max_steps=30, tasks="tiny", base_dir=str(d), **TINY
        )
    )
    losses = [h["loss"] for h in res["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def _run_cli(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "rustchat.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_two_gloo_processes_match_one(base_dir, tmp_path):
    one = _copy(base_dir, tmp_path, "one")
    two = _copy(base_dir, tmp_path, "two")
    common = [
        "sft",
        "--depth",
        "1",
        "--seq-len",
        "64",
        "--device",
        "cpu",
        "--tasks",
        "tiny",
        "--max-steps",
        "2",
        "--total-batch-conversations",
        "4",
        "--eval-every",
        "0",
        "--quiet",
    ]
    r1 = _run_cli(common + ["--device-batch-size", "2"], {"RUSTCHAT_BASE_DIR": str(one)})
    assert r1.returncode == 0, r1.stderr[-2000:]
    env = {"RUSTCHAT_BASE_DIR": str(two), "OMP_NUM_THREADS": "1"}
    r2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "rustchat.cli",
            *common,
            "--device-batch-size",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    w1, m1 = _weights(one, "sft")
    w2, m2 = _weights(two, "sft")
    _assert_same_weights(w1, w2, 2e-4)
    assert [h["loss"] for h in m1["history"]] == pytest.approx([h["loss"] for h in m2["history"]], rel=1e-4)
    assert len(m2["data_states"]) == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_errors_are_one_line(base_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copytree(base_dir / "tokenizer", empty / "tokenizer")
    r = _run_cli(["sft", "--depth", "3", "--device", "cpu"], {"RUSTCHAT_BASE_DIR": str(empty)})
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("rustchat: error:") and "\n" not in err and "mid" in err
    r = _run_cli(["sft", "--depth", "1", "--device", "cpu", "--tasks", "nope"], {"RUSTCHAT_BASE_DIR": str(base_dir)})
    assert r.returncode == 2 and "--tasks must be one of" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    (tmp_path / "v.txt").write_text("val text")
    r = _run_cli(
        [
            "base",
            "--depth",
            "1",
            "--device",
            "cpu",
            "--seq-len",
            "64",
            "--device-batch-size",
            "1",
            "--total-batch-size",
            "64",
            "--max-steps",
            "50",
            "--data-dir",
            str(tmp_path / "bd"),
        ],
        {"RUSTCHAT_BASE_DIR": str(base_dir)},
    )
    assert r.returncode == 2 and "no such file" in r.stderr
    bd = tmp_path / "bd"
    bd.mkdir()
    shutil.copy(bad, bd / "a.jsonl")
    shutil.copy(tmp_path / "v.txt", bd / "b.txt")
    with pytest.raises(RustchatError, match=r"a.jsonl:2: invalid JSON"):
        list(iter_documents([bd]))


def test_default_recipe_runs_from_local_task_files(base_dir, tmp_path):
    """nanochat 48abd7d's SFT mixture (hub datasets) from local copies in --task-dir: every task wired."""
    from rustchat.stages import build_mixture

    rng = random.Random()
    td = tmp_path / "tasks"
    td.mkdir()
    write_jsonl(td / "arc-ARC-Easy-train.jsonl", arc_rows(rng, 6))
    write_jsonl(td / "arc-ARC-Challenge-train.jsonl", arc_rows(rng, 5))
    write_jsonl(td / "gsm8k-train.jsonl", [{"question": "What is 6*7?", "answer": "6*7=<<6*7=42>>42\n#### 42"}] * 4)
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 7
    write_jsonl(td / "smoltalk-train.jsonl", chats)
    write_jsonl(td / "smoltalk-test.jsonl", chats[:3])
    mix = build_mixture("sft", "default", "train", str(td))
    from rustchat.tasks import get_task

    kinds = {type(t).__name__ for t in mix.tasks}
    assert len(mix) == 6 + 5 + 4 + 7 + len(get_task("identity")) + 300 + 300
    assert kinds == {"ARC", "GSM8K", "SmolTalk", "CustomJSON", "SimpleSpelling", "SpellingBee"}
    d = _copy(base_dir, tmp_path, "dflt")
    res = train_sft(
        STAGE_CONFIGS["sft"](
            device_batch_size=4,
            total_batch_conversations=8,
            max_steps=2,
            tasks="default",
            task_dir=str(td),
            base_dir=str(d),
            **TINY,
        )
    )
    assert len(res["history"]) == 2 and all(h["trained_tokens"] > 0 for h in res["history"])
    write_jsonl(td / "mmlu-auxiliary_train-train.jsonl", [{"train": r} for r in mmlu_rows(rng, 5)])
    write_jsonl(td / "mmlu-all-test.jsonl", mmlu_rows(rng, 5))
    write_jsonl(td / "gsm8k-test.jsonl", [{"question": "2+2?", "answer": "<<2+2=4>>4\n#### 4"}] * 3)
    assert len(build_mixture("mid", "default", "val", str(td))) == 3 + 5 + 3


def test_step_gradient_is_per_token_over_the_whole_step(base_dir):
    """With SGD (update = -grad) the step's gradient is compared directly: it must be the mean
    over all trained tokens of the step, whatever the micro-batch split, i.e. equal to the
    gradient of one big batch; a mean of micro-batch means would differ (masks vary)."""
    from rustchat.stages import build_mixture
    from rustchat.data.steps import SFTSteps
    from rustchat.trainer import train_step

    tok = Tokenizer.load(base_dir / "tokenizer")
    convs = build_mixture("sft", "tiny", "train")
    torch.manual_seed(random.randrange(1 << 30))
    ref = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    seed = random.randrange(1 << 30)
    grads = {}
    for dbs in (1, 3, 12):
        model = GPT(ref.config)
        model.load_state_dict(ref.state_dict())
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        data = SFTSteps(tok, convs, 12, dbs, 64, 0, 1, seed)
        micro = data.next_step()
        assert len(micro) == 12 // dbs
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_step(model, [sgd], micro, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
        grads[dbs] = {k: before[k] - v for k, v in model.state_dict().items()}
    for dbs in (1, 3):
        for k, g in grads[12].items():
            assert torch.allclose(grads[dbs][k], g, rtol=1e-4, atol=1e-7), (dbs, k, (grads[dbs][k] - g).abs().max())


def test_base_reports_validation_bits_per_byte(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "bpb")
    cfg = STAGE_CONFIGS["base"](
        **{**TINY, "eval_every": 2},
        max_steps=2,
        device_batch_size=2,
        total_batch_size=2 * 64,
        data_dir=str(d / "text"),
        base_dir=str(d),
    )
    ev = train_base(cfg)["last_eval"]
    # an almost untrained model over a 400-id vocabulary: a few bits per byte, finite
    assert ev["step"] == 2 and 0.5 < ev["val_bpb"] < 20


# ------------------------------------------------------------------ disk: space, temp files, pruning, report
SFT_TINY = dict(device_batch_size=2, total_batch_conversations=4, tasks="tiny", **TINY)


def _report_rows(d, section):
    text = (Path(d) / "report.md").read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return {
        cells[1].strip(): cells[2].strip()
        for line in text.splitlines()
        if line.startswith("| ") and len(cells := line.split("|")) >= 4
    }


def test_report_after_resume_covers_the_whole_run(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "resumed")
    r1 = train_sft(STAGE_CONFIGS["sft"](max_steps=4, stop_at_step=2, base_dir=str(d), **SFT_TINY))
    seconds_to_step_2 = load_checkpoint(stage_dir("sft", 1, d), load_optimizer=False)[2]["run_seconds"]
    assert 0 < seconds_to_step_2 <= r1["seconds"]
    r2 = train_sft(STAGE_CONFIGS["sft"](max_steps=4, resume=True, base_dir=str(d), **SFT_TINY))
    rows = _report_rows(d, "sft")
    assert rows["first loss"] == f"{r1['history'][0]['loss']:.4f}" != f"{r2['history'][0]['loss']:.4f}"
    assert rows["last loss"] == f"{r2['history'][-1]['loss']:.4f}"
    assert r2["run_seconds"] == pytest.approx(seconds_to_step_2 + r2["seconds"])
    assert rows["wall time"] == f"{r2['run_seconds']:.1f} s"
    assert rows["resumed"].startswith("at step 2")
    assert [h["step"] for h in r2["run_history"]] == [1, 2, 3, 4]
    meta = load_checkpoint(stage_dir("sft", 1, d), load_optimizer=False)[2]
    assert [h["loss"] for h in meta["history"]] == [h["loss"] for h in r1["history"] + r2["history"]]


def test_keep_last_and_stale_temp_files(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "keep")
    ck = stage_dir("sft", 1, d)
    ck.mkdir(parents=True)
    # what a save killed mid-write leaves behind (names as _atomic_write makes them), and a user's file
    stale = [
        ".model_000009.safetensors.k1x2.tmp",
        ".optim_000009_rank0.pt.ab12.tmp",
        ".meta_000009.json.zz.tmp",
        ".write_test_q1.tmp",
    ]
    for name in stale + ["notes.txt"]:
        (ck / name).write_bytes(os.urandom(64))
    train_sft(STAGE_CONFIGS["sft"](max_steps=5, save_every=1, keep_last=2, base_dir=str(d), **SFT_TINY))
    assert sorted(p.name for p in ck.iterdir()) == [
        "meta_000004.json",
        "meta_000005.json",
        "model_000004.safetensors",
        "model_000005.safetensors",
        "notes.txt",
        "optim_000004_rank0.pt",
        "optim_000005_rank0.pt",
    ]


def _cli_error(argv, capsys):
    from rustchat.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rustchat: error: ") and "\n" not in err, err
    return err


SFT_ARGS = [
    "sft",
    "--depth",
    "1",
    "--device",
    "cpu",
    "--seq-len",
    "64",
    "--device-batch-size",
    "2",
    "--total-batch-conversations",
    "4",
    "--tasks",
    "tiny",
    "--max-steps",
    "2",
    "--eval-every",
    "0",
    "--quiet",
]


def test_no_space_is_found_before_step_one(base_dir, tmp_path, capsys, monkeypatch):
    d = _copy(base_dir, tmp_path, "full")
    steps = []
    import rustchat.trainer as trainer

    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 10**6, 3, 3, 10**5, 10, 10, 0, 255)))
    err = _cli_error(SFT_ARGS + ["--base-dir", str(d)], capsys)
    assert f"{stage_dir('sft', 1, d)}: not enough space for a checkpoint" in err and "no space left on device" in err
    assert steps == [] and find_last_step(stage_dir("sft", 1, d)) is None


def test_unwritable_checkpoint_dir_is_found_before_step_one(base_dir, tmp_path, capsys):
    d = _copy(base_dir, tmp_path, "unwritable")
    (d / "sft_checkpoints").write_text("a file where the checkpoint directory should be")  # blocks root too
    err = _cli_error(SFT_ARGS + ["--base-dir", str(d)], capsys)
    assert f"{stage_dir('sft', 1, d)}: checkpoint directory is not writable" in err


@pytest.mark.parametrize("failure", ["oserror", "torch-message"])
def test_enospc_at_save_is_named(base_dir, tmp_path, capsys, monkeypatch, failure):
    import errno

    import rustchat.checkpoint as checkpoint

    d = _copy(base_dir, tmp_path, "enospc")
    if failure == "oserror":

        def save_file(sd, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:  # torch.save's wording, which never says why; the device is then asked

        def save_file(sd, path):
            monkeypatch.setattr(
                os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10**6, 0, 0, 10**5, 0, 0, 0, 255))
            )
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                "data/0: file write failed"
            )

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    err = _cli_error(SFT_ARGS + ["--base-dir", str(d)], capsys)
    assert "model_000002.safetensors: no space left on device while saving the checkpoint" in err
    assert not [p for p in stage_dir("sft", 1, d).iterdir() if p.name.startswith(".model_")]  # no temp file left
