"""A run owns its stage directory: --resume restores the run's settings from its checkpoint,
a new run never hides behind an old one's checkpoints (refused, or archived with --force),
one writer at a time (an advisory lock, tested with two processes), and every command
without --depth picks the depth the same way."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import (
    StageLock,
    find_last_step,
    latest_meta,
    load_stage_model,
    save_checkpoint,
    stage_dir,
)
from rustchat.cli import main
from rustchat.common import RustchatError
from rustchat.config import STAGE_CONFIGS
from rustchat.model import GPT, GPTConfig
from rustchat.stages import resolve_run, train_sft

TINY = dict(
    seq_len=64,
    device="cpu",
    quiet=True,
    eval_every=0,
    eval_batches=1,
    device_batch_size=2,
    total_batch_conversations=4,
    tasks="tiny",
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tokenizer and a random mid checkpoint at depth 1: what SFT starts from."""
    d = tmp_path_factory.mktemp("runs")
    rnd = random.Random()
    words = "the cat sat on a mat 0123456789 + - * / = how many letters in word".split()
    docs = [" ".join(rnd.choice(words) for _ in range(40)) for _ in range(200)]
    Tokenizer.train(docs, vocab_size=300).save(d / "tokenizer")
    torch.manual_seed(rnd.randrange(1 << 30))
    model = GPT(GPTConfig.from_depth(1, vocab_size=300, sequence_len=64))
    save_checkpoint(stage_dir("mid", 1, d), 0, model, None, {"stage": "mid"})
    return d


def _copy(base_dir, tmp_path, name):
    return Path(shutil.copytree(base_dir, tmp_path / name))


