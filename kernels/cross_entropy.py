"""Masked cross-entropy over logits [N, V], with optional softcap s*tanh(x/s), loss in fp32.

Triton path: ONE kernel computes the loss and the gradient in the forward pass (two sweeps over
each row: online max/sum, then p - onehot). The gradient is kept and only scaled by grad_output in
backward (skipped when it is 1), so fwd+bwd moves ~ read logits + write grad, like Liger-Kernel.
Ignored rows write zero gradient without reading their logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    HAS_TRITON,
    LazyKernel,
    check_float,
    check_reduction,
    check_softcap,
    check_target_range,
    check_targets,
    interpreting,
    next_pow2,
    resolve_backend,
    tl,
    triton,
)

# --------------------------------------------------------------------------------------------
# Plain PyTorch reference (backend="torch"): what eager code does, autograd does the backward.
# --------------------------------------------------------------------------------------------


def cross_entropy_torch(logits, targets, ignore_index=-1, softcap=None, reduction="mean"):
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n = (targets != ignore_index).sum().clamp(min=1)  # 0 trained targets -> 0, not NaN
    return total / n


def ce_rows_torch(logits, targets, softcap, scale, want_grad, grad_dtype):
    """Per-row loss (+ scaled gradient wrt logits) for rows whose targets are all valid.
    Torch twin of `ce_rows_triton`, used by the chunked linear cross-entropy."""
    z = logits.float()
    u = None
    if softcap is not None:
        u = z / softcap
        z = torch.tanh(u).mul_(softcap)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, targets[:, None]).squeeze(1)
    if not want_grad:
        return loss, None
    g = z.sub_(lse[:, None]).exp_()  # softmax, reusing z's buffer
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    if u is not None:
        # d(s*tanh(x/s))/dx = sech^2(x/s) (1 - tanh^2 would cancel badly near |tanh| = 1)
        g.mul_(u.cosh_().pow_(-2))
    if isinstance(scale, torch.Tensor):
        g.mul_(scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float())
    elif scale != 1.0:
        g.mul_(scale)
    return loss, g.to(grad_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


def _ce_fwd_kernel(
    X, stride_x,  # logits [R, V] (any float dtype, upcast to fp32 right after the load)
    TGT,  # int targets [R]
    LOSS,  # fp32 [R] per-row loss (0 for ignored rows)
    G, stride_g,  # gradient out [R, V] (separate from X: autotuning reruns the kernel)
    SCALE, stride_scale,  # fp32 gradient scale per row (stride 0 for a single scalar)
    V, ignore_index, cap, inv_cap,
    HAS_CAP: tl.constexpr, FIXED_MAX: tl.constexpr, WRITE_GRAD: tl.constexpr, RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    offs = tl.arange(0, BLOCK)
    tgt = tl.load(TGT + row).to(tl.int64)
    if tgt != ignore_index:
        if FIXED_MAX:
            # sweep 1, softcap: every z = cap*tanh(x/cap) lies in (-cap, cap), so cap is a safe
            # max (exp(z - cap) >= exp(-2cap) does not underflow for cap <= 40): no running max,
            # per-lane sums, a single reduction at the end
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                # tanh from exp (libdevice tanh is unavailable in the interpreter); the
                # exp(-2|u|) form never overflows, the odd Taylor series avoids the 1-e
                # cancellation for small |u|
                u = x * inv_cap
                au = tl.abs(u)
                e = tl.exp(-2.0 * au)
                r = 1.0 / (1.0 + e)
                th = (1.0 - e) * r
                u2 = u * u
                small = au * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 - u2 * 0.05396825396825397)))
                th = tl.where(au < 0.125, small, th)
                th = tl.where(u < 0.0, -th, th)
                x = cap * th
                acc += tl.where(mask, tl.exp(x - cap), 0.0)
            m = cap
            s = tl.sum(acc, 0)
        else:
            # sweep 1: online max / sum of exp (scalar running state, one exp per element)
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    u = x * inv_cap
                    au = tl.abs(u)
                    e = tl.exp(-2.0 * au)
                    r = 1.0 / (1.0 + e)
                    th = (1.0 - e) * r
                    u2 = u * u
                    small = au * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 - u2 * 0.05396825396825397)))
                    th = tl.where(au < 0.125, small, th)
                    th = tl.where(u < 0.0, -th, th)
                    x = cap * th
                x = tl.where(mask, x, float("-inf"))
                m_new = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
        in_range = (tgt >= 0) & (tgt < V)  # out-of-range targets must not read out of bounds
        xt = tl.load(x_row + tgt, mask=in_range, other=0.0).to(tl.float32)
        if HAS_CAP:  # (own names: anything assigned before a loop becomes loop-carried)
            ut = xt * inv_cap
            aut = tl.abs(ut)
            et = tl.exp(-2.0 * aut)
            tht = (1.0 - et) / (1.0 + et)
            ut2 = ut * ut
            smallt = aut * (1.0 + ut2 * (-0.3333333333333333 + ut2 * (0.13333333333333333 - ut2 * 0.05396825396825397)))
            tht = tl.where(aut < 0.125, smallt, tht)
            tht = tl.where(ut < 0.0, -tht, tht)
            xt = cap * tht
        # (m - xt) + log(s) rather than lse - xt: no rounding of lse at large |logits|
        tl.store(LOSS + row, (m - xt) + tl.log(s))
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
            inv_s = 1.0 / s
            # sweep 2: grad = (softmax - onehot) * dz/dx * scale
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    u = x * inv_cap
                    au = tl.abs(u)
                    e = tl.exp(-2.0 * au)
                    r = 1.0 / (1.0 + e)
                    th = (1.0 - e) * r
                    u2 = u * u
                    small = au * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 - u2 * 0.05396825396825397)))
                    th = tl.where(au < 0.125, small, th)
                    th = tl.where(u < 0.0, -th, th)
                    x = cap * th
                p = tl.exp(x - m) * inv_s  # like torch's softmax: exp(x - max) / sum
                g = tl.where(cols == tgt, p - 1.0, p)
                if HAS_CAP:
                    # d(cap*tanh(x/cap))/dx = 1 - tanh^2 = 4e/(1+e)^2: no cancellation near |tanh| = 1
                    g = g * (4.0 * e * r * r)
                g = g * scale
                if RNE_FIX:
                    # the interpreter truncates fp32 -> bf16; round to nearest even by hand
                    # so results match the GPU (constexpr: never compiled for the GPU)
                    gb = g.to(tl.uint32, bitcast=True)
                    gb = (gb + 0x7FFF + ((gb >> 16) & 1)) & 0xFFFF0000
                    g = gb.to(tl.float32, bitcast=True)
                tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty)
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, zero, mask=cols < V)


def _ce_configs():
    if not HAS_TRITON:
        return None
    # few programs per SM with big blocks keep the rows being processed small enough for L2, so
    # the second sweep over a row mostly hits L2 instead of HBM; autotune picks (GPU only)
    return [
        triton.Config({"BLOCK": b}, num_warps=w)
        for b, w in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (4096, 32), (8192, 16), (8192, 32), (16384, 32))
    ]


_CE_KERNEL = LazyKernel(_ce_fwd_kernel, configs=_ce_configs(), key=["V", "HAS_CAP", "FIXED_MAX", "WRITE_GRAD", "RNE_FIX"])


def ce_rows_triton(logits, targets, softcap, scale, want_grad, grad_dtype=None, ignore_index=-1, grad_out=None):
    """Launch the fused kernel over the rows of `logits` [R, V].

    scale: python float, 0-dim/1-element tensor, or per-row tensor [R] (fp32) multiplying the
    gradient. Returns (loss [R] fp32, grad [R, V] or None); `grad_out`: optional [R, V] buffer
    for the gradient (must not alias `logits`).
    """
    R, V = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()  # the kernel indexes targets with stride 1
    loss = torch.empty(R, dtype=torch.float32, device=dev)
    if want_grad:
        grad = grad_out if grad_out is not None else torch.empty(R, V, dtype=grad_dtype or logits.dtype, device=dev)
    else:
        grad = loss  # dummy pointer, never written (WRITE_GRAD=False)
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((1,), float(scale), dtype=torch.float32, device=dev)
    scale = scale.to(device=dev, dtype=torch.float32).reshape(-1)
    stride_scale = 0 if scale.numel() == 1 else 1
    if R == 0:
        return loss, (grad if want_grad else None)
    cap = float(softcap) if softcap is not None else 1.0
    kernel = _CE_KERNEL.get()
    args = (
        logits, logits.stride(0), targets, loss,
        grad, grad.stride(0) if want_grad else 0,
        scale, stride_scale, V, int(ignore_index), cap, 1.0 / cap,
    )
    meta = dict(
        HAS_CAP=softcap is not None,
        FIXED_MAX=softcap is not None and softcap <= 40.0,
        WRITE_GRAD=bool(want_grad),
        RNE_FIX=interpreting() and want_grad and grad.dtype == torch.bfloat16,
    )
    if _CE_KERNEL.autotuned:
        kernel[(R,)](*args, **meta)
    else:
        # interpreter: hand-picked block (autotune needs a GPU)
        kernel[(R,)](*args, **meta, BLOCK=min(4096, next_pow2(V)), num_warps=4)
    return loss, (grad if want_grad else None)


class _CrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, softcap, reduction, grad_enabled):
        need_grad = ctx.needs_input_grad[0] and grad_enabled  # no gradient work under no_grad
        valid = targets != ignore_index
        n_valid = valid.sum()  # stays on device: no sync
        if reduction == "mean":
            scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        else:
            scale = 1.0
        loss_rows, grad = ce_rows_triton(
            logits, targets, softcap, scale, need_grad, logits.dtype, ignore_index=ignore_index
        )
        ctx.reduction = reduction
        if need_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        go = grad_output.to(torch.float32)
        if ctx.reduction == "none":
            go = go.reshape(-1, 1)
        elif bool(go == 1):  # one tiny sync; saves a full pass in the common case
            return grad, None, None, None, None, None
        # multiply in fp32 and round once into the gradient's dtype (no fp32 temporary)
        out = torch.empty_like(grad)
        torch.mul(grad, go, out=out)
        return out, None, None, None, None, None


def cross_entropy(logits, targets, *, ignore_index=-1, softcap=None, reduction="mean", backend="auto"):
    """Cross-entropy of logits [N, V] (bf16/fp16/fp32) against int targets [N], computed in fp32.

    Rows with target == ignore_index contribute 0 loss and 0 gradient. reduction: "mean" (over
    non-ignored rows; 0 if there are none), "sum", or "none" (fp32 [N], 0 for ignored rows).
    softcap s applies s*tanh(x/s) to the logits first. Leading dims are flattened: logits
    [..., V] with targets [...] is accepted ("none" then returns shape [...]).
    """
    check_float("logits", logits)
    check_targets(targets)
    check_reduction(reduction)
    softcap = check_softcap(softcap)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets are on different devices ({logits.device}, {targets.device})")
    out_shape = targets.shape
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits must have a non-empty vocab dimension")
    logits = logits.reshape(-1, V)
    targets = targets.reshape(-1).long()
    ignore_index = int(ignore_index)
    check_target_range(targets, V, ignore_index)
    be = resolve_backend(backend, logits, targets)
    if be == "torch":
        out = cross_entropy_torch(logits, targets, ignore_index, softcap, reduction)
    else:
        out = _CrossEntropyTriton.apply(logits, targets, ignore_index, softcap, reduction, torch.is_grad_enabled())
    return out.reshape(out_shape) if reduction == "none" else out
