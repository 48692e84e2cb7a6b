"""Broken or hostile artifact files give one-line errors naming the file, through the CLI
(`rustchat chat`, `eval`, `sft`, `import-nanochat`: exit code 2, one stderr line), never a
traceback, a hang or a NaN; and imports never replace a tokenizer or checkpoint unasked."""

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading

import pytest
import tiktoken
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import load_checkpoint, save_checkpoint, stage_dir
from rustchat.cli import main
from rustchat.model import GPT, GPTConfig

from helpers import fake_nanochat_dir, words

SFT_META = "sft_checkpoints/d1/meta_000005.json"
SFT_MODEL = "sft_checkpoints/d1/model_000005.safetensors"
MID_META = "mid_checkpoints/d1/meta_000000.json"


@pytest.fixture(scope="module")
def good_base(tmp_path_factory):
    """Tokenizer (300 ids), a mid checkpoint at step 0 and an SFT checkpoint at step 5, depth 1."""
    d = tmp_path_factory.mktemp("artifacts")
    rng = random.Random()
    tok = Tokenizer.train([words(rng, 40) for _ in range(200)], vocab_size=300)
    tok.save(d / "tokenizer")
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    save_checkpoint(stage_dir("mid", 1, d), 0, model, model.setup_optimizers(), {"stage": "mid"})
    save_checkpoint(stage_dir("sft", 1, d), 5, model, None, {"stage": "sft"})
    return d


@pytest.fixture
def base(good_base, tmp_path, monkeypatch):
    d = tmp_path / "base"
    shutil.copytree(good_base, d)
    monkeypatch.setenv("RUSTCHAT_BASE_DIR", str(d))
    return d


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("rustchat: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _chat(capsys):
    return _one_line_error(capsys, ["chat", "-p", "hi", "--device", "cpu", "--max-tokens", "4"])


def _edit_meta(path, edit):
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


def test_intact_artifacts_chat(base, capsys):
    assert main(["chat", "-p", "hi", "--device", "cpu", "--max-tokens", "4", "--seed", "1"]) == 0
    capsys.readouterr()


def test_truncated_safetensors(base, capsys):
    p = base / SFT_MODEL
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    err = _chat(capsys)
    assert "model_000005.safetensors: not a valid safetensors file" in err and "truncated" in err


def test_safetensors_that_is_garbage(base, capsys):
    (base / SFT_MODEL).write_bytes(os.urandom(4096))
    assert "model_000005.safetensors: not a valid safetensors file" in _chat(capsys)


def test_meta_bad_json(base, capsys):
    (base / SFT_META).write_text('{"step": 5, "model_config": ')
    assert "meta_000005.json: checkpoint meta is not valid JSON" in _chat(capsys)


def test_meta_is_a_list(base, capsys):
    (base / SFT_META).write_text("[1, 2, 3]")
    err = _one_line_error(capsys, ["eval", "--tasks", "arithmetic", "--max-problems", "1", "--device", "cpu"])
    assert "meta_000005.json: checkpoint meta is a JSON list, expected an object" in err


def test_meta_without_model_config(base, capsys):
    _edit_meta(base / MID_META, lambda m: {k: v for k, v in m.items() if k != "model_config"})
    err = _one_line_error(
        capsys, ["sft", "--depth", "1", "--device", "cpu", "--tasks", "tiny", "--max-steps", "1", "--quiet", "--force"]
    )  # (the base dir also holds an SFT run)
    assert "meta_000000.json: no 'model_config' object" in err


@pytest.mark.parametrize(
    "key,value", [("n_head", 0), ("n_embd", -64), ("n_layer", 10**9), ("vocab_size", "300"), ("n_kv_head", 3)]
)
def test_meta_with_bad_model_config(base, capsys, key, value):
    _edit_meta(base / SFT_META, lambda m: {**m, "model_config": {**m["model_config"], key: value}})
    err = _chat(capsys)
    assert "meta_000005.json: model_config" in err and (key in err or "n_kv_head" in err)


def test_weights_not_matching_meta(base, capsys):
    _edit_meta(base / SFT_META, lambda m: {**m, "model_config": {**m["model_config"], "n_layer": 2}})
    assert "model_000005.safetensors: tensors do not match the model_config" in _chat(capsys)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_at_load(base, capsys, bad):
    model = GPT(GPTConfig.from_depth(1, vocab_size=300, sequence_len=64))
    with torch.no_grad():
        model.lm_head.weight[random.randrange(300), random.randrange(64)] = bad
    save_checkpoint(stage_dir("sft", 1, base), 5, model, None, {"stage": "sft"})
    err = _chat(capsys)
    assert "model_000005.safetensors: tensor lm_head.weight holds NaN or infinite values" in err


def test_bad_ranks_line(base, capsys):
    p = base / "tokenizer" / "ranks.tiktoken"
    lines = p.read_text().splitlines()
    k = random.randrange(len(lines))
    lines[k] = lines[k].split()[0] + " minus-one"
    p.write_text("\n".join(lines) + "\n")
    assert f"ranks.tiktoken line {k + 1}: invalid literal" in _chat(capsys)


def test_tokenizer_json_not_an_object(base, capsys):
    (base / "tokenizer" / "tokenizer.json").write_text('"hello"')
    assert "tokenizer.json: field 'format' must be" in _chat(capsys)


def _cli_subprocess(args, base, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rustchat.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RUSTCHAT_BASE_DIR": str(base)},
        timeout=timeout,
    )


def _main_with_timeout(argv, fifo, seconds=60):
    """main(argv) in a thread; if it is still running after `seconds` (blocked reading `fifo`),
    give the reader an EOF so the thread ends, and fail."""
    result = []
    worker = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer that leaves: the reader sees EOF
        worker.join(10)
        pytest.fail(f"rustchat {' '.join(argv)} hung reading the FIFO {fifo}")
    return result[0]


@pytest.mark.parametrize("which", [SFT_MODEL, SFT_META, "tokenizer/ranks.tiktoken"])
def test_fifo_is_refused_without_reading(base, capsys, which):
    p = base / which
    p.unlink()
    os.mkfifo(p)
    code = _main_with_timeout(["chat", "-p", "hi", "--device", "cpu", "--max-tokens", "4"], p)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"rustchat: error: {p}: ") and "not a regular file" in err


