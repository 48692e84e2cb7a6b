"""Device functions shared by the kernels, written once: fast exp2 / reciprocal, exp2 by a
polynomial on the FMA pipe, the softcap (value and derivative from one sigmoid), and the
interpreter's bf16 rounding fix.

They are plain functions marked @device_fn and become `triton.jit` helpers lazily, in the mode
(interpreter or compiled) of the kernel that calls them (see _backend.bind_device_fns).
"""

from __future__ import annotations

from ._backend import device_fn, tl

# a kernel may only read globals that are constexpr
LOG2E = tl.constexpr(1.4426950408889634) if tl is not None else 1.4426950408889634


@device_fn
def fast_exp2(x, FAST: tl.constexpr):
    """2**x. FAST (compiled kernels): one MUFU.EX2 (ex2.approx.ftz, ~2 ulp). tl.exp2 compiles to
    the non-ftz form, which ptxas wraps in denormal fix-ups (3 extra instructions per element)."""
    if FAST:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp2(x)
    return y


# 2**f on [-0.5, 0.5]: degree-5 fit of the relative error (max 2.2e-7 evaluated in fp32 by
# Horner, the accuracy of MUFU.EX2's ex2.approx), lowest degree first
EXP2_C0 = tl.constexpr(1.0000001192092896) if tl is not None else 1.0000001192092896
EXP2_C1 = tl.constexpr(0.6931469440460205) if tl is not None else 0.6931469440460205
EXP2_C2 = tl.constexpr(0.24022121727466583) if tl is not None else 0.24022121727466583
EXP2_C3 = tl.constexpr(0.05550742521882057) if tl is not None else 0.05550742521882057
EXP2_C4 = tl.constexpr(0.009675459936261177) if tl is not None else 0.009675459936261177
EXP2_C5 = tl.constexpr(0.0013266970636323094) if tl is not None else 0.0013266970636323094
# 1.5 * 2**23: x + ROUND_MAGIC rounds x to the nearest integer j, held in the low mantissa bits
ROUND_MAGIC = tl.constexpr(12582912.0) if tl is not None else 12582912.0


@device_fn
def exp2_poly(a, b, c):
    """2**(a*b + c - ROUND_MAGIC) on the FMA pipe, no MUFU (as FlashAttention-4 does for part
    of its exponentials): the special-function unit gives 16 results per SM and clock against
    128 FMAs, so moving one of the cross-entropy's three exponentials per logit here keeps it
    memory-bound on an H200.

    c is ROUND_MAGIC + (the exponent's offset), rounded to fp32 by the caller; the offset it
    really holds is c - ROUND_MAGIC (an exact fp32 difference), which the caller accounts for.
    r = fma(a, b, c) rounds x = a*b + c - ROUND_MAGIC to the integer j (held in r's low mantissa
    bits), f = fma(a, b, c - r) = x - j in [-0.5, 0.5] exactly, 2**f by the polynomial, and
    bits(r) << 23 (= j << 23 modulo 2**32) adds j to the exponent: 9 instructions, relative
    error <= 2.2e-7 (ex2.approx's). Range (the caller's promise): -125 <= x <= 0, below that
    the exponent field would wrap."""
    r = a * b + c
    f = a * b + (c - r)
    p = EXP2_C5 * f + EXP2_C4
    p = p * f + EXP2_C3
    p = p * f + EXP2_C2
    p = p * f + EXP2_C1
    p = p * f + EXP2_C0
    y = p.to(tl.uint32, bitcast=True) + (r.to(tl.uint32, bitcast=True) << 23)
    return y.to(tl.float32, bitcast=True)


@device_fn
def fast_rcp(x, FAST: tl.constexpr):
    """1/x. FAST: one MUFU.RCP (rcp.approx.ftz, ~1 ulp) instead of the IEEE divide's ~10
    instructions with a slow-path branch."""
    if FAST:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = 1.0 / x
    return y


@device_fn
def softcap_sigmoid(x, k, FAST: tl.constexpr):
    """t = sigmoid(2x/cap), given k = -2*log2(e)/cap.

    softcap(x) = cap*tanh(x/cap) = cap*(2t - 1) and its derivative sech^2(x/cap) = 4t(1 - t), so
    one exp2 and one reciprocal give both (no divide, no series, no separate tanh). The absolute
    error of t is ~1e-7, which is what the cross-entropy sees (it only uses differences of
    softcapped logits). The hardware tanh (tanh.approx.f32) is not used: its 2^-11 relative error
    is up to 7e-3 in a softcapped logit at cap 15, 1000x the fp32 tests' bound.

    Accuracy of the derivative 4t(1 - t), computed as 4(t - t*t): for x <= 0 (t <= 1/2) it has
    t's relative error, ~2e-7. For x > 0, 1 - t = exp(-2x/cap) cancels against t's rounding
    (~6e-8 near 1): relative error ~6e-8 * exp(2x/cap), i.e. <= 1e-5 for x <= 2.5*cap, 2e-4 at
    4*cap, O(1) beyond ~8*cap. The absolute error stays <= ~3e-7 everywhere, and the gradient
    there is that times the softmax: the loss and the gradient's scale are unaffected (the
    float64 reference of the torch path uses sech^2, exact at any x)."""
    if FAST:
        # 2^(kx) is +inf for very negative x and rcp(inf) = 0: the right limit, no special case
        t = fast_rcp(1.0 + fast_exp2(x * k, FAST), FAST)
    else:
        # the interpreter (numpy) would warn on that overflow: same value from 2^-|kx|
        e = tl.exp2(-tl.abs(x * k))
        r = 1.0 / (1.0 + e)
        t = tl.where(x * k > 0.0, e * r, r)
    return t


@device_fn
def bf16x2_unpack(w):
    """(low, high) bf16 halves of uint32 words, as fp32: one shift or one mask each. (Triton's
    own bf16 -> fp32 conversion spends 1.5 instructions per element: a byte permute for the high
    half, then a shift.)"""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
    return lo, hi


@device_fn
def bf16x2_pack(lo, hi, FAST: tl.constexpr):
    """uint32 words bf16(lo) | bf16(hi) << 16, rounded to nearest even: one cvt.rn.bf16x2.f32
    per pair (FAST); the interpreter rounds by hand."""
    if FAST:
        w = tl.inline_asm_elementwise(
            "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        w = (round_bf16_rne(lo).to(tl.uint32, bitcast=True) >> 16) | round_bf16_rne(hi).to(tl.uint32, bitcast=True)
    return w


@device_fn
def round_bf16_rne(y):
    """The interpreter truncates fp32 -> bf16; round to nearest even by hand so results match the
    GPU (only traced when the caller's RNE_FIX constexpr is set: never in a compiled kernel)."""
    b = y.to(tl.uint32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
