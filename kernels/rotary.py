"""Rotary position embedding for q and k in one Triton launch, in the half-split convention of
nanochat's `apply_rotary_emb` (identical at 48abd7d and 92d63d4; docs/design.md, "Model"):

x1 = x[..., :D/2], x2 = x[..., D/2:];  y1 = x1*cos + x2*sin,  y2 = -x1*sin + x2*cos.
The backward is the inverse rotation (sin -> -sin), run by the same kernel.
"""

from __future__ import annotations

import torch

from ._backend import LazyKernel, check_float, compute_dtype, device_check, interpreting, next_pow2, resolve_backend, tl
from ._common import round_bf16_rne  # noqa: F401 (kernel global)


def rotary_tables(seq_len, head_dim, base=10000, device=None, dtype=torch.float32):
    """(cos, sin), each [seq_len, head_dim // 2] in `dtype` (fp32; fp64 for float64 models);
    angles computed in fp64 for accuracy."""
    if int(head_dim) <= 0 or int(head_dim) % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if int(seq_len) < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    half = int(head_dim) // 2
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, half, dtype=torch.float64) * 2.0 / head_dim))
    ang = torch.outer(torch.arange(int(seq_len), dtype=torch.float64), inv_freq)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Plain PyTorch reference (backend="torch"); autograd derives the inverse rotation.
# --------------------------------------------------------------------------------------------


def _gather_tables(cos, sin, T, offset, position_ids):
    if position_ids is None:
        c, s = cos[offset : offset + T], sin[offset : offset + T]  # [T, half]
        return c[None, :, None, :], s[None, :, None, :]
    pos = position_ids.long()
    c, s = cos[pos], sin[pos]  # [T, half] or [B, T, half]
    if c.dim() == 2:
        return c[None, :, None, :], s[None, :, None, :]
    return c[:, :, None, :], s[:, :, None, :]


def rotate_torch(x, c, s):
    half = x.shape[-1] // 2
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = c.to(dt), s.to(dt)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1).to(x.dtype)


def apply_rotary_torch(q, k, cos, sin, offset=0, position_ids=None):
    c, s = _gather_tables(cos, sin, q.shape[1], offset, position_ids)
    return rotate_torch(q, c, s), rotate_torch(k, c, s)


# --------------------------------------------------------------------------------------------
# Triton kernel: rows of q and k (one row = one (b, t, head) vector of D) in one launch.
# Rows [0, n_q) come from q, rows [n_q, n_q + n_k) from k; each row picks its pointers with a
# vector select, so there is a single code path and no per-tensor launch.
# --------------------------------------------------------------------------------------------


