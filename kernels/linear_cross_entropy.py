"""Head matmul fused with the masked cross-entropy: loss(hidden @ weight.T, targets).

Never materialises the full [N, V] logits: rows are processed in chunks of C rows; per chunk:
logits = h_c @ W.T in the inputs' dtype (bf16 stays bf16, as F.linear gives; cuBLAS accumulates
in fp32), one fused kernel turns them into loss + dL/dlogits in place (statistics in fp32;
Triton, or torch for backend="torch"), and the gradient is pushed through the matmul at once:
dh_c = g @ W, dW += g.T @ h_c (fp32 accumulators). For "mean"/"sum" this happens during the
forward (backward only scales by grad_output, like Liger); for "none" the per-row grad_output is
needed, so the backward recomputes the chunks.

No host sync: ignored rows are not gathered out (that needs their count on the host); the kernel
gives them zero loss and zero gradient, and the "mean" divisor stays a device tensor. The price:
their head matmuls are computed too (nothing when few targets are ignored, as in pretraining).
"""

from __future__ import annotations

import torch

from ._backend import (
    autocast_dtype,
    check_float,
    compute_dtype,
    check_reduction,
    device_check,
    check_softcap,
    check_target_range,
    check_targets,
    no_autocast,
    resolve_backend,
)
from .cross_entropy import ce_rows_torch, ce_rows_triton

# Elements of one logits chunk (C * V). 2**27 -> 256 MiB in bf16 (the gradient overwrites it);
# C = 2048 rows for V = 65536: big enough for efficient matmuls, far below eager's full-logits
# memory.
CHUNK_ELEMS = 1 << 27

# --------------------------------------------------------------------------------------------
# matmul helpers: fp32 results from bf16/fp16 inputs without an extra rounding step
# --------------------------------------------------------------------------------------------
_MM_OUT_DTYPE = {}  # device type -> bool: torch.mm(..., out_dtype=float32) works
_ADDMM_OUT_DTYPE = {}  # device type -> bool: in-place fp32 accumulate via addmm(out_dtype)