def _one_line_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("rustchat: error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------- resume remembers the run
def test_resume_restores_the_run_from_its_checkpoint(base_dir, tmp_path, capsys):
    d = _copy(base_dir, tmp_path, "resume")
    seq = random.choice([48, 64])
    argv = [
        "sft",
        "--depth",
        "1",
        "--device",
        "cpu",
        "--seq-len",
        str(seq),
        "--device-batch-size",
        "2",
        "--total-batch-conversations",
        "4",
        "--tasks",
        "tiny",
        "--max-steps",
        "4",
        "--eval-every",
        "0",
        "--quiet",
        "--base-dir",
        str(d),
    ]
    assert main(argv + ["--stop-at-step", "2"]) == 0
    out = capsys.readouterr().out
    cont = f"rustchat sft --resume --depth 1 --base-dir {d}"
    assert f"stopped at step 2 of 4; continue with: {cont}" in out
    first = latest_meta(stage_dir("sft", 1, d))
    # the printed command, as written (no --depth either: the one depth with an SFT checkpoint)
    assert main(["sft", "--resume", "--base-dir", str(d)]) == 0
    meta = latest_meta(stage_dir("sft", 1, d))
    assert meta["step"] == 4 and meta["num_steps"] == 4 and meta["run_id"] == first["run_id"]
    for key in ("seq_len", "tasks", "total_batch_conversations", "device_batch_size", "max_steps", "depth"):
        assert meta["config"][key] == first["config"][key], key
    assert meta["config"]["seq_len"] == seq and meta["config"]["tasks"] == "tiny"
    # a finished run says so and exits 0
    capsys.readouterr()
    assert main(["sft", "--resume", "--base-dir", str(d)]) == 0
    assert "already at step 4 of 4" in capsys.readouterr().out
    assert find_last_step(stage_dir("sft", 1, d)) == 4
    # a flag that changes what the run trains on is refused in one line; one that changes how
    # far it goes is applied, saying so
    err = _one_line_error(["sft", "--resume", "--base-dir", str(d), "--seq-len", str(seq * 2)], capsys)
    assert f"--seq-len {seq * 2} differs from the run's {seq}" in err
    err = _one_line_error(["sft", "--resume", "--base-dir", str(d), "--tasks", "default"], capsys)
    assert "--tasks default differs from the run's tiny" in err
    assert main(["sft", "--resume", "--base-dir", str(d), "--max-steps", "5"]) == 0
    assert "--resume: --max-steps 5 applied (the run had 4)" in capsys.readouterr().out
    assert find_last_step(stage_dir("sft", 1, d)) == 5


@pytest.mark.parametrize("stage", ["base", "mid"])
def test_every_stage_resumes_its_own_run(base_dir, tmp_path, stage, capsys):
    """base and mid too: the run's settings come back from the checkpoint, the depth is the one
    with the stage's checkpoint, and a finished run says so."""
    d = _copy(base_dir, tmp_path, stage)
    seq = random.choice([32, 64])
    argv = [
        stage,
        "--device",
        "cpu",
        "--seq-len",
        str(seq),
        "--device-batch-size",
        "2",
        "--total-batch-size",
        str(2 * seq),
        "--max-steps",
        "3",
        "--eval-every",
        "0",
        "--quiet",
        "--base-dir",
        str(d),
    ]
    if stage == "base":
        rnd = random.Random()
        text = d / "text"
        text.mkdir()
        for name in ("a.txt", "b.txt"):
            (text / name).write_text(
                "\n\n".join(" ".join(rnd.choice("the cat sat on a mat".split()) for _ in range(30)) for _ in range(60))
            )
        argv += ["--depth", "1", "--data-dir", str(text), "--bpb-tokens", "256"]
    else:
        shutil.move(d / "mid_checkpoints", d / "base_checkpoints")  # what mid starts from
        argv += ["--tasks", "tiny"]
    assert main(argv + ["--stop-at-step", "1"]) == 0
    assert (
        f"stopped at step 1 of 3; continue with: rustchat {stage} --resume --depth 1 --base-dir {d}"
        in capsys.readouterr().out
    )
    assert main([stage, "--resume", "--base-dir", str(d)]) == 0
    meta = latest_meta(stage_dir(stage, 1, d))
    assert meta["step"] == 3 and meta["config"]["seq_len"] == seq and meta["config"]["device"] == "cpu"
    capsys.readouterr()
    assert main([stage, "--resume", "--base-dir", str(d)]) == 0
    assert "already at step 3 of 3" in capsys.readouterr().out


def test_resume_reads_a_checkpoint_saved_before_the_batch_flag_was_renamed(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "renamed")
    train_sft(STAGE_CONFIGS["sft"](depth=1, max_steps=3, stop_at_step=1, base_dir=str(d), **TINY))
    ck = stage_dir("sft", 1, d)
    meta_path = ck / "meta_000001.json"
    meta = json.loads(meta_path.read_text())
    cfg = meta["config"]
    cfg["total_batch_size"] = cfg.pop("total_batch_conversations")  # as older checkpoints have it
    meta_path.write_text(json.dumps(meta))
    resumed = resolve_run(STAGE_CONFIGS["sft"](resume=True, base_dir=str(d)))
    assert resumed.total_batch_conversations == 4 and resumed.depth == 1 and resumed.tasks == "tiny"


def test_a_flag_newer_than_the_checkpoint_is_refused_on_resume(base_dir, tmp_path):
    """A run saved before a flag existed cannot take it on --resume (it would be silently
    ignored); without the flag it resumes, and a flag that may change on resume is applied."""
    d = _copy(base_dir, tmp_path, "newer")
    train_sft(STAGE_CONFIGS["sft"](depth=1, max_steps=3, stop_at_step=1, base_dir=str(d), **TINY))
    meta_path = stage_dir("sft", 1, d) / "meta_000001.json"
    meta = json.loads(meta_path.read_text())
    default = STAGE_CONFIGS["sft"]()
    del meta["config"]["seed"], meta["config"]["eval_every"]  # as if both flags were newer
    meta_path.write_text(json.dumps(meta))
    seed = default.seed + random.randint(1, 1000)
    with pytest.raises(RustchatError, match="the run was saved before --seed existed"):
        resolve_run(STAGE_CONFIGS["sft"](resume=True, base_dir=str(d), seed=seed))
    every = default.eval_every + random.randint(1, 50)
    resumed = resolve_run(STAGE_CONFIGS["sft"](resume=True, base_dir=str(d), eval_every=every))
    assert resumed.eval_every == every and resumed.tasks == "tiny"
    assert resolve_run(STAGE_CONFIGS["sft"](resume=True, base_dir=str(d))).seed == default.seed


def test_the_old_sft_batch_flag_refuses_with_a_hint(capsys):
    err = _one_line_error(["sft", "--total-batch-size", "8"], capsys)
    assert "--total-batch-conversations" in err
    with pytest.raises(RustchatError, match="--total-batch-conversations"):
        STAGE_CONFIGS["sft"](total_batch_size=8)
    assert STAGE_CONFIGS["mid"](total_batch_size=4096).total_batch_size == 4096  # base/mid count tokens


# ----------------------------------------------------------------------------- a fresh run never hides
@pytest.mark.slow
def test_a_fresh_run_over_an_old_one_is_refused_or_archived(base_dir, tmp_path, capsys):
    d = _copy(base_dir, tmp_path, "fresh")
    ck = stage_dir("sft", 1, d)
    old_steps = random.randint(3, 5)
    train_sft(STAGE_CONFIGS["sft"](depth=1, max_steps=old_steps, save_every=1, base_dir=str(d), **TINY))
    old = latest_meta(ck)
    assert old["run_id"] and all(
        json.loads((ck / f"meta_{s:06d}.json").read_text())["run_id"] == old["run_id"] for s in range(1, old_steps + 1)
    )
    argv = [
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
        "--base-dir",
        str(d),
    ]
    err = _one_line_error(argv, capsys)
    assert f"holds run {old['run_id']} (up to step {old_steps})" in err and "--resume" in err and "--force" in err
    assert find_last_step(ck) == old_steps  # nothing touched
    # a forced start that fails before its first step loses nothing either
    _one_line_error(argv + ["--force", "--task-dir", str(tmp_path / "no_such_dir")], capsys)
    assert find_last_step(ck) == old_steps and not (ck / "archived").exists()
    assert main(argv + ["--force"]) == 0
    out = capsys.readouterr().out
    archive = ck / "archived" / old["run_id"]
    assert f"archived the previous run {old['run_id']} (up to step {old_steps}) to {archive}" in out
    assert find_last_step(archive) == old_steps
    # the directory's latest checkpoint is the new run's: every loader now sees step 2
    new = latest_meta(ck)
    assert new["step"] == 2 and new["run_id"] != old["run_id"]
    assert load_stage_model("sft", base_dir=d)[2]["step"] == 2
    _one_line_error(argv + ["--resume", "--force"], capsys)


def test_speedrun_refuses_before_any_work_over_an_earlier_run(tmp_path, capsys):
    from rustchat.speedrun import PRESETS

    depth = PRESETS["tiny"]["common"]["depth"]
    save_checkpoint(
        stage_dir("mid", depth, tmp_path), 7, GPT(GPTConfig.from_depth(1, vocab_size=300, sequence_len=32)), None, {}
    )
    err = _one_line_error(["speedrun", "--device", "cpu", "--quiet", "--base-dir", str(tmp_path)], capsys)
    assert "--force" in err and "step 7" in err
    assert not (tmp_path / "tokenizer").exists()  # refused before the tokenizer was trained


# ----------------------------------------------------------------------------- one writer per directory
@pytest.mark.e2e
@pytest.mark.slow
def test_a_second_concurrent_run_fails_naming_the_first(base_dir, tmp_path):
    d = _copy(base_dir, tmp_path, "locked")
    env = {**os.environ, "RUSTCHAT_BASE_DIR": str(d), "OMP_NUM_THREADS": "1"}
    args = [
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
        "--eval-every",
        "0",
        "--quiet",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "rustchat.cli", *args, "--max-steps", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lock = stage_dir("sft", 1, d) / StageLock.NAME
    try:
        for _ in range(3000):  # until the first run holds the lock (bounded, not timed)
            if lock.exists() and lock.read_text().strip() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(
            [sys.executable, "-m", "rustchat.cli", *args, "--max-steps", "2"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        err = second.stderr.strip()
        assert second.returncode == 2 and err.startswith("rustchat: error: ") and "\n" not in err, err
        assert f"is in use by another run (pid {first.pid} " in err and "rustchat sft" in err
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        first.wait(timeout=60)
    # the crashed holder left its lock file with a dead pid: the next writer takes it over
    assert lock.exists() and json.loads(lock.read_text())["pid"] == first.pid
    with StageLock(stage_dir("sft", 1, d)) as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.fd is not None
    assert not lock.exists()


# ----------------------------------------------------------------------------- one way to pick a depth
def test_every_command_picks_the_depth_the_same_way(base_dir, tmp_path, capsys):
    d = _copy(base_dir, tmp_path, "depths")
    # SFT without --depth starts from the one depth with a mid checkpoint
    assert resolve_run(STAGE_CONFIGS["sft"](base_dir=str(d), **TINY)).depth == 1
    assert resolve_run(STAGE_CONFIGS["base"](base_dir=str(d))).depth == 10  # a new model: nothing to pick from
    extra = random.choice([2, 3])
    save_checkpoint(
        stage_dir("mid", extra, d), 0, GPT(GPTConfig.from_depth(extra, vocab_size=300, sequence_len=64)), None, {}
    )
    with pytest.raises(RustchatError, match=rf"mid checkpoints at depths 1, {extra}: choose one with --depth"):
        resolve_run(STAGE_CONFIGS["sft"](base_dir=str(d), **TINY))
    err = _one_line_error(["export", "-i", "mid", "--base-dir", str(d), "--out", str(tmp_path / "x")], capsys)
    assert f"depths 1, {extra}: choose one with --depth" in err
    assert resolve_run(STAGE_CONFIGS["sft"](depth=extra, base_dir=str(d), **TINY)).depth == extra
    with pytest.raises(RustchatError, match="no sft checkpoint"):
        resolve_run(STAGE_CONFIGS["sft"](depth=extra, resume=True, base_dir=str(d)))


# ----------------------------------------------------------------------------- the command line's small things
@pytest.mark.e2e
def test_version_names_package_and_core():
    from importlib.metadata import version

    import rustchat

    r = subprocess.run([sys.executable, "-m", "rustchat.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert r.stdout.strip() == f"rustchat {version('rustchat')} (core {rustchat._core.__version__})"


@pytest.mark.parametrize(
    "argv,command",
    [
        (["sft", "--dept", "2"], "rustchat sft"),
        (["chat", "--temp", "1"], "rustchat chat"),
        (["tok", "train", "--input", "x", "--vocab", "300"], "rustchat tok train"),
    ],
)
def test_flag_errors_name_the_subcommand_help_and_refuse_abbreviations(argv, command, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"{command}: error: unrecognized arguments: {argv[-2]}") and err.endswith(
        f"(see {command} --help)"
    )


def test_chat_and_serve_sample_at_one_default_temperature():
    from rustchat.chat import ChatSession
    from rustchat.config import ChatConfig, ServeConfig
    from rustchat.serve import create_app, parse_request
    import inspect

    t = ChatConfig().temperature
    assert ServeConfig().temperature == t
    assert parse_request({"messages": [{"role": "user", "content": "hi"}]})["temperature"] == t
    for fn in (ChatSession.__init__, create_app, parse_request):
        assert inspect.signature(fn).parameters["temperature"].default == t
