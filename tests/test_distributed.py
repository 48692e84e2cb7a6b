"""Sharded optimizer state across gloo processes on the CPU: training on 2 and 4 ranks equals
one process, each rank holds about 1/world of the state, and a checkpoint written by one
world size resumes on another (the multi-process test is marked slow: start-up of 6 processes);
data cursors across a change of world size."""

import contextlib
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from rustchat.checkpoint import load_checkpoint, load_optimizer_states, save_checkpoint
from rustchat.model import GPT, GPTConfig
from rustchat.optim import optimizer_state_bytes
from rustchat.trainer import train_step

RECIPES = ("2026", "classic")
STEPS, SAVE_AT, ROWS = 3, 2, 4


def _cfg():  # 4 matrices of every shape, and vocab rows divisible by 4: every rank owns a share
    return GPTConfig(sequence_len=16, vocab_size=256, n_layer=4, n_head=2, n_kv_head=1, n_embd=64)


def _fresh_model():
    torch.manual_seed(5)
    model = GPT(_cfg())
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, 256, (ROWS, 16), generator=g)
    y = torch.randint(0, 256, (ROWS, 16), generator=g)
    y[: ROWS // 2, :5] = -1  # unequal trained-token counts per rank
    return x, y


def _train(model, opts, start, stop, rank, world, save_dir=None):
    per = ROWS // world
    for step in range(start, stop):
        x, y = _batch(step)
        train_step(
            model,
            opts,
            [(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])],
            torch.device("cpu"),
            contextlib.nullcontext,
        )
        if save_dir is not None and step + 1 == SAVE_AT:
            save_checkpoint(save_dir, SAVE_AT, model, opts, {}, rank=rank)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()


def _resume(ckpt_dir, recipe, rank, world):
    state, optim_states, _ = load_checkpoint(ckpt_dir, SAVE_AT, load_optimizer=True)
    model = GPT(_cfg())
    model.load_state_dict(state)
    opts = model.setup_optimizers(recipe=recipe, weight_decay=0.1)
    load_optimizer_states(opts, optim_states)
    _train(model, opts, SAVE_AT, STEPS, rank, world)
    return model


def _state_tensor_bytes(opts):
    return sum(
        t.numel() * t.element_size() for o in opts for st in o.state.values() for t in st.values() if torch.is_tensor(t)
    )


def _worker(rank, world, port, out_dir, resume_from):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for recipe in RECIPES:
            model = _fresh_model()
            opts = model.setup_optimizers(recipe=recipe, weight_decay=0.1)
            _train(model, opts, 0, STEPS, rank, world, save_dir=os.path.join(out_dir, f"ckpt{world}_{recipe}"))
            out[recipe] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "bytes": _state_tensor_bytes(opts),
                "predicted": optimizer_state_bytes(opts),
            }
            if resume_from:
                resumed = _resume(os.path.join(out_dir, f"ckpt{resume_from}_{recipe}"), recipe, rank, world)
                out[recipe]["resumed"] = [p.detach().clone() for p in resumed.parameters()]
        torch.save(out, os.path.join(out_dir, f"w{world}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, outliers=4):
    """Equal up to fp32 noise: the ranks sum their gradients in another order than one process
    does. AdamW's first steps move an element by about lr * sign(g), so an element whose
    gradient is within rounding noise of zero may differ by a step: a few such are allowed
    (measured: 2 of 16,384 embedding elements in one run)."""
    for x, y in zip(a, b):
        bad = ~torch.isclose(x, y, rtol=1e-4, atol=2e-5)
        assert int(bad.sum()) <= outliers, (tuple(x.shape), int(bad.sum()), float((x - y).abs().max()))
        assert float((x - y).abs().max()) < 1e-2


@pytest.mark.slow
def test_two_and_four_ranks_match_one_and_resume_across_world_sizes():
    with tempfile.TemporaryDirectory() as d:
        single = {}
        for recipe in RECIPES:
            model = _fresh_model()
            opts = model.setup_optimizers(recipe=recipe, weight_decay=0.1)
            _train(model, opts, 0, STEPS, 0, 1, save_dir=os.path.join(d, f"ckpt1_{recipe}"))
            single[recipe] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "bytes": _state_tensor_bytes(opts),
            }
            assert optimizer_state_bytes(opts) == single[recipe]["bytes"]
        # 2 ranks resume the 1-rank checkpoint, 4 ranks the 2-rank one, 1 rank the 4-rank one
        for world, resume_from in ((2, 1), (4, 2)):
            mp.start_processes(
                _worker, args=(world, _free_port(), d, resume_from), nprocs=world, join=True, start_method="spawn"
            )
        runs = {
            w: [torch.load(os.path.join(d, f"w{w}_rank{r}.pt"), weights_only=True) for r in range(w)] for w in (2, 4)
        }
        for recipe in RECIPES:
            want = single[recipe]["params"]
            for w, ranks in runs.items():
                for r, res in enumerate(ranks):
                    _close(res[recipe]["params"], want)
                    _close(res[recipe]["resumed"], want)
                    assert res[recipe]["bytes"] == res[recipe]["predicted"]
                    # about 1/world of the whole: every rank owns whole matrices and AdamW rows
                    assert res[recipe]["bytes"] <= single[recipe]["bytes"] / w * 1.05, (recipe, w, r)
                assert sum(res[recipe]["bytes"] for res in ranks) == pytest.approx(single[recipe]["bytes"], rel=0.02)
                for res in ranks[1:]:  # every rank holds the same parameters
                    for a, b in zip(res[recipe]["params"], ranks[0][recipe]["params"]):
                        assert torch.equal(a, b)
            resumed = _resume(os.path.join(d, f"ckpt4_{recipe}"), recipe, 0, 1)
            _close([p.detach() for p in resumed.parameters()], want)


@pytest.mark.parametrize("old_world,new_world", [(2, 4), (4, 1), (3, 2)])
def test_data_cursors_move_to_another_world_size(old_world, new_world):
    """Per-rank pretraining cursors are remapped (each new rank starts past every group an old
    rank had begun, so nothing is trained twice); cursors all ranks share (SFT) carry over;
    a loader without a remap is refused in one line."""
    from rustchat.common import RustchatError
    from rustchat.data.pretrain import PretrainLoader
    from rustchat.trainer import data_state_for_rank

    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    old = [
        dict(
            file=int(torch.randint(0, 3, (), generator=g)),
            group=int(torch.randint(0, 50, (), generator=g)),
            doc=3,
            skip=7,
            epoch=1,
        )
        for _ in range(old_world)
    ]
    meta = {"data_states": old}
    new = [data_state_for_rank(meta, r, new_world, PretrainLoader.reshard) for r in range(new_world)]
    last = max((s["epoch"], s["file"], s["group"]) for s in old)
    for s in new:
        assert (s["epoch"], s["file"], s["group"]) == (last[0], last[1], last[2] + 1) and s["doc"] == s["skip"] == 0
    same = [{"pos": 12, "epoch": 0}] * old_world
    assert data_state_for_rank({"data_states": same}, new_world - 1, new_world) == {"pos": 12, "epoch": 0}
    assert data_state_for_rank(meta, 0, old_world) == old[0]
    if len({tuple(s.values()) for s in old}) > 1:
        with pytest.raises(RustchatError, match=f"written by {old_world} ranks"):
            data_state_for_rank(meta, 0, new_world)