def mm_f32(a, b):
    """a @ b as fp32 (cuBLAS accumulates in fp32 anyway; out_dtype just skips the bf16 rounding);
    fp64 stays fp64."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    dt = a.device.type
    if dt == "cpu":  # no out_dtype kernel on CPU; upcasting is exact and CPU speed is secondary
        return torch.mm(a.float(), b.float())
    if _MM_OUT_DTYPE.get(dt, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[dt] = False
    return torch.mm(a, b).float()


def _addmm_ok(dev_type, dtype, device):
    """Whether addmm(out_dtype=fp32, out=acc) can accumulate here, decided without a host sync
    (the first call may run under CUDA-graph capture): it must not raise, and a tiny probe's
    result is checked on the device (a build where it ignored acc would fail loudly at the next
    sync instead of giving wrong weight gradients)."""
    ok = _ADDMM_OUT_DTYPE.get(dev_type)
    if ok is None:
        try:
            a = torch.randn(8, 16, device=device).to(dtype)
            b = torch.randn(16, 4, device=device).to(dtype)
            acc = torch.ones(8, 4, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            ok = True
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        if ok:
            ref = 1.0 + a.float() @ b.float()
            device_check(
                ((acc - ref).abs() <= 1e-3 + 1e-3 * ref.abs()).all(),
                "torch.addmm(out_dtype=float32, out=acc) does not accumulate into acc on this PyTorch build",
            )
        _ADDMM_OUT_DTYPE[dev_type] = ok
    return ok


def acc_mm(acc, a, b):
    """acc (fp32) += a @ b, in place."""
    if a.dtype in (torch.float32, torch.float64):
        acc.addmm_(a, b)
    elif _addmm_ok(a.device.type, a.dtype, a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS beta=1, no temp
    else:
        acc.add_(mm_f32(a, b))


def _chunk_rows(n, V):
    return max(1, min(n, CHUNK_ELEMS // max(V, 1)))


def _run_chunks(h, weight, t, softcap, backend, scale, ignore_index, loss_out, gh_out, gw_out):
    """Process rows h [n, D] / targets t [n] in row chunks (ignored rows give 0 loss and 0 grad).

    scale: float, 0-dim tensor or tensor [n] (per-row gradient scale). Writes loss_out [n] and,
    when given, gh_out [n, D] and gw_out [V, D] (fp32/fp64 accumulators, gw accumulated)."""
    n = h.shape[0]
    V = weight.shape[0]
    want_grad = gh_out is not None or gw_out is not None
    C = _chunk_rows(n, V)
    wt = weight.t()
    for s in range(0, n, C):
        e = min(n, s + C)
        hc = h[s:e]
        tc = t[s:e]
        sc = scale[s:e] if isinstance(scale, torch.Tensor) and scale.dim() == 1 else scale
        # logits in the weight dtype: bf16 halves the bytes of the chunk against fp32 and is what
        # F.linear gives eager code; the kernel keeps its statistics in fp32 and writes the
        # gradient over the logits (they are not needed again)
        logits = torch.mm(hc, wt)  # [c, V]
        if backend == "triton":
            loss_c, g = ce_rows_triton(logits, tc, softcap, sc, want_grad, logits.dtype, ignore_index, inplace=True)
        else:
            loss_c, g = ce_rows_torch(logits, tc, softcap, sc, want_grad, weight.dtype, ignore_index)
        del logits
        loss_out[s:e] = loss_c
        if not want_grad:
            continue
        if gh_out is not None:
            gh_out[s:e] = mm_f32(g, weight)
        if gw_out is not None:
            acc_mm(gw_out, g.t(), hc)
        del g


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, reduction, backend, grad_enabled):
        N, D = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        acc_dtype = compute_dtype(hidden.dtype)
        # needs_input_grad ignores no_grad mode: check it too, so eval does no gradient work
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        need_grad = need_h or need_w
        fused = need_grad and reduction != "none"
        if reduction == "mean":  # a device tensor: no sync for the count
            scale = 1.0 / (targets != ignore_index).sum().clamp(min=1).to(acc_dtype)
        else:
            scale = 1.0
        loss_rows = torch.empty(N, dtype=acc_dtype, device=dev)
        gh = torch.empty(N, D, dtype=acc_dtype, device=dev) if fused and need_h else None
        gw = torch.zeros(V, D, dtype=acc_dtype, device=dev) if fused and need_w else None
        if N > 0:
            _run_chunks(hidden, weight, targets, softcap, backend, scale, ignore_index, loss_rows, gh, gw)

        ctx.reduction, ctx.softcap, ctx.backend, ctx.fused = reduction, softcap, backend, fused
        ctx.ignore_index = ignore_index
        if fused:
            # keep the fp32 accumulators until backward: grad_output is applied before the one
            # rounding to the input dtype (the fp32 [V, D] costs V*D*4 bytes, far below logits)
            ctx.save_for_backward(gh, gw)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        elif need_grad:
            ctx.save_for_backward(hidden, weight, targets)

        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        with no_autocast(grad_output.device.type):
            return _LinearCrossEntropy._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.fused:
            gh, gw = ctx.saved_tensors
            go = grad_output.to(gh.dtype if gh is not None else gw.dtype)
            h_dtype, w_dtype = ctx.dtypes
            grad_hidden = grad_weight = None
            # cheap next to the matmuls (N*D and V*D elements): no host sync to test go == 1
            if gh is not None:
                grad_hidden = torch.empty(gh.shape, dtype=h_dtype, device=gh.device)
                torch.mul(gh, go, out=grad_hidden)  # fp32 math, one rounding, no fp32 temporary
            if gw is not None:
                grad_weight = torch.empty(gw.shape, dtype=w_dtype, device=gw.device)
                torch.mul(gw, go, out=grad_weight)
            return grad_hidden, grad_weight, None, None, None, None, None, None
        # reduction="none": recompute the chunks with the per-row grad_output as scale
        h, weight, t = ctx.saved_tensors
        n, D = h.shape
        V = weight.shape[0]
        dev = h.device
        acc_dtype = compute_dtype(h.dtype)
        scale = grad_output.reshape(-1).to(acc_dtype)
        gh = torch.empty(n, D, dtype=acc_dtype, device=dev) if need_h else None
        gw = torch.zeros(V, D, dtype=acc_dtype, device=dev) if need_w else None
        if n > 0:
            loss_tmp = torch.empty(n, dtype=acc_dtype, device=dev)
            _run_chunks(h, weight, t, ctx.softcap, ctx.backend, scale, ctx.ignore_index, loss_tmp, gh, gw)
        grad_hidden = gh.to(h.dtype) if need_h else None
        grad_weight = gw.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-1, softcap=None, reduction="mean", backend="auto"):
    """Cross-entropy of logits = hidden @ weight.T (no bias) without materialising the logits.

    hidden [N, D] and weight [V, D] (same float dtype: bf16/fp16/fp32; float64 on the torch
    path), targets int [N]. Loss in fp32 (fp64 for float64); gradients accumulated in fp32 and
    returned in the input dtypes. Same
    ignore_index / softcap / reduction semantics as `cross_entropy`. Leading dims are flattened:
    hidden [..., D] with targets [...] is accepted ("none" then returns shape [...]).
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    # under autocast do what F.linear would: run the matmul in the autocast dtype (the casts
    # are differentiable, so fp32 master weights get fp32 gradients)
    ac = autocast_dtype(hidden.device.type)
    if ac is not None:
        hidden, weight = hidden.to(ac), weight.to(ac)
    check_targets(targets)
    check_reduction(reduction)
    softcap = check_softcap(softcap)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden dim {hidden.shape[-1]} != weight dim {weight.shape[1]} (weight is [V, D])")
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty vocab dimension")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype})")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight, targets on different devices ({hidden.device}, {weight.device}, {targets.device})"
        )
    out_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    ignore_index = int(ignore_index)
    check_target_range(targets, weight.shape[0], ignore_index)
    be = resolve_backend(backend, hidden, weight, targets)
    with no_autocast(hidden.device.type):
        out = _LinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, softcap, reduction, be, torch.is_grad_enabled()
        )
    return out.reshape(out_shape) if reduction == "none" else out
