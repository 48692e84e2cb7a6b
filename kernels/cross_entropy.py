"""Masked cross-entropy over logits [N, V], with optional softcap s*tanh(x/s), loss in fp32.

Triton path: ONE kernel computes the loss and the gradient in the forward pass; the backward only
scales the gradient by grad_output, in place, on the device (skipped there when it is 1), so
fwd+bwd moves ~ read logits + write grad, like Liger-Kernel. With `grad_in_logits=True` the
gradient overwrites the logits buffer (no second [N, V] buffer at all).

Per row, with softcap <= 40 (the model's case) every softcapped logit lies in (-cap, cap), so cap
is a safe max: sweep 1 sums exp(z - cap) and stores the unnormalised gradient exp(z - cap)*dz/dx;
sweep 2 only multiplies it by scale/sum. The softcap is evaluated once per element and sweep 2
is a read-modify-write of data sweep 1 just wrote. The kernel is persistent: a fixed number of
programs, sized so the rows in flight fit in half the L2, walk over the rows; sweep 2 then hits
L2 and HBM sees one read of the logits and one write of the gradient. Without softcap (or with a
large one) sweep 1 keeps an online max and sweep 2 recomputes (one exp per element per sweep).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    LazyKernel,
    check_float,
    check_reduction,
    check_softcap,
    check_target_range,
    check_targets,
    compute_dtype,
    device_fn,
    device_props,
    interpreting,
    next_pow2,
    resolve_backend,
    tl,
)
from ._common import (
    LOG2E,
    ROUND_MAGIC,
    bf16x2_pack,
    bf16x2_unpack,
    exp2_poly,
    fast_exp2,
    round_bf16_rne,
    softcap_sigmoid,
)

# --------------------------------------------------------------------------------------------
# Plain PyTorch reference (backend="torch"): what eager code does, autograd does the backward.
# --------------------------------------------------------------------------------------------


def cross_entropy_torch(logits, targets, ignore_index=-1, softcap=None, reduction="mean"):
    z = logits.to(compute_dtype(logits.dtype))
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


def ce_rows_torch(logits, targets, softcap, scale, want_grad, grad_dtype, ignore_index=-1):
    """Per-row loss (+ scaled gradient wrt logits; 0 for ignored rows). Torch twin of
    `ce_rows_triton`, used by the chunked linear cross-entropy. May overwrite `logits`."""
    z = logits.to(compute_dtype(logits.dtype))
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    u = None
    if softcap is not None:
        u = z / softcap
        z = torch.tanh(u).mul_(softcap)
    lse = torch.logsumexp(z, dim=1)
    loss = (lse - z.gather(1, t[:, None]).squeeze(1)) * valid
    if not want_grad:
        return loss, None
    g = z.sub_(lse[:, None]).exp_()  # softmax, reusing z's buffer
    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
    if u is not None:
        # d(s*tanh(x/s))/dx = sech^2(x/s) (1 - tanh^2 would cancel badly near |tanh| = 1)
        g.mul_(u.cosh_().pow_(-2))
    w = valid.to(g.dtype)
    if isinstance(scale, torch.Tensor):
        w = w * scale.to(g.dtype).reshape(-1)
    elif scale != 1.0:
        w = w * scale
    g.mul_(w[:, None])
    return loss, g.to(grad_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@device_fn
def _store_grad(ptr, g, mask, MASKED: tl.constexpr, RNE_FIX: tl.constexpr):
    if RNE_FIX:
        g = round_bf16_rne(g)
    g = g.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr, g, mask=mask)
    else:
        tl.store(ptr, g)


@device_fn
def _load_x(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x.to(tl.float32)


@device_fn
def _cap_exp(x, k_sig, c2, c2_off, FAST: tl.constexpr):
    """(exp(z - cap + d), that times t(1 - t)) of fp32 logits x, d = the row's constant offset
    (see the caller); the second is the gradient up to the factor 4*scale/sum that sweep 2
    applies. Two MUFU per logit (the sigmoid's exp2 and reciprocal); the third exponential is
    the FMA pipe's polynomial: its argument 2cap*log2(e)*(t - 1) lies in (-116, 0] for
    cap <= 40."""
    t = softcap_sigmoid(x, k_sig, FAST)
    e = exp2_poly(c2, t, c2_off)  # (z - cap)*log2(e) = c2*(t - 1)
    return e, e * (t - t * t)


@device_fn
def _cap_sweep1_block(
    x,
    g_row,
    cols,
    V,
    k_sig,
    c2,
    c2_off,
    MASKED: tl.constexpr,
    STORE: tl.constexpr,
    FAST: tl.constexpr,
    RNE_FIX: tl.constexpr,
):
    """_cap_exp of one loaded block x (0 where masked); STORE: the gradient part is stored."""
    mask = cols < V
    e, g = _cap_exp(x, k_sig, c2, c2_off, FAST)
    if STORE:
        _store_grad(g_row + cols, g, mask, MASKED, RNE_FIX)
    if MASKED:
        e = tl.where(mask, e, 0.0)
    return e


@device_fn
def _next_block(ptr_row, offs, start, v_full, BLOCK: tl.constexpr):
    """The block after `start` among the v_full unmasked columns, loaded one iteration ahead so
    its 16-byte loads are in flight during this block's math (the last iteration reloads its
    own block: in bounds, and L1/L2-resident). start and v_full are multiples of BLOCK: said
    so, or older Tritons cannot vectorise the load."""
    return tl.load(ptr_row + tl.multiple_of(tl.minimum(start + BLOCK, v_full - BLOCK), BLOCK) + offs)


@device_fn
def _online_block(x_row, cols, V, m, s, cap, k_sig, HAS_CAP: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """Online (max, sum of exp) update with one block (general path: no softcap or a big one)."""
    mask = cols < V
    x = _load_x(x_row + cols, mask, MASKED)
    if HAS_CAP:
        x = cap * (2.0 * softcap_sigmoid(x, k_sig, FAST) - 1.0)
    if MASKED:
        x = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 0))
    s = s * fast_exp2((m - m_new) * LOG2E, FAST) + tl.sum(fast_exp2((x - m_new) * LOG2E, FAST), 0)
    return m_new, s


@device_fn
def _recompute_block(
    x_row,
    g_row,
    cols,
    V,
    m,
    f,
    cap,
    k_sig,
    HAS_CAP: tl.constexpr,
    MASKED: tl.constexpr,
    FAST: tl.constexpr,
    RNE_FIX: tl.constexpr,
):
    """grad = exp(z - m) * f * dz/dx of one block, f = scale/sum (z - m first: exact for large
    logits, where folding m into the exponent's offset would lose the low bits)."""
    mask = cols < V
    x = _load_x(x_row + cols, mask, MASKED)
    if HAS_CAP:
        t = softcap_sigmoid(x, k_sig, FAST)
        x = cap * (2.0 * t - 1.0)
        f = f * 4.0 * (t - t * t)
    _store_grad(g_row + cols, fast_exp2((x - m) * LOG2E, FAST) * f, mask, MASKED, RNE_FIX)


def _ce_kernel(
    X,
    stride_x,  # logits [R, V] (any float dtype, upcast to fp32 right after the load)
    TGT,  # int targets [R]
    LOSS,  # fp32 [R] per-row loss (0 for ignored rows, NaN for out-of-range targets)
    G,
    stride_g,  # gradient out [R, V]; may be X itself (in place)
    SCALE,
    stride_scale,  # fp32 gradient scale per row (stride 0 for a single scalar)
    R,
    V,
    ignore_index,
    cap,
    k_sig,  # k_sig = -2*log2(e)/cap
    # RESCALE (implies WRITE_GRAD, FIXED_MAX): sweep 1 stores the unnormalised gradient
    HAS_CAP: tl.constexpr,
    FIXED_MAX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    RESCALE: tl.constexpr,
    FAST: tl.constexpr,
    RNE_FIX: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
    WORDS: tl.constexpr,  # FIXED_MAX sweeps read (and write) bf16 pairs as uint32 words
    TAIL2: tl.constexpr,  # V % (2*BLOCK): sweep 2 (double blocks) ends with a masked one
):
    offs = tl.arange(0, BLOCK)
    offs_w = tl.arange(0, BLOCK // 2)  # uint32 words of a block (WORDS)
    # unmasked blocks [0, v_full), then one masked tail block if V % BLOCK (TAIL; compiled only
    # then: no per-element mask work in the sweeps, no dead tail code)
    v_full = V - V % BLOCK
    for row in range(tl.program_id(0), R, tl.num_programs(0)):  # persistent over rows
        x_row = X + tl.cast(row, tl.int64) * stride_x
        g_row = G + tl.cast(row, tl.int64) * stride_g
        tgt = tl.load(TGT + row).to(tl.int64)
        if tgt != ignore_index:
            in_range = (tgt >= 0) & (tgt < V)  # out-of-range targets must not read out of bounds
            # the target logit before any sweep: the gradient may overwrite the row
            xt = tl.load(x_row + tgt, mask=in_range, other=0.0).to(tl.float32)
            # in place, another warp's sweep may overwrite x[tgt] before this warp has read it:
            # every thread's read is performed before anyone goes on
            tl.debug_barrier()
            dzt = 1.0
            if HAS_CAP:  # (scalars: the exact form, once per row)
                tt = softcap_sigmoid(xt, k_sig, False)
                xt = cap * (2.0 * tt - 1.0)
                dzt = 4.0 * (tt - tt * tt)
            if FIXED_MAX:
                # every z = cap*tanh(x/cap) is in (-cap, cap): cap is a safe max (exp(z - cap) >=
                # exp(-2cap) does not underflow for cap <= 40): no running max, per-lane sums.
                # Software-pipelined: block i+1 is loaded before block i's math (the first block's
                # load has one mask for the whole block: it stays vectorised).
                c2 = 2.0 * cap * LOG2E
                # the polynomial's offset ROUND_MAGIC - c2 rounds in fp32 (to an integer): every
                # exponential of the row is off by the same exact factor 2**d, which cancels in
                # the gradient (e / sum) and is taken out of the loss below
                c2_off = ROUND_MAGIC - c2
                d = (c2_off - ROUND_MAGIC) + c2
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                if WORDS:
                    # bf16 pairs as uint32 words: unpacked and packed with one instruction per
                    # element / per pair; the order of the sum does not matter, the gradient's
                    # pairs are stored back where they came from
                    # (16-byte aligned rows, checked on the host: the hint lets every Triton
                    # version vectorise the word loads and stores)
                    xw_row = tl.multiple_of(x_row.to(tl.pointer_type(tl.uint32)), 16)
                    gw_row = tl.multiple_of(g_row.to(tl.pointer_type(tl.uint32)), 16)
                    acc_w = tl.zeros([BLOCK // 2], dtype=tl.float32)
                    wn = tl.load(xw_row + offs_w, mask=tl.zeros_like(offs_w) < v_full, other=0)
                    for start in range(0, v_full, BLOCK):
                        wc = wn
                        wn = _next_block(xw_row, offs_w, start // 2, v_full // 2, BLOCK // 2)
                        lo, hi = bf16x2_unpack(wc)
                        e_lo, g_lo = _cap_exp(lo, k_sig, c2, c2_off, FAST)
                        e_hi, g_hi = _cap_exp(hi, k_sig, c2, c2_off, FAST)
                        acc_w += e_lo + e_hi
                        if RESCALE:
                            tl.store(gw_row + start // 2 + offs_w, bf16x2_pack(g_lo, g_hi, FAST))
                    s = tl.sum(acc_w, 0)
                else:
                    xn = tl.load(x_row + offs, mask=tl.zeros_like(offs) < v_full, other=0.0)
                    for start in range(0, v_full, BLOCK):
                        xc = xn
                        xn = _next_block(x_row, offs, start, v_full, BLOCK)
                        acc += _cap_sweep1_block(
                            xc.to(tl.float32), g_row, start + offs, V, k_sig, c2, c2_off, False, RESCALE, FAST, RNE_FIX
                        )
                    s = 0.0
                if TAIL:
                    acc += _cap_sweep1_block(
                        _load_x(x_row + v_full + offs, v_full + offs < V, True),
                        g_row,
                        v_full + offs,
                        V,
                        k_sig,
                        c2,
                        c2_off,
                        True,
                        RESCALE,
                        FAST,
                        RNE_FIX,
                    )
                s += tl.sum(acc, 0)
                m = cap - d / LOG2E  # sum = sum(exp(z - m)): exp(z - cap) * 2**d
            else:
                # sweep 1: online max / sum of exp (scalar running state)
                m = float("-inf")
                s = 0.0
                for start in range(0, v_full, BLOCK):
                    m, s = _online_block(x_row, start + offs, V, m, s, cap, k_sig, HAS_CAP, False, FAST)
                if TAIL:
                    m, s = _online_block(x_row, v_full + offs, V, m, s, cap, k_sig, HAS_CAP, True, FAST)
            xt = tl.where(in_range, xt, float("nan"))  # never silently wrong: NaN loss
            # (m - xt) + log(s) rather than lse - xt: no rounding of lse at large |logits|
            tl.store(LOSS + row, (m - xt) + tl.log(s))
            if WRITE_GRAD:
                scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
                inv_s = 1.0 / s
                if RESCALE:
                    # sweep 2: the stored exp(z - cap)*t(1 - t) times 4*scale/sum (L2-resident)
                    # (L2 hits: blocks of 2*BLOCK, twice the bytes in flight of sweep 1, so its
                    # shorter latency is covered with the same number of threads)
                    f = 4.0 * scale * inv_s
                    offs2 = tl.arange(0, 2 * BLOCK)
                    v_full2 = V - V % (2 * BLOCK)
                    if WORDS:
                        # a double block = two word blocks of sweep 1's shape (one layout for
                        # loads and stores: no shuffle through shared memory)
                        gw_row = tl.multiple_of(g_row.to(tl.pointer_type(tl.uint32)), 16)
                        na = tl.load(gw_row + offs_w, mask=tl.zeros_like(offs_w) < v_full2, other=0)
                        nb = tl.load(gw_row + BLOCK // 2 + offs_w, mask=tl.zeros_like(offs_w) < v_full2, other=0)
                        for start in range(0, v_full2, 2 * BLOCK):
                            ca = na
                            cb = nb
                            na = _next_block(gw_row, offs_w, start // 2, v_full2 // 2, BLOCK)
                            nb = _next_block(gw_row + BLOCK // 2, offs_w, start // 2, v_full2 // 2, BLOCK)
                            lo, hi = bf16x2_unpack(ca)
                            tl.store(gw_row + start // 2 + offs_w, bf16x2_pack(lo * f, hi * f, FAST))
                            lo, hi = bf16x2_unpack(cb)
                            tl.store(gw_row + start // 2 + BLOCK // 2 + offs_w, bf16x2_pack(lo * f, hi * f, FAST))
                    else:
                        gn = tl.load(g_row + offs2, mask=tl.zeros_like(offs2) < v_full2, other=0.0)
                        for start in range(0, v_full2, 2 * BLOCK):
                            gc = gn
                            gn = _next_block(g_row, offs2, start, v_full2, 2 * BLOCK)
                            _store_grad(g_row + start + offs2, gc.to(tl.float32) * f, offs2, False, RNE_FIX)
                    if TAIL2:
                        tmask = v_full2 + offs2 < V
                        _store_grad(
                            g_row + v_full2 + offs2,
                            _load_x(g_row + v_full2 + offs2, tmask, True) * f,
                            tmask,
                            True,
                            RNE_FIX,
                        )
                else:
                    # sweep 2: grad = softmax * dz/dx * scale, recomputed from the logits
                    f = scale * inv_s
                    for start in range(0, v_full, BLOCK):
                        _recompute_block(x_row, g_row, start + offs, V, m, f, cap, k_sig, HAS_CAP, False, FAST, RNE_FIX)
                    if TAIL:
                        _recompute_block(x_row, g_row, v_full + offs, V, m, f, cap, k_sig, HAS_CAP, True, FAST, RNE_FIX)
                # the target element: (p_t - 1) * dz/dx * scale, written once the sweep's stores
                # (by other threads of the program) are done: no compare per element in the sweep
                pt = tl.exp2((xt - m) * LOG2E) * inv_s
                gt = (pt - 1.0) * dzt * scale
                if RNE_FIX:
                    gt = round_bf16_rne(gt)
                tl.debug_barrier()
                tl.store(g_row + tgt, gt.to(G.dtype.element_ty), mask=in_range)
                tl.debug_barrier()
        else:
            tl.store(LOSS + row, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty)
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    tl.store(g_row + cols, zero, mask=cols < V)


def _ce_scale_kernel(G, stride_g, GO, stride_go, R, V, RNE_FIX: tl.constexpr, BLOCK: tl.constexpr):
    """G[r, :] *= GO[r] in place (GO: fp32, stride 0 for one scalar); rows with GO == 1 are
    skipped on the device, so the common loss.backward() costs a launch, not a pass over G."""
    offs = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), R, tl.num_programs(0)):
        go = tl.load(GO + row * stride_go)
        if go != 1.0:
            g_row = G + tl.cast(row, tl.int64) * stride_g
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32) * go
                _store_grad(g_row + cols, g, mask, True, RNE_FIX)


_CE_KERNEL = LazyKernel(_ce_kernel)
_CE_SCALE_KERNEL = LazyKernel(_ce_scale_kernel)

# Rows in flight (programs x bytes of the row sweep 2 re-reads) are kept within this share of the
# L2, so sweep 2 finds the row there (H100/H200: 50 MB L2 -> up to 200 rows of 128 KB: one bf16
# gradient row of V = 65536 per program on each of the 132 SMs).
L2_SHARE = 0.5
# elements per thread per block: two 16-byte loads in bf16 (four in fp32), and with the next
# block prefetched two more in flight during the math. The forward-only sweep has no store to
# wait for and no sweep 2 to hide latency behind: it takes 64 bytes per thread per block.
ELEMS_PER_THREAD = 16
FWD_BYTES_PER_THREAD = 64


def ce_elems_per_thread(want_grad, elt_bytes):
    """Elements per thread per block of the CE kernel (the launcher's and the cost report's)."""
    return ELEMS_PER_THREAD if want_grad else FWD_BYTES_PER_THREAD // elt_bytes


# warps per program: 512 threads on one SM. The sweeps need more than 64 registers per thread
# (ptxas caps them at 128 for 512 threads, so one program always fits): one program per SM.
CE_WARPS = 16


def ce_launch_config(V, reread_bytes, device, elems=ELEMS_PER_THREAD, per_sm=1):
    """(BLOCK, num_warps, programs) chosen on the host: no autotuning (its reruns would clobber
    in-place outputs and its timing runs sync the host).

    reread_bytes: bytes per element of the row that sweep 2 reads again (the stored gradient, or
    the logits when it recomputes; 0 without a sweep 2). per_sm: programs that fit on one SM.
    Programs: the same number on every SM (a multiple of the SM count, so no SM runs more
    programs than another), all resident at once (a persistent kernel must not queue a second
    wave), and only as many per SM as the L2 holds their rows (at least one per SM: with rows
    too long for that, part of sweep 2 misses L2, which costs less than idle SMs)."""
    if interpreting() or device.type != "cuda":
        return min(4096, next_pow2(V)), 4, device_props(device)[0]
    block = min(next_pow2(V), 32 * CE_WARPS * elems)
    warps = max(1, min(CE_WARPS, block // (32 * elems)))
    sms, l2 = device_props(device)
    if reread_bytes:
        per_sm = max(1, min(per_sm, int(L2_SHARE * l2) // (V * reread_bytes) // sms))
    return block, warps, sms * per_sm


def ce_rows_triton(logits, targets, softcap, scale, want_grad, grad_dtype=None, ignore_index=-1, inplace=False):
    """Launch the fused kernel over the rows of `logits` [R, V].

    scale: python float, 0-dim/1-element tensor, or per-row tensor [R] (fp32) multiplying the
    gradient. Returns (loss [R] fp32, grad [R, V] or None). inplace: the gradient overwrites
    `logits` (which must then be contiguous along V and of the gradient's dtype).
    """
    R, V = logits.shape
    dev = logits.device
    if logits.stride(1) != 1:
        if inplace:
            raise ValueError("grad_in_logits needs logits contiguous along the vocab dimension")
        logits = logits.contiguous()
    targets = targets.contiguous()  # the kernel indexes targets with stride 1
    loss = torch.empty(R, dtype=torch.float32, device=dev)
    grad_dtype = grad_dtype or logits.dtype
    if want_grad:
        if inplace and grad_dtype != logits.dtype:
            raise ValueError("grad_in_logits needs the gradient in the logits' dtype")
        grad = logits if inplace else torch.empty(R, V, dtype=grad_dtype, device=dev)
    else:
        grad = loss  # dummy pointer, never written (WRITE_GRAD=False)
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((1,), float(scale), dtype=torch.float32, device=dev)
    scale = scale.to(device=dev, dtype=torch.float32).reshape(-1)
    stride_scale = 0 if scale.numel() == 1 else 1
    if R == 0:
        return loss, (grad if want_grad else None)
    cap = float(softcap) if softcap is not None else 1.0
    fixed = softcap is not None and softcap <= 40.0
    rescale = fixed and want_grad and grad.dtype != torch.float16
    # sweep 2 re-reads the stored gradient (rescale) or the logits (recompute); none without grad
    reread = (grad.element_size() if rescale else logits.element_size()) if want_grad else 0
    block, warps, progs = ce_launch_config(V, reread, dev, ce_elems_per_thread(want_grad, logits.element_size()))
    _CE_KERNEL.get()[(min(R, progs),)](
        logits,
        logits.stride(0),
        targets,
        loss,
        grad,
        grad.stride(0) if want_grad else 0,
        scale,
        stride_scale,
        R,
        V,
        int(ignore_index),
        cap,
        -2.0 * 1.4426950408889634 / cap,
        HAS_CAP=softcap is not None,
        FIXED_MAX=fixed,
        WRITE_GRAD=bool(want_grad),
        # the stored unnormalised gradient can underflow fp16's range: recompute there
        RESCALE=rescale,
        FAST=not interpreting(),
        RNE_FIX=interpreting() and want_grad and grad.dtype == torch.bfloat16,
        BLOCK=block,
        TAIL=V % block != 0,
        TAIL2=V % (2 * block) != 0,
        WORDS=fixed and _words_ok(logits, grad if want_grad else None),
        num_warps=warps,
    )
    return loss, (grad if want_grad else None)


def _words_ok(logits, grad):
    """The bf16 rows (and gradient rows) can be read as uint32 words 16 bytes at a time: bf16,
    every row starting on a 16-byte boundary (checked exactly; otherwise the element path)."""
    return all(
        t.dtype == torch.bfloat16 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0
        for t in (logits, grad)
        if t is not None
    )


def scale_rows_(grad, go):
    """grad [R, V] *= go (0-dim, or [R] per row) in place, on the device, no host sync."""
    R, V = grad.shape
    go = go.to(device=grad.device, dtype=torch.float32).reshape(-1).contiguous()
    if R == 0:
        return grad
    # a plain scaling pass: few registers, two programs per SM
    block, warps, progs = ce_launch_config(V, 0, grad.device, per_sm=2)
    _CE_SCALE_KERNEL.get()[(min(R, progs),)](
        grad,
        grad.stride(0),
        go,
        0 if go.numel() == 1 else 1,
        R,
        V,
        RNE_FIX=interpreting() and grad.dtype == torch.bfloat16,
        BLOCK=block,
        num_warps=warps,
    )
    return grad


class _CrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, softcap, reduction, grad_enabled, inplace):
        need_grad = ctx.needs_input_grad[0] and grad_enabled  # no gradient work under no_grad
        valid = targets != ignore_index
        n_valid = valid.sum()  # stays on device: no sync
        if reduction == "mean":
            scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        else:
            scale = 1.0
        loss_rows, grad = ce_rows_triton(
            logits,
            targets,
            softcap,
            scale,
            need_grad,
            logits.dtype,
            ignore_index=ignore_index,
            inplace=inplace and need_grad,
        )
        ctx.reduction = reduction
        ctx.used = False
        if need_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:  # the gradient was scaled in place: a second backward would scale it twice
            raise RuntimeError("cross_entropy (triton): backward can run only once (retain_graph is not supported)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # in place, no [N, V] temporary; go == 1 is tested on the device (no host sync)
        scale_rows_(grad, grad_output)
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits, targets, *, ignore_index=-1, softcap=None, reduction="mean", backend="auto", grad_in_logits=False
):
    """Cross-entropy of logits [N, V] (bf16/fp16/fp32; float64 on the torch path) against int
    targets [N], computed in fp32 (fp64 for float64).

    Rows with target == ignore_index contribute 0 loss and 0 gradient; any other target outside
    [0, V) raises (on CUDA through a device-side assert, reported at the next sync). reduction:
    "mean" (over non-ignored rows; 0 if there are none), "sum", or "none" (fp32 [N], 0 for
    ignored rows). softcap s applies s*tanh(x/s) to the logits first. Leading dims are
    flattened: logits [..., V] with targets [...] is accepted ("none" then returns shape [...]).
    grad_in_logits: the Triton path may write the gradient into the logits' memory (as
    Liger-Kernel does): saves an [N, V] buffer; the logits must not be used after the call.
    """
    check_float("logits", logits)
    check_targets(targets)
    check_reduction(reduction)
    softcap = check_softcap(softcap)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
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
        out = _CrossEntropyTriton.apply(
            logits, targets, ignore_index, softcap, reduction, torch.is_grad_enabled(), bool(grad_in_logits)
        )
    return out.reshape(out_shape) if reduction == "none" else out
