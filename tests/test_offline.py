"""Offline is a first-class state: with HF_HUB_OFFLINE=1 nothing connects anywhere, without it a
missing network is found by one connection attempt (not the download libraries' retries); the
errors name real flags (--task-dir with the exact file, --tasks tiny, speedrun --preset tiny),
and `eval --task-dir` reads local copies like mid and SFT do. Connection attempts are counted
in a fresh process, not timed."""

import os
import random
import subprocess
import sys

import pytest
from helpers import arc_rows, write_jsonl

# Runs `rustchat ARGS...` in this process after wrapping socket.connect, then prints the number
# of connection attempts on the last line of stderr.
COUNTING = """
import socket, sys
attempts = []
_connect = socket.socket.connect
def connect(self, address):
    attempts.append(address)
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: (attempts.append(address), _connect(self, address))[1] or 0
from rustchat.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print(f"connection attempts: {len(attempts)}", file=sys.stderr)
sys.exit(code)
"""


def _run(args, env_extra, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HTTP", "HTTPS", "ALL_PROXY"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update({"HF_HOME": str(tmp_path / "hf_home"), **env_extra})  # an empty cache
    r = subprocess.run([sys.executable, "-c", COUNTING, *args], capture_output=True, text=True, env=env, timeout=600)
    lines = r.stderr.strip().splitlines()
    attempts = int(lines[-1].rsplit(" ", 1)[1])
    return r.returncode, lines[:-1], attempts


def _assert_offline_error(code, lines, stem):
    assert code == 2 and len(lines) == 1 and lines[0].startswith("rustchat: error: "), lines
    err = lines[0]
    assert f"--task-dir DIR holding {stem}.jsonl" in err, err
    assert "--tasks tiny" in err and "rustchat speedrun --preset tiny" in err, err
    assert "path=" not in err  # no hint that is not a flag


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,stem", [("arc-easy", "arc-ARC-Easy-test"), ("gsm8k", "gsm8k-test"), ("mmlu", "mmlu-all-test")]
)
def test_hub_offline_mode_asks_no_network(tmp_path, task, stem):
    code, lines, attempts = _run(
        ["eval", "-i", "sft", "--tasks", task, "--base-dir", str(tmp_path)], {"HF_HUB_OFFLINE": "1"}, tmp_path
    )
    _assert_offline_error(code, lines, stem)
    assert attempts == 0


@pytest.mark.slow
def test_no_network_is_found_by_one_attempt(tmp_path):
    # nothing listens on port 9 of the loopback: a network that refuses, at once
    endpoint = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    code, lines, attempts = _run(
        ["eval", "-i", "sft", "--tasks", "arc-easy,gsm8k", "--base-dir", str(tmp_path)], endpoint, tmp_path
    )
    _assert_offline_error(code, lines, "arc-ARC-Easy-test")
    assert attempts == 1
    # SFT's default mixture (from a mid checkpoint): the first hub task fails the same way
    from rustchat import Tokenizer
    from rustchat.checkpoint import save_checkpoint, stage_dir
    from rustchat.model import GPT, GPTConfig

    tok = Tokenizer.train(["some text to learn from " * 20], vocab_size=270)
    tok.save(tmp_path / "tokenizer")
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    save_checkpoint(stage_dir("mid", 1, tmp_path), 3, model, None, {})
    code, lines, attempts = _run(
        ["sft", "--tasks", "default", "--device", "cpu", "--base-dir", str(tmp_path)], endpoint, tmp_path
    )
    _assert_offline_error(code, lines, "arc-ARC-Easy-train")
    assert attempts == 1
    # pretraining data: one attempt, then the way round it
    code, lines, attempts = _run(
        ["base", "--depth", "1", "--device", "cpu", "--base-dir", str(tmp_path)], endpoint, tmp_path
    )
    assert code == 2 and attempts == 1 and "--data-dir" in lines[0] and "speedrun --preset tiny" in lines[0], lines


@pytest.mark.slow
def test_eval_task_dir_reads_local_copies(tmp_path):
    """`eval --task-dir` finds arc-ARC-Easy-test.jsonl, offline, and scores its problems."""
    import torch

    from rustchat import Tokenizer
    from rustchat.checkpoint import save_checkpoint, stage_dir
    from rustchat.model import GPT, GPTConfig

    rng = random.Random()
    n = rng.randint(3, 9)
    td = tmp_path / "tasks"
    td.mkdir()
    write_jsonl(td / "arc-ARC-Easy-test.jsonl", arc_rows(rng, n))
    tok = Tokenizer.train(["A B C D E the answer is " * 50], vocab_size=270)
    tok.save(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=256))
    save_checkpoint(stage_dir("sft", 1, tmp_path), 3, model, None, {})
    code, lines, attempts = _run(
        [
            "eval",
            "-i",
            "sft",
            "--tasks",
            "arc-easy",
            "--task-dir",
            str(td),
            "--device",
            "cpu",
            "--quiet",
            "--base-dir",
            str(tmp_path),
        ],
        {"HF_HUB_OFFLINE": "1"},
        tmp_path,
    )
    assert code == 0 and attempts == 0, lines
    report = (tmp_path / "report.md").read_text()
    assert f"| ARC-Easy | categorical | {n} |" in report