@pytest.mark.parametrize("which", [SFT_MODEL, "tokenizer/ranks.tiktoken"])
def test_link_to_dev_zero_is_refused_without_reading(base, which):
    p = base / which
    p.unlink()
    os.symlink("/dev/zero", p)
    # a subprocess with a timeout: reading /dev/zero would fill this process's memory
    r = _cli_subprocess(["chat", "-p", "hi", "--device", "cpu", "--max-tokens", "4"], base)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err, err
    assert err.startswith(f"rustchat: error: {p}: ") and "not a regular file" in err


def test_fifo_optimizer_state_is_refused(base):
    optim = stage_dir("mid", 1, base) / "optim_000000_rank0.pt"
    optim.unlink()
    os.mkfifo(optim)
    with pytest.raises(Exception, match="optim_000000_rank0.pt: optimizer state is a FIFO, not a regular file"):
        load_checkpoint(stage_dir("mid", 1, base), load_optimizer=True)


# --------------------------------------------------------------------------- nanochat imports


def _tokenizer_pkl(path, seed=0):
    """A pickled tiktoken Encoding of a freshly trained 300-id tokenizer (what nanochat saves)."""
    rng = random.Random(seed)
    tok = Tokenizer.train([words(rng, 30) for _ in range(100)], vocab_size=300)
    enc = tiktoken.Encoding(
        "rustbpe", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(), special_tokens=tok.special_tokens
    )
    path.write_bytes(pickle.dumps(enc))
    return tok


@pytest.fixture
def nanochat_dir(tmp_path):
    ck = tmp_path / "nanochat" / "base_checkpoints" / "d2"
    ck.mkdir(parents=True)
    fake_nanochat_dir(ck, 300, "")
    _tokenizer_pkl(ck / "tokenizer.pkl")
    return ck


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda ck: (ck / "meta_000650.json").write_text("[]"), "meta_000650.json: nanochat meta is a JSON list"),
        (
            lambda ck: _edit_meta(
                ck / "meta_000650.json", lambda m: {**m, "model_config": {**m["model_config"], "n_head": 0}}
            ),
            "meta_000650.json: model_config n_head=0",
        ),
        (lambda ck: (ck / "model_000650.pt").write_bytes(b"PK\x03\x04 truncated"), "model_000650.pt: cannot read"),
        (lambda ck: (ck / "tokenizer.pkl").write_bytes(b"\x80\x04\x95garbage"), "tokenizer.pkl: not a pickled"),
    ],
)
def test_corrupt_nanochat_files(nanochat_dir, tmp_path, capsys, corrupt, message):
    corrupt(nanochat_dir)
    err = _one_line_error(capsys, ["import-nanochat", str(nanochat_dir), "--base-dir", str(tmp_path / "rc")])
    assert message in err


def test_nanochat_fifo_weights_do_not_hang(nanochat_dir, tmp_path, capsys):
    fifo = nanochat_dir / "model_000650.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    assert _main_with_timeout(["import-nanochat", str(nanochat_dir), "--base-dir", str(tmp_path / "rc")], fifo) == 2
    assert "model_000650.pt: nanochat weights is a FIFO" in capsys.readouterr().err


def test_import_never_replaces_without_force(nanochat_dir, tmp_path, capsys):
    rc = tmp_path / "rc"
    args = ["import-nanochat", str(nanochat_dir), "--base-dir", str(rc)]
    assert main(args) == 0
    # the same import again would replace the step-650 checkpoint
    err = _one_line_error(capsys, args)
    assert f"would replace checkpoint step 650 in {rc / 'base_checkpoints' / 'd2'}" in err and "--force" in err
    # another run's tokenizer in the base dir: named, and nothing is written
    other = _tokenizer_pkl(tmp_path / "other.pkl", seed=1)
    shutil.rmtree(rc / "base_checkpoints")
    before = (rc / "tokenizer" / "ranks.tiktoken").read_bytes()
    err = _one_line_error(capsys, args + ["--tokenizer", str(tmp_path / "other.pkl")])
    assert f"would replace the tokenizer in {rc / 'tokenizer'}" in err
    assert (rc / "tokenizer" / "ranks.tiktoken").read_bytes() == before and not (rc / "base_checkpoints").exists()
    # --force replaces both
    assert main(args + ["--tokenizer", str(tmp_path / "other.pkl"), "--force"]) == 0
    assert Tokenizer.load(rc / "tokenizer").mergeable_ranks() == other.mergeable_ranks()
    capsys.readouterr()
