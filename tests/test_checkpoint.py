"""Checkpoint round trip, atomic writes, safe loading, nanochat import."""

import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from ref_gpt import ref_forward  # noqa: E402

from rustchat.checkpoint import (  # noqa: E402
    build_model_from_meta,
    capture_rng_state,
    find_last_step,
    load_checkpoint,
    load_stage_model,
    load_optimizer_states,
    restore_rng_state,
    save_checkpoint,
    stage_dir,
)
from rustchat.common import RustchatError  # noqa: E402
from rustchat.model import GPT, GPTConfig  # noqa: E402
from rustchat.nanochat_import import import_nanochat_model  # noqa: E402

from helpers import fake_nanochat_dir  # noqa: E402


def tiny_cfg():
    return GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def train_steps(model, opts, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 300, (2, 16), generator=g)
        model(idx, idx.roll(-1, dims=1)).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)


def test_round_trip_restores_outputs_and_next_step(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_cfg())
    opts = model.setup_optimizers()
    train_steps(model, opts, 3, seed=1)
    random.seed(7)
    np.random.seed(7)
    meta = {"data_cursor": {"shard": 3, "row": 1234}, "rng": capture_rng_state(), "val_bpb": 1.5}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt = stage_dir("base", 2, tmp_path)
    save_checkpoint(ckpt, 3, model, opts, meta)
    assert sorted(os.listdir(ckpt)) == ["meta_000003.json", "model_000003.safetensors", "optim_000003_rank0.pt"]
    assert find_last_step(ckpt) == 3

    model_state, optim_states, meta2 = load_checkpoint(ckpt, device="cpu")
    assert meta2["step"] == 3 and meta2["data_cursor"] == {"shard": 3, "row": 1234}
    assert meta2["model_config"] == tiny_cfg().to_dict()
    model2 = build_model_from_meta(meta2, "cpu", model_state)
    opts2 = model2.setup_optimizers()
    load_optimizer_states(opts2, optim_states)

    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), model2(idx))
    train_steps(model, opts, 2, seed=9)
    train_steps(model2, opts2, 2, seed=9)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)

    # RNG states survive json
    restore_rng_state(meta2["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_load_model_picks_last_complete_and_largest_depth(tmp_path):
    model = GPT(tiny_cfg())
    for step in (10, 20):
        save_checkpoint(stage_dir("sft", 2, tmp_path), step, model, None, {})
    d = stage_dir("sft", 2, tmp_path)
    # leftovers of an interrupted save: a temp file and a step without meta
    (d / ".model_000030.safetensors.abc123.tmp").write_bytes(b"partial")
    (d / "model_000030.safetensors").write_bytes(b"no meta, so incomplete")
    assert find_last_step(d) == 20
    m2, optim_states, meta = load_stage_model("sft", base_dir=tmp_path)
    assert meta["step"] == 20 and optim_states is None
    with torch.no_grad():
        idx = torch.randint(0, 300, (1, 8))
        assert torch.equal(m2(idx), model(idx))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = GPT(tiny_cfg())
    d = tmp_path / "ckpt"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("rustchat.checkpoint.save_file", boom)
    with pytest.raises(RustchatError, match=r"model_000005.safetensors: cannot save the checkpoint \(disk full\)"):
        save_checkpoint(d, 5, model, model.setup_optimizers(), {})
    # the optimizer file went in completely, nothing else did, and the checkpoint does not count
    assert sorted(os.listdir(d)) == ["optim_000005_rank0.pt"]
    assert find_last_step(d) is None


def test_missing_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(RustchatError, match="run the mid stage first"):
        load_stage_model("mid", 4, base_dir=tmp_path)
    with pytest.raises(RustchatError, match="run the base stage first"):
        load_stage_model("base", base_dir=tmp_path)
    stage_dir("sft", 4, tmp_path).mkdir(parents=True)
    with pytest.raises(RustchatError, match="run the sft stage first") as e:
        load_checkpoint(stage_dir("sft", 4, tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(RustchatError):
        stage_dir("pretrain", 4, tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_never_unpickles_code(tmp_path):
    model = GPT(tiny_cfg())
    d = tmp_path / "ckpt"
    save_checkpoint(d, 1, model, model.setup_optimizers(), {})
    torch.save([_Evil()], d / "optim_000001_rank0.pt")
    with pytest.raises(RustchatError, match="cannot load"):
        load_checkpoint(d)
    load_checkpoint(d, load_optimizer=False)  # weights + meta still fine


def test_meta_rejects_non_json(tmp_path):
    model = GPT(tiny_cfg())
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c", 1, model, None, {"bad": object()})
    assert find_last_step(tmp_path / "c") is None


# ---------------------------------------------------------------------------
# nanochat import


@pytest.mark.parametrize(
    "padded_rows,prefix,wte_dtype", [(300, "", torch.float32), (320, "_orig_mod.", torch.bfloat16)]
)
def test_nanochat_import_matches_reference(tmp_path, padded_rows, prefix, wte_dtype):
    sd, cfg = fake_nanochat_dir(tmp_path, padded_rows, prefix, wte_dtype)
    model, meta = import_nanochat_model(tmp_path)
    assert meta["step"] == 650 and model.config.n_kv_head == 2
    idx = torch.randint(0, 300, (2, 12))
    # a January-2026 nanochat model (48abd7d): its rotary tables are bf16
    ref = ref_forward({k: v.double() for k, v in sd.items()}, {**cfg, "rope_bf16": True}, idx)
    with torch.no_grad():
        ours = model.double()(idx)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_nanochat_import_rejects_unknown_architecture(tmp_path):
    sd, _ = fake_nanochat_dir(tmp_path, 300, "")
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "model_000650.pt")
    with pytest.raises(RustchatError, match="unsupported nanochat model"):
        import_nanochat_model(tmp_path, step=650)
    with pytest.raises(RustchatError):
        import_nanochat_model(tmp_path / "nope")
