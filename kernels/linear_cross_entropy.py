"""Head matmul fused with the masked cross-entropy: loss(hidden @ weight.T, targets).

Never materialises the full [N, V] logits: ignored rows are dropped first (no work for them), the
kept rows are processed in chunks of C rows; per chunk: logits = h_c @ W.T in fp32 (cuBLAS), one
fused kernel writes loss + dL/dlogits (Triton, or torch for backend="torch"), and the gradient is
pushed through the matmul at once: dh_c = g @ W, dW += g.T @ h_c (fp32 accumulators). For
"mean"/"sum" this happens during the forward (backward only scales by grad_output, like Liger);
for "none" the per-row grad_output is needed, so the backward recomputes the chunks.
"""
from __future__ import annotations

import torch

from ._backend import (
    autocast_dtype,
    check_float,
    check_reduction,
    check_softcap,
    check_target_range,
    check_targets,
    no_autocast,
    resolve_backend,
)
from .cross_entropy import ce_rows_torch, ce_rows_triton

# Elements of one fp32 logits chunk (C * V). 2**27 -> 512 MiB fp32 (+ 256 MiB bf16 gradient) at
# most; C = 2048 rows for V = 65536: big enough for efficient matmuls, far below eager's
# full-logits memory.
CHUNK_ELEMS = 1 << 27

# --------------------------------------------------------------------------------------------
# matmul helpers: fp32 results from bf16/fp16 inputs without an extra rounding step
# --------------------------------------------------------------------------------------------
_MM_OUT_DTYPE = {}  # device type -> bool: torch.mm(..., out_dtype=float32) works
_ADDMM_OUT_DTYPE = {}  # device type -> bool: in-place fp32 accumulate via addmm(out_dtype)


