"""`--run NAME` logs training to Weights & Biases with the real `wandb` package in offline mode
(no network): the run's .wandb file holds every step's loss, lr and tokens/s and the
evaluation results, equal to what the checkpoint records."""

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from rustchat import Tokenizer
from rustchat.checkpoint import load_checkpoint, save_checkpoint, stage_dir
from rustchat.model import GPT, GPTConfig

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang songs of spring rain".split()


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then
    LevelDB log blocks of 32 KiB, each record chunk behind a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            break
        chunks += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


@pytest.mark.e2e
@pytest.mark.slow
def test_run_logs_losses_lr_throughput_and_evals_offline(tmp_path):
    rnd = random.Random()
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 60))) for _ in range(200)]
    base = tmp_path / "base"
    tok = Tokenizer.train(docs + ["0123456789 +-*/= How many letters in word?"] * 5, vocab_size=300)
    tok.save(base / "tokenizer")
    save_checkpoint(stage_dir("mid", 1, base), 0, GPT(GPTConfig.from_depth(1, tok.vocab_size, 256)), None, {})
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    env = {
        **os.environ,
        "RUSTCHAT_BASE_DIR": str(base),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "WANDB_SILENT": "true",
        # nothing listens here: any attempt to reach a server would fail, not hang
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "rustchat.cli",
        "sft",
        "--depth",
        "1",
        "--seq-len",
        "256",
        "--device",
        "cpu",
        "--device-batch-size",
        "2",
        "--total-batch-conversations",
        "2",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--tasks",
        "tiny",
        "--run",
        "offline-test",
        "--quiet",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((wandb_dir / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    history, run_name = {}, None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_name = rec.run.display_name
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row["_step"], {}).update(row)
    assert run_name == "offline-test"
    assert sorted(history) == [1, 2, 3, 4]

    _, _, meta = load_checkpoint(stage_dir("sft", 1, base), load_optimizer=False)
    for rec in meta["history"]:
        row = history[rec["step"]]
        assert row["train/loss"] == pytest.approx(rec["loss"], rel=1e-12)
        assert row["train/tok_per_s"] == pytest.approx(rec["tok_per_s"], rel=1e-12)
        assert row["train/lr_mult"] == pytest.approx(rec["lr_mult"])
        lrs = {k: v for k, v in row.items() if k.startswith("lr/")}
        assert len(lrs) == 3 and all(v > 0 for v in lrs.values()), row  # head, embedding, matrices
    for step in (2, 4):
        assert 0 < history[step]["eval/val_loss"] < 20
    assert "eval/val_loss" not in history[1]
