"""Muon / AdamW against hand-written steps, schedules, and 2-process gradient all-reduce."""
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from rustchat.model import GPT, GPTConfig
from rustchat.optim import Muon, all_reduce_grads, build_optimizers, zeropower_via_newtonschulz5
from rustchat.schedules import (
    apply_lr_multiplier,
    base_lr_multiplier,
    mid_lr_multiplier,
    muon_momentum,
    set_muon_momentum,
    sft_lr_multiplier,
)


def tiny_cfg():
    return GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_orthogonalises(shape, dtype):
    G = torch.randn(shape, dtype=torch.float64)
    O = zeropower_via_newtonschulz5(G, 5, dtype)
    assert O.dtype == dtype and O.shape == G.shape
    O = O.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    M = U.T @ O @ Vh.T  # diagonal iff O keeps G's singular vectors
    diag = torch.diagonal(M)
    off = M - torch.diag(diag)
    # the quintic pushes every singular value into ~[0.68, 1.14] rather than exactly 1;
    # bf16 rounding (8-bit mantissa) leaves a few percent of off-diagonal mass
    assert diag.min() > 0.6 and diag.max() < 1.25, (diag.min(), diag.max())
    assert off.norm() / diag.norm() < (0.05 if dtype == torch.bfloat16 else 1e-4)