def mm_f32(a, b):
    """a @ b as fp32 (cuBLAS accumulates in fp32 anyway; out_dtype just skips the bf16 rounding)."""
    if a.dtype == torch.float32:
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
    """Check once (numerically, on a tiny problem) that addmm(out_dtype=fp32, out=acc) accumulates."""
    ok = _ADDMM_OUT_DTYPE.get(dev_type)
    if ok is None:
        ok = False
        try:
            a = torch.randn(8, 16, device=device).to(dtype)
            b = torch.randn(16, 4, device=device).to(dtype)
            acc = torch.ones(8, 4, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            ref = 1.0 + a.float() @ b.float()
            ok = bool(torch.allclose(acc, ref, atol=1e-3, rtol=1e-3))
        except Exception:
            ok = False
        _ADDMM_OUT_DTYPE[dev_type] = ok
    return ok


def acc_mm(acc, a, b):
    """acc (fp32) += a @ b, in place."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _addmm_ok(a.device.type, a.dtype, a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS beta=1, no temp
    else:
        acc.add_(mm_f32(a, b))


def _chunk_rows(n, V):
    return max(1, min(n, CHUNK_ELEMS // max(V, 1)))


def _run_chunks(h, weight, t, softcap, backend, scale, loss_out, gh_out, gw_out):
    """Process kept rows h [n, D] / targets t [n] in row chunks.

    scale: float or fp32 tensor [n] (per-row gradient scale). Writes loss_out [n] and, when given,
    gh_out [n, D] fp32 and gw_out [V, D] fp32 (accumulated)."""
    n = h.shape[0]
    V = weight.shape[0]
    want_grad = gh_out is not None or gw_out is not None
    C = _chunk_rows(n, V)
    wt = weight.t()
    for s in range(0, n, C):
        e = min(n, s + C)
        hc = h[s:e]
        tc = t[s:e]
        sc = scale[s:e] if isinstance(scale, torch.Tensor) else scale
        logits = mm_f32(hc, wt)  # [c, V] fp32
        # the gradient feeds the matmuls in the weight dtype (bf16 tensor cores). Not written
        # in place over the fp32 logits: autotuning reruns the kernel on the same input.
        g_dtype = weight.dtype
        if backend == "triton":
            loss_c, g = ce_rows_triton(logits, tc, softcap, sc, want_grad, g_dtype)
        else:
            loss_c, g = ce_rows_torch(logits, tc, softcap, sc, want_grad, g_dtype)
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
        # needs_input_grad ignores no_grad mode: check it too, so eval does no gradient work
        need_h = ctx.needs_input_grad[0] and grad_enabled
        need_w = ctx.needs_input_grad[1] and grad_enabled
        need_grad = need_h or need_w
        # gather the trained rows first: ignored rows cost nothing (one sync for the count)
        valid_idx = torch.nonzero(targets != ignore_index).squeeze(1)
        n = valid_idx.numel()
        h = hidden.index_select(0, valid_idx)
        t = targets.index_select(0, valid_idx)
        fused = need_grad and reduction != "none"
        scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
        loss_valid = torch.empty(n, dtype=torch.float32, device=hidden.device)
        gh = torch.empty(n, D, dtype=torch.float32, device=hidden.device) if fused and need_h else None
        gw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if fused and need_w else None
        if n > 0:
            _run_chunks(h, weight, t, softcap, backend, scale, loss_valid, gh, gw)

        ctx.reduction, ctx.softcap, ctx.backend, ctx.fused = reduction, softcap, backend, fused
        ctx.N, ctx.hidden_dtype = N, hidden.dtype
        if fused:
            # keep the fp32 accumulators until backward: grad_output is applied before the one
            # rounding to the input dtype (the fp32 [V, D] costs V*D*4 bytes, far below logits)
            ctx.save_for_backward(gh, gw, valid_idx)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        elif need_grad:
            ctx.save_for_backward(h, weight, t, valid_idx)

        if reduction == "none":
            out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
            return out.index_copy_(0, valid_idx, loss_valid)
        total = loss_valid.sum()
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
            gh, gw, valid_idx = ctx.saved_tensors
            go = grad_output.to(torch.float32)
            h_dtype, w_dtype = ctx.dtypes
            grad_hidden = grad_weight = None
            # cheap next to the matmuls (N*D and V*D elements): no host sync to test go == 1
            if gh is not None:
                grad_hidden = torch.zeros(ctx.N, gh.shape[1], dtype=h_dtype, device=gh.device)
                grad_hidden.index_copy_(0, valid_idx, (gh * go).to(h_dtype))
            if gw is not None:
                grad_weight = torch.empty(gw.shape, dtype=w_dtype, device=gw.device)
                torch.mul(gw, go, out=grad_weight)  # fp32 math, one rounding, no fp32 temporary
            return grad_hidden, grad_weight, None, None, None, None, None, None
        # reduction="none": recompute the chunks with the per-row grad_output as scale
        h, weight, t, valid_idx = ctx.saved_tensors
        n, D = h.shape
        V = weight.shape[0]
        dev = h.device
        scale = grad_output.reshape(-1).to(torch.float32).index_select(0, valid_idx)
        gh = torch.empty(n, D, dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_w else None
        if n > 0:
            loss_tmp = torch.empty(n, dtype=torch.float32, device=dev)
            _run_chunks(h, weight, t, ctx.softcap, ctx.backend, scale, loss_tmp, gh, gw)
        grad_hidden = grad_weight = None
        if need_h:
            grad_hidden = torch.zeros(ctx.N, D, dtype=ctx.hidden_dtype, device=dev)
            grad_hidden.index_copy_(0, valid_idx, gh.to(ctx.hidden_dtype))
        if need_w:
            grad_weight = gw.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-1, softcap=None, reduction="mean", backend="auto"):
    """Cross-entropy of logits = hidden @ weight.T (no bias) without materialising the logits.

    hidden [N, D] and weight [V, D] (same float dtype: bf16/fp16/fp32), targets int [N].
    Loss in fp32; gradients accumulated in fp32 and returned in the input dtypes. Same
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
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight, targets on different devices ({hidden.device}, {weight.device}, {targets.device})")
    out_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    ignore_index = int(ignore_index)
    check_target_range(targets, weight.shape[0], ignore_index)
    be = resolve_backend(backend, hidden, weight, targets)
    with no_autocast(hidden.device.type):
        out = _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap, reduction, be, torch.is_grad_enabled())
    return out.reshape(out_shape) if reduction == "none" else out