def _rotary_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    POS,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sp_b,
    sp_t,
    stride_tab,
    T,
    HQ,
    HKV,
    n_q,
    n_rows,
    offset,
    max_pos,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_POS: tl.constexpr,
    INVERSE: tl.constexpr,
    ALIGNED: tl.constexpr,
    RNE_FIX: tl.constexpr,
):
    # row index math in int32 (rows < 2**31, checked on the host: int64 division is slow);
    # memory offsets in int64
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # global row ids
    d = tl.arange(0, BLOCK_D)
    row_ok = r < n_rows
    is_q = r < n_q
    rr = tl.where(is_q, r, r - n_q)  # row inside its own tensor
    H = tl.where(is_q, HQ, HKV)
    bt = rr // H
    h = (rr - bt * H).to(tl.int64)
    b32 = bt // T
    t = (bt - b32 * T).to(tl.int64)
    b = b32.to(tl.int64)
    rr = rr.to(tl.int64)
    in_off = tl.where(is_q, b * sq_b + t * sq_t + h * sq_h, b * sk_b + t * sk_t + h * sk_h)
    m2 = row_ok[:, None] & (d[None, :] < HALF)
    # head dim has unit stride (ensured by the wrapper) so the loads vectorise
    x_row = tl.where(is_q, Q, K) + in_off
    o_row = tl.where(is_q, QO, KO) + rr * (2 * HALF)
    if ALIGNED:
        # a pointer select drops the alignment info; restore it (checked on the host) so the
        # loads and stores vectorise
        x_row = tl.multiple_of(x_row, 16)
        o_row = tl.multiple_of(o_row, 16)
    # x first: its loads are in flight while the table addresses wait for the positions
    x1p = x_row[:, None] + d[None, :]
    x1 = tl.load(x1p, mask=m2, other=0.0)
    x2 = tl.load(x1p + HALF, mask=m2, other=0.0)
    if HAS_POS:
        pos = tl.load(POS + b * sp_b + t * sp_t, mask=row_ok, other=0).to(tl.int64)
    else:
        pos = t + offset
    pos_ok = row_ok & (pos >= 0) & (pos < max_pos)  # never read outside the tables
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    tab = pos[:, None] * stride_tab + d[None, :]
    mt = pos_ok[:, None] & (d[None, :] < HALF)
    c = tl.load(COS + tab, mask=mt, other=0.0)
    s = tl.load(SIN + tab, mask=mt, other=0.0)
    if INVERSE:
        s = -s
    y1 = x1 * c + x2 * s
    y2 = x2 * c - x1 * s
    # outputs are contiguous [B, T, H, D]
    y1p = o_row[:, None] + d[None, :]
    if RNE_FIX:
        y1 = round_bf16_rne(y1)
        y2 = round_bf16_rne(y2)
    tl.store(y1p, y1.to(QO.dtype.element_ty), mask=m2)
    tl.store(y1p + HALF, y2.to(QO.dtype.element_ty), mask=m2)


_ROTARY_KERNEL = LazyKernel(_rotary_kernel)


