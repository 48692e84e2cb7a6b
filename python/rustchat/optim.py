"""Optimizers (docs/design.md, "Optimizer"): Muon for the 2-D block matrices, AdamW for embedding and head.

Distributed training is plain data parallel: every rank holds the full model and optimizer
state, gradients are all-reduced (all_reduce_grads) before the step, so all ranks take the
same step and stay identical.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Muon)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G ([..., m, n]): U V^T of its SVD, singular values pushed
    into roughly [0.7, 1.2] (the quintic trades exactness for speed). Returns `dtype`
    (default: bf16 on CUDA, fp32 elsewhere since CPU bf16 matmuls are slow)."""
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices.

    buf = m*buf + (1-m)*g; update = lerp(g, buf, m) (Nesterov) or buf; orthogonalise;
    p -= lr * max(1, rows/cols)^0.5 * update. Same-shape matrices are orthogonalised as one
    batch (fewer, larger matmuls)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # None: per-device default of zeropower_via_newtonschulz5
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mom = group["momentum"]
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    buckets[(tuple(p.shape), p.device, p.dtype)].append(p)
            for (shape, _, _), params in buckets.items():
                updates = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - mom)
                    updates.append(p.grad.lerp(buf, mom) if group["nesterov"] else buf)
                O = zeropower_via_newtonschulz5(torch.stack(updates), group["ns_steps"], self.ns_dtype)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for p, o in zip(params, O.unbind(0)):
                    p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)
        return loss


def build_optimizers(model, *, matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                     weight_decay: float = 0.0, lr_scale: float = 1.0, ns_dtype: torch.dtype | None = None):
    """[AdamW(head, embedding), Muon(block matrices)] with nanochat's settings.

    AdamW lrs are scaled by (model_dim/768)^-0.5 (tuned at 768). `lr_scale` multiplies every lr
    (e.g. SFT's init_lr_frac). Each param group records `initial_lr` for the schedules."""
    groups = model.param_groups()
    dmodel_scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [dict(params=groups["head"], lr=unembedding_lr * dmodel_scale * lr_scale),
                   dict(params=groups["embedding"], lr=embedding_lr * dmodel_scale * lr_scale)]
    # the 2026 model's extra parameters, at nanochat's July-2026 rates (scalar lr 0.5)
    extra = [("value_embeds", embedding_lr * dmodel_scale * 0.5, (0.8, 0.95)), ("resid", 0.5 * 0.01, (0.8, 0.95)),
             ("x0", 0.5, (0.96, 0.95)), ("smear", 0.2, (0.8, 0.95))]
    adam_groups += [dict(params=groups[name], lr=lr * lr_scale, betas=betas)
                    for name, lr, betas in extra if groups.get(name)]
    adam_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    try:  # fused: one pass over memory (CUDA, and ~8x faster than foreach on CPU)
        adamw = torch.optim.AdamW(adam_groups, fused=True, **adam_kwargs)
    except (RuntimeError, ValueError, TypeError):  # devices/dtypes without a fused kernel
        adamw = torch.optim.AdamW(adam_groups, **adam_kwargs)
    muon = Muon(groups["matrix"], lr=matrix_lr * lr_scale, momentum=0.95, ns_dtype=ns_dtype)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _reduce_op(op):
    if isinstance(op, str):
        op = op.lower()
        if op not in ("avg", "mean", "sum"):
            raise ValueError(f"op must be 'avg' or 'sum', got {op!r}")
        return "sum" if op == "sum" else "avg"
    if op == dist.ReduceOp.SUM:
        return "sum"
    if op == dist.ReduceOp.AVG:
        return "avg"
    raise ValueError(f"unsupported reduce op {op!r}")


@torch.no_grad()
def all_reduce_grads(model_or_params, op="avg", bucket_numel: int = 1 << 25) -> None:
    """All-reduce gradients across ranks (no-op when torch.distributed is not initialised).

    op 'avg' averages (each rank's loss was a local mean over equal shares), 'sum' adds
    (each rank's loss was already divided by the global token count). Missing grads count
    as zero so every rank reduces the same tensors in the same order. Grads are flattened
    into buckets of up to `bucket_numel` elements: one collective per bucket, and gloo has
    no AVG, so averaging is SUM then divide."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    how = _reduce_op(op)
    params = model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    by_kind = defaultdict(list)
    for p in params:
        by_kind[(p.grad.device, p.grad.dtype)].append(p.grad)
    for grads in by_kind.values():
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None and (not bucket or size + g.numel() <= bucket_numel):
                bucket.append(g)
                size += g.numel()
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if how == "avg":
                flat.div_(world)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            if g is not None:
                bucket, size = [g], g.numel()