def ns_reference(G, steps=5):
    """Quintic Newton-Schulz, written out in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def test_build_optimizers_groups_and_lrs():
    model = GPT(tiny_cfg())
    adamw, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0)
    s = (64 / 768) ** -0.5
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    head, emb = adamw.param_groups
    assert head["params"] == [model.lm_head.weight] and emb["params"] == [model.transformer.wte.weight]
    assert math.isclose(head["lr"], 0.004 * s) and math.isclose(emb["lr"], 0.2 * s)
    assert head["betas"] == (0.8, 0.95) and head["eps"] == 1e-10 and head["weight_decay"] == 0.0
    assert len(muon.param_groups[0]["params"]) == 2 * 6
    assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["momentum"] == 0.95
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
    # lr_scale multiplies every lr, and is what initial_lr records
    a2, m2 = model.setup_optimizers(lr_scale=0.02)
    assert math.isclose(a2.param_groups[1]["initial_lr"], 0.2 * s * 0.02)
    assert math.isclose(m2.param_groups[0]["initial_lr"], 0.02 * 0.02)


def test_two_steps_match_hand_written_reference():
    torch.manual_seed(0)
    model = GPT(tiny_cfg())
    with torch.no_grad():  # non-zero projections so every matrix matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0)
    groups = model.param_groups()
    s = (64 / 768) ** -0.5
    lr_of = {id(model.lm_head.weight): 0.004 * s, id(model.transformer.wte.weight): 0.2 * s}
    ref = {id(p): p.detach().double().clone() for p in model.parameters()}
    state = {id(p): {} for p in model.parameters()}
    for step in range(1, 3):
        grads = {id(p): torch.randn_like(p) for p in model.parameters()}
        for p in model.parameters():
            p.grad = grads[id(p)].clone()
        for opt in opts:
            opt.step()
        # AdamW, written out (betas 0.8/0.95, eps 1e-10, no weight decay)
        for p in groups["head"] + groups["embedding"]:
            g, st = grads[id(p)].double(), state[id(p)]
            st["m"] = 0.8 * st.get("m", 0) + 0.2 * g
            st["v"] = 0.95 * st.get("v", 0) + 0.05 * g * g
            mhat, vhat = st["m"] / (1 - 0.8 ** step), st["v"] / (1 - 0.95 ** step)
            ref[id(p)] -= lr_of[id(p)] * mhat / (vhat.sqrt() + 1e-10)
        # Muon, written out: momentum 0.95, Nesterov, NS, aspect-ratio scale
        for p in groups["matrix"]:
            g, st = grads[id(p)].double(), state[id(p)]
            st["buf"] = 0.95 * st.get("buf", 0) + 0.05 * g
            u = 0.05 * g + 0.95 * st["buf"]
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            ref[id(p)] -= 0.02 * scale * ns_reference(u)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), ref[id(p)], rtol=1e-5, atol=2e-6, msg=f"{name} step {step}")


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_base_schedule():
    n = 1000
    assert base_lr_multiplier(0, n) == 1.0
    assert base_lr_multiplier(800, n) == 1.0  # last flat step
    assert math.isclose(base_lr_multiplier(900, n), 0.5)
    assert math.isclose(base_lr_multiplier(999, n), 0.005)
    assert base_lr_multiplier(1000, n) == 0.0
    assert math.isclose(base_lr_multiplier(900, n, final_lr_frac=0.1), 0.55)
    # warmup
    assert math.isclose(base_lr_multiplier(0, n, warmup_ratio=0.01), 0.1)
    assert base_lr_multiplier(9, n, warmup_ratio=0.01) == 1.0
    assert base_lr_multiplier(500, n, warmdown_ratio=0.0) == 1.0


def test_mid_sft_rl_schedules_and_momentum():
    assert mid_lr_multiplier(0.0) == 1.0 and mid_lr_multiplier(0.79) == 1.0
    assert math.isclose(mid_lr_multiplier(0.9), 0.5) and mid_lr_multiplier(1.0) == 0.0
    assert math.isclose(sft_lr_multiplier(0, 700), 0.02) and math.isclose(sft_lr_multiplier(350, 700), 0.01)
    assert sft_lr_multiplier(700, 700) == 0.0
    assert muon_momentum(0) == 0.85 and math.isclose(muon_momentum(150), 0.90) and muon_momentum(300) == 0.95
    assert muon_momentum(10_000) == 0.95

    model = GPT(tiny_cfg())
    opts = model.setup_optimizers()
    apply_lr_multiplier(opts, 0.5)
    set_muon_momentum(opts, 0.9)
    for opt in opts:
        for g in opt.param_groups:
            assert math.isclose(g["lr"], 0.5 * g["initial_lr"])
    assert opts[1].param_groups[0]["momentum"] == 0.9 and "momentum" not in opts[0].param_groups[0]


# ---------------------------------------------------------------------------
# 2 gloo processes vs 1 process, same global batch


def _batch():
    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, 300, (4, 16), generator=g)
    targets = torch.randint(0, 300, (4, 16), generator=g)
    targets[:2, :5] = -1  # unequal trained-token counts per rank
    return idx, targets


def _fresh_model():
    torch.manual_seed(5)
    model = GPT(tiny_cfg())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        idx, targets = _batch()
        rows = slice(2 * rank, 2 * rank + 2)
        model = _fresh_model()
        opts = model.setup_optimizers()
        # "sum": local sum of token losses / global trained-token count, summed over ranks
        n_global = (targets != -1).sum()
        loss = model(idx[rows], targets[rows], loss_reduction="sum") / n_global
        loss.backward()
        all_reduce_grads(model, "sum")
        grads_sum = [p.grad.clone() for p in model.parameters()]
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        # "avg": every rank's mean over an equal share (all targets trained here)
        full = idx[rows].roll(1, dims=1)
        model(idx[rows], full).backward()
        all_reduce_grads(model, "avg")
        torch.save({"grads_sum": grads_sum, "params": [p.detach().clone() for p in model.parameters()],
                    "grads_avg": [p.grad.clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_grads_two_processes_match_one():
    idx, targets = _batch()
    model = _fresh_model()
    opts = model.setup_optimizers()
    model(idx, targets).backward()  # one process, global mean
    all_reduce_grads(model)  # no-op without a process group
    grads_sum = [p.grad.clone() for p in model.parameters()]
    for opt in opts:
        opt.step()
    model.zero_grad(set_to_none=True)
    model(idx, idx.roll(1, dims=1)).backward()
    grads_avg = [p.grad.clone() for p in model.parameters()]

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=True, start_method="spawn")
        results = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    for res in results:
        for a, b in zip(res["grads_sum"], grads_sum):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(res["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(res["grads_avg"], grads_avg):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ranks hold identical parameters after the step
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