def _rotary_triton(q, k, cos, sin, offset, position_ids, inverse):
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    half = D // 2
    # any layout over (B, T, H) is fine (e.g. views of a fused qkv), but D must be contiguous
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1:
        k = k.contiguous()
    qo = torch.empty((B, T, HQ, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, T, HKV, D), dtype=k.dtype, device=k.device)
    n_q, n_k = B * T * HQ, B * T * HKV
    n_rows = n_q + n_k
    if n_rows == 0:
        return qo, ko
    if n_rows + 4096 >= 2**31:
        raise ValueError(f"too many rows for the rotary kernel ({n_rows} = B*T*(Hq+Hkv) >= 2**31)")
    BLOCK_D, BLOCK_R, warps = rotary_launch_config(D, n_rows)
    if position_ids is not None:
        pos = position_ids
        sp_b, sp_t = (pos.stride(0), pos.stride(1)) if pos.dim() == 2 else (0, pos.stride(0))
    else:
        pos, sp_b, sp_t = cos, 0, 0  # dummy pointer, never read (HAS_POS=False)
    grid = (triton_cdiv(n_rows, BLOCK_R),)
    _ROTARY_KERNEL.get()[grid](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        pos,
        *q.stride()[:3],
        *k.stride()[:3],
        sp_b,
        sp_t,
        cos.stride(0),
        T,
        HQ,
        HKV,
        n_q,
        n_rows,
        int(offset),
        cos.shape[0],
        HALF=half,
        BLOCK_D=BLOCK_D,
        BLOCK_R=BLOCK_R,
        HAS_POS=position_ids is not None,
        INVERSE=inverse,
        ALIGNED=_aligned16(q, k, qo, ko),
        RNE_FIX=interpreting() and q.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return qo, ko


def rotary_launch_config(D, n_rows):
    """(BLOCK_D, BLOCK_R, num_warps): ~4K half-rows elements (x1 and x2: 2x that) per program of
    4 warps, so each thread issues all its 16-byte loads (x and the tables) before any math:
    enough bytes in flight per SM (the cost report models it)."""
    block_d = next_pow2(D // 2)
    return block_d, max(1, min(next_pow2(n_rows), 4096 // block_d)), 4


def _aligned16(q, k, qo, ko):
    """Every (b, t, h) row of q, k, q_out, k_out starts on a 16-byte boundary (the kernel's
    vectorisation promise; checked exactly, else the kernel runs without it)."""
    for x in (q, k, qo, ko):
        es = x.element_size()
        if x.data_ptr() % 16 or any((st * es) % 16 for st in x.stride()[:3]):
            return False
    return True


def triton_cdiv(a, b):
    return (a + b - 1) // b


class _RotaryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, offset, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.offset = offset
        return _rotary_triton(q, k, cos, sin, offset, position_ids, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        cos, sin, position_ids = ctx.saved_tensors
        gq_in, gk_in = _rotary_triton(gq, gk, cos, sin, ctx.offset, position_ids, inverse=True)
        return gq_in, gk_in, None, None, None, None


def apply_rotary(q, k, cos, sin, *, offset=0, position_ids=None, backend="auto"):
    """Rotate q [B, T, Hq, D] and k [B, T, Hkv, D] (Hkv may differ: GQA) by positions.

    cos/sin: [T_max, D/2] tables (see `rotary_tables`). Positions are offset..offset+T-1 (offset =
    KV-cache length; an int, or a 1-element integer tensor, read on the device only), or
    `position_ids` [B, T] / [T] (ints) for packed rows whose positions restart per document. Returns (q_out, k_out) in the input dtype; math in fp32 (fp64 for float64, on
    the torch path).
    """
    check_float("q", q)
    check_float("k", k)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ ({q.dtype} vs {k.dtype})")
    if D % 2:
        raise ValueError(f"head dim must be even, got {D}")
    for name, tab in (("cos", cos), ("sin", sin)):
        if not isinstance(tab, torch.Tensor) or not tab.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor")
        if tab.dim() != 2 or tab.shape[1] != D // 2:
            raise ValueError(f"{name} must be [T_max, D/2] = [*, {D // 2}], got {tuple(tab.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} shapes differ")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError("q, k, cos, sin must be on the same device")
    T_max = cos.shape[0]
    offset_t = None
    if isinstance(offset, torch.Tensor):
        # a device-side offset (e.g. a KV cache length kept on the GPU): reading it would sync
        # the host and break CUDA-graph capture; its positions offset..offset+T-1 become
        # position_ids on the device, checked there
        if offset.numel() != 1 or offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
            raise ValueError(f"offset must be a non-negative int or a 1-element integer tensor, got {offset!r}")
        if position_ids is not None:
            raise ValueError("pass either offset or position_ids, not both")
        offset_t = offset.reshape(()).to(device=q.device, dtype=torch.long)
        device_check(
            (offset_t >= 0) & (offset_t + T <= T_max),
            f"offset must be >= 0 and offset + T (T = {T}) within the rotary table length {T_max}",
        )
        position_ids = offset_t + torch.arange(T, device=q.device)
        offset = 0
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex():
            raise ValueError("position_ids must be an integer tensor")
        if tuple(position_ids.shape) not in ((B, T), (T,)):
            raise ValueError(f"position_ids must be [B, T] = [{B}, {T}] or [T], got {tuple(position_ids.shape)}")
        if position_ids.device != q.device:
            raise ValueError("position_ids must be on the same device as q")
        if offset != 0:
            raise ValueError("pass either offset or position_ids, not both")
        if position_ids.numel() and offset_t is None:  # on the device, no host sync; the kernel also masks table reads
            device_check(((position_ids >= 0) & (position_ids < T_max)).all(), f"position_ids must be in [0, {T_max})")
    elif offset + T > T_max:
        raise ValueError(f"offset + T = {offset + T} exceeds the rotary table length {T_max}")

    be = resolve_backend(backend, q, k)
    if be == "torch":
        return apply_rotary_torch(q, k, cos, sin, offset, position_ids)
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    return _RotaryTriton.apply(q, k, cos, sin, offset, position_ids)
