"""Numerics of rustchat.kernels (cross_entropy, linear_cross_entropy, apply_rotary) against float64.

Triton kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1). The interpreter
only works when triton itself is imported with the variable set, so this module sets it before
the first `import triton` and restores it right after (other test modules keep their backends);
the kernels read it at call time. If triton was already imported in compiled mode (another test
module imported it first, or a GPU machine where we must not break compiled Triton for the rest
of the session), the interpreter tests are re-run in a subprocess instead
(test_triton_interpreter_in_subprocess), and on CUDA the triton tests also run compiled in-process.

Inputs are fresh random every run; every test prints its seed (shown by pytest on failure);
rerun with KERNEL_TEST_SEED=<seed> to reproduce.
"""

import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_CHILD = os.environ.get("RUSTCHAT_KERNELS_INTERP_CHILD") == "1"
_CUDA = torch.cuda.is_available()
if _CHILD or (not _CUDA and "triton" not in sys.modules):
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (initialised in interpreter mode)
        import triton.language  # noqa: F401

        INTERP_IN_PROCESS = True
    except Exception:  # pragma: no cover - triton missing
        INTERP_IN_PROCESS = False
    if _CHILD:
        pass  # the child keeps the variable for its whole life
    elif _old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _old
else:
    INTERP_IN_PROCESS = False

from rustchat.kernels import apply_rotary, cross_entropy, linear_cross_entropy, rotary_tables  # noqa: E402
from rustchat.kernels import _backend  # noqa: E402
from rustchat.kernels._common import ROUND_MAGIC, exp2_poly  # noqa: E402,F401 (a test kernel's globals)
from rustchat.kernels.rotary import triton_cdiv  # noqa: E402

lce_module = sys.modules["rustchat.kernels.linear_cross_entropy"]  # the module, not the function

# device the triton backend is tested on in this process (None: not testable here)
if INTERP_IN_PROCESS:
    TRITON_DEV = "cpu"
elif _CUDA and _backend.HAS_TRITON:
    TRITON_DEV = "cuda"
else:
    TRITON_DEV = None

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _interp_env(monkeypatch):
    if INTERP_IN_PROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def seed():
    s = os.environ.get("KERNEL_TEST_SEED")
    s = int(s) if s else random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    print(f"seed={s}  (reproduce: KERNEL_TEST_SEED={s})")
    return s


def device_for(backend):
    if backend == "torch":
        return "cpu"
    if TRITON_DEV is None:
        pytest.skip("triton backend not testable in this process (see test_triton_interpreter_in_subprocess)")
    return TRITON_DEV


def close(actual, expected, rtol, what, seed, atol=0.0):
    """max |a - e| <= rtol * max|e| + atol (a relative error on the scale of the tensor)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)} (seed={seed})"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (seed={seed})"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= rtol * scale + atol, f"{what}: max err {err:.3e} > {rtol:g} * {scale:.3e} + {atol:g} (seed={seed})"
    return err


def maxerr(a, e):
    return (a.detach().double().cpu() - e.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------
# float64 references
# ------------------------------------------------------------------------------------------


def ref_ce(x64, targets, softcap, reduction, ignore_index=-1):
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    rows = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return rows
    n = (targets != ignore_index).sum().clamp(min=1)
    return rows.sum() if reduction == "sum" else rows.sum() / n


def ref_ce_with_grads(logits, targets, softcap, reduction, go, ignore_index=-1):
    x = logits.detach().cpu().double().requires_grad_()
    loss = ref_ce(x, targets.cpu(), softcap, reduction, ignore_index)
    (g,) = torch.autograd.grad(loss, (x,), go.cpu().double())
    return loss.detach(), g


def eager_ce(logits, targets, softcap, reduction, ignore_index=-1):
    """PyTorch's own path for low-precision logits: upcast to fp32, softcap, F.cross_entropy."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)


def make_targets(N, V, n_ignored, device, ignore_index=-1):
    t = torch.randint(0, V, (N,), device=device)
    t[0] = 0
    t[1] = V - 1  # both ends of the vocab
    if n_ignored:
        idx = torch.randperm(N - 2, device=device)[:n_ignored] + 2
        t[idx] = ignore_index
    return t


def grad_output_for(loss):
    if loss.dim() == 0:
        return torch.tensor(random.choice([0.37, 2.5, -1.3]), dtype=loss.dtype, device=loss.device)
    return torch.randn_like(loss)


# ------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_fp64(backend, dtype, softcap, reduction, seed):
    dev = device_for(backend)
    N, V = 48, 1000
    logits = (torch.randn(N, V, device=dev) * 4).to(dtype).requires_grad_()
    targets = make_targets(N, V, n_ignored=15, device=dev)
    loss = cross_entropy(logits, targets, softcap=softcap, reduction=reduction, backend=backend)
    assert loss.dtype == torch.float32
    go = grad_output_for(loss)
    (g,) = torch.autograd.grad(loss, (logits,), go)
    assert g.dtype == dtype
    ref_loss, ref_g = ref_ce_with_grads(logits, targets, softcap, reduction, go)
    if dtype == torch.float32:
        close(loss, ref_loss, 1e-5, "loss", seed)
        close(g, ref_g, 1e-5, "grad", seed)
    else:
        # bf16: within the error of PyTorch's own bf16 path + one bf16 ulp of the largest value
        x = logits.detach().clone().requires_grad_()
        e_loss = eager_ce(x, targets, softcap, reduction)
        (e_g,) = torch.autograd.grad(e_loss, (x,), go)
        close(loss, ref_loss, 0.0, "loss", seed, atol=maxerr(e_loss, ref_loss) + 1e-5 * ref_loss.abs().max().item())
        close(g, ref_g, 0.0, "grad", seed, atol=maxerr(e_g, ref_g) + 2**-8 * ref_g.abs().max().item())
    # ignored rows: zero loss and zero gradient
    ign = targets == -1
    assert (g[ign] == 0).all()
    if reduction == "none":
        assert (loss[ign] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_vocab_not_multiple_of_block(backend, dtype, seed):
    dev = device_for(backend)
    N, V = 8, 32768 + 17
    logits = (torch.randn(N, V, device=dev) * 3).to(dtype).requires_grad_()
    targets = make_targets(N, V, n_ignored=2, device=dev)
    targets[2] = V - 17  # in the last, partial block
    loss = cross_entropy(logits, targets, softcap=15.0, backend=backend)
    (g,) = torch.autograd.grad(loss, (logits,))
    ref_loss, ref_g = ref_ce_with_grads(logits, targets, 15.0, "mean", torch.tensor(1.0))
    if dtype == torch.float32:
        close(loss, ref_loss, 1e-5, "loss", seed)
        close(g, ref_g, 1e-5, "grad", seed)
    else:
        close(loss, ref_loss, 1e-5, "loss", seed)
        close(g, ref_g, 2**-8, "grad", seed)


@pytest.mark.parametrize("V", [8192, 8200])
def test_cross_entropy_bf16_word_path(V, seed):
    """bf16 rows read and written as uint32 pairs (16-byte aligned rows): several full blocks (the
    prefetch chain, sweep 2's double blocks) with and without a tail, separate and in-place
    gradient, against float64; and an odd row stride (the element path) gives the same.
    (grad_output 1: another value rescales the bf16 gradient in place, a second rounding.)"""
    dev = device_for("triton")
    ce_mod = sys.modules["rustchat.kernels.cross_entropy"]
    N = 5
    base = (torch.randn(N, V + 1, device=dev) * 4).to(torch.bfloat16)
    t = make_targets(N, V, n_ignored=1, device=dev)
    t[2] = V - 1
    x = base[:, :V].contiguous().requires_grad_()
    assert ce_mod._words_ok(x, x)
    loss = cross_entropy(x, t, softcap=15.0, backend="triton")
    (g,) = torch.autograd.grad(loss, (x,), torch.tensor(1.0))
    ref_loss, ref_g = ref_ce_with_grads(x, t, 15.0, "mean", torch.tensor(1.0))
    close(loss, ref_loss, 1e-5, "loss", seed)
    close(g, ref_g, 2**-8, "grad", seed)
    buf = base[:, :V].contiguous()
    x2 = buf.requires_grad_()
    loss2 = cross_entropy(x2, t, softcap=15.0, backend="triton", grad_in_logits=True)
    (g2,) = torch.autograd.grad(loss2, (x2,), torch.tensor(1.0))
    assert torch.equal(loss, loss2) and torch.equal(g, g2)
    # a view with an odd row stride: rows not 16-byte aligned, the element path, same result
    odd = torch.empty(N, V + 1, dtype=torch.bfloat16, device=dev)[:, :V].copy_(base[:, :V]).requires_grad_()
    assert not ce_mod._words_ok(odd, None)
    loss3 = cross_entropy(odd, t, softcap=15.0, backend="triton")
    (g3,) = torch.autograd.grad(loss3, (odd,), torch.tensor(1.0))
    close(loss3, loss, 1e-6, "element path loss", seed)
    close(g3, g, 2**-8, "element path grad", seed)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_all_ignored(backend, reduction, seed):
    dev = device_for(backend)
    N, V = 6, 1000
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(N, V, device=dev).to(dtype).requires_grad_()
        targets = torch.full((N,), -1, dtype=torch.long, device=dev)
        loss = cross_entropy(logits, targets, softcap=15.0, reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(loss, (logits,), grad_output_for(loss))
        assert torch.isfinite(loss).all() and (loss == 0).all(), f"loss {loss} (seed={seed})"
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_single_valid_row_and_custom_ignore_index(backend, seed):
    dev = device_for(backend)
    N, V = 5, 1000
    logits = torch.randn(N, V, device=dev, requires_grad=True)
    targets = torch.full((N,), -100, dtype=torch.long, device=dev)
    targets[3] = V - 1
    for red in ("mean", "sum", "none"):
        loss = cross_entropy(logits, targets, ignore_index=-100, reduction=red, backend=backend)
        go = grad_output_for(loss)
        (g,) = torch.autograd.grad(loss, (logits,), go)
        ref_loss, ref_g = ref_ce_with_grads(logits, targets, None, red, go, ignore_index=-100)
        close(loss, ref_loss, 1e-5, f"loss[{red}]", seed)
        close(g, ref_g, 1e-5, f"grad[{red}]", seed)


@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_extreme_logits(backend, softcap, seed):
    """Logits near +-1e4 (softcap saturates; without it the max subtraction must hold) and
    p(target) near 1."""
    dev = device_for(backend)
    N, V = 12, 1000
    x = torch.randn(N, V) * 2
    sign = torch.where(torch.rand(N, V) < 0.5, -1.0, 1.0)
    x[:6] = sign[:6] * 1e4 + torch.randn(6, V)  # rows 0-5: huge logits
    targets = torch.randint(0, V, (N,))
    # rows 6-11: the target dominates -> p(target) ~ 1 (loss ~ 1e-7 .. 1e-3)
    for r in range(6, N):
        x[r, targets[r]] = 14.0 if softcap else 25.0 + r
    logits = x.to(dev).requires_grad_()
    targets = targets.to(dev)
    for red in ("mean", "none"):
        loss = cross_entropy(logits, targets, softcap=softcap, reduction=red, backend=backend)
        go = grad_output_for(loss)
        (g,) = torch.autograd.grad(loss, (logits,), go)
        ref_loss, ref_g = ref_ce_with_grads(logits, targets, softcap, red, go)
        # the losses of the p~1 rows are differences of O(cap) numbers: compare on the
        # scale of the logits that produce them (fp32 eps * |z|), as any fp32 implementation
        zscale = 15.0 if softcap else 1e4
        close(loss, ref_loss, 1e-5, f"loss[{red}]", seed, atol=4e-7 * zscale)
        close(g, ref_g, 1e-5, f"grad[{red}]", seed, atol=1e-7)
        assert torch.isfinite(g).all()
    # the p ~ 1 rows alone: loss is tiny and must stay >= ~0 and accurate in absolute terms
    loss = cross_entropy(logits[6:], targets[6:], softcap=softcap, reduction="none", backend=backend)
    ref = ref_ce(logits[6:].detach().cpu().double(), targets[6:].cpu(), softcap, "none")
    close(loss, ref, 0.0, "p~1 losses", seed, atol=1e-5)


if _backend.HAS_TRITON:
    tl = _backend.tl

    def _exp2_poly_kernel(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0)
        tl.store(Y + offs, exp2_poly(1.0, x, ROUND_MAGIC), mask=m)


def test_exp2_poly_accuracy(seed):
    """The FMA-pipe exponential (kernels/_common.py exp2_poly) over its whole range [-125, 0]:
    relative error <= 2.5e-7 against float64 (2.2e-7 stated; the interpreter does not fuse the
    Horner steps' multiply-adds, the GPU does), at integers, half-integers (the range
    reduction's edges) and random points."""
    dev = device_for("triton")
    x = torch.cat(
        [
            torch.arange(-125, 1, dtype=torch.float64),
            torch.arange(-124.5, 0, 1, dtype=torch.float64),
            torch.arange(-124.5, 0, 1, dtype=torch.float64) + 1e-6,
            -125 * torch.rand(20000, dtype=torch.float64),
        ]
    )
    xf = x.float().to(dev)
    y = torch.empty_like(xf)
    kernel = _backend.LazyKernel(_exp2_poly_kernel).get()
    kernel[(triton_cdiv(xf.numel(), 1024),)](xf, y, xf.numel(), BLOCK=1024)
    ref = torch.exp2(xf.double().cpu())
    rel = ((y.double().cpu() - ref).abs() / ref).max().item()
    assert rel <= 2.5e-7, f"exp2_poly relative error {rel:.2e} (seed={seed})"


def test_softcap_derivative_accuracy_range_triton(seed):
    """The kernel's softcap derivative, as stated in kernels/_common.py (softcap_sigmoid):
    every gradient element within 2e-5 relative of float64 for logits in [-4cap, 2.5cap];
    beyond, up to 8cap, the derivative's absolute error stays <= ~3e-7, so each gradient
    element is within that times |softmax - onehot| (plus the relative part)."""
    dev = device_for("triton")
    cap, N, V = 15.0, 6, 512
    for lo, hi, rel in ((-4 * cap, 2.5 * cap, True), (-4 * cap, 8 * cap, False)):
        x = lo + (hi - lo) * torch.rand(N, V, dtype=torch.float64)
        x[:, 0], x[:, 1] = lo, hi
        t = torch.randint(0, V, (N,))
        logits = x.float().to(dev).requires_grad_()
        loss = cross_entropy(logits, t.to(dev), softcap=cap, reduction="sum", backend="triton")
        (g,) = torch.autograd.grad(loss, (logits,))
        _, ref = ref_ce_with_grads(logits, t, cap, "sum", torch.tensor(1.0))
        err = (g.detach().double().cpu() - ref).abs()
        if rel:
            worst = (err / ref.abs()).max().item()
            assert worst <= 2e-5, f"relative gradient error {worst:.2e} in [{lo}, {hi}] (seed={seed})"
        else:
            z = cap * torch.tanh(logits.detach().double().cpu() / cap)
            w = (torch.softmax(z, 1) - F.one_hot(t, V).double()).abs()
            worst = ((err - 2e-5 * ref.abs()) / w).max().item()
            assert worst <= 5e-7, f"derivative error {worst:.2e} beyond the relative range (seed={seed})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_no_grad_and_leading_dims(backend, seed):
    dev = device_for(backend)
    logits = torch.randn(2, 5, 300, device=dev, requires_grad=True)
    targets = torch.randint(-1, 300, (2, 5), device=dev)
    with torch.no_grad():
        loss = cross_entropy(logits, targets, softcap=15.0, reduction="none", backend=backend)
    assert loss.shape == (2, 5) and not loss.requires_grad
    ref = ref_ce(logits.detach().cpu().double().reshape(10, 300), targets.cpu().reshape(10), 15.0, "none")
    close(loss.reshape(10), ref, 1e-5, "loss", seed)


def test_cross_entropy_invalid_args():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError):
        cross_entropy(x, t, backend="cuda")
    with pytest.raises(ValueError):
        cross_entropy(x.double(), t, backend="triton")  # float64 only on the torch path
    with pytest.raises(ValueError):
        cross_entropy(x, t.float())
    with pytest.raises(ValueError):
        cross_entropy(x, t[:3])
    with pytest.raises(ValueError):
        cross_entropy(x[0], t[0])
    with pytest.raises(ValueError):
        cross_entropy(x, t, softcap=-1.0)
    with pytest.raises(ValueError):
        cross_entropy(x, torch.tensor([0, 1, 2, 10]))  # target out of range


# ------------------------------------------------------------------------------------------
# linear_cross_entropy
# ------------------------------------------------------------------------------------------


def ref_linear(hidden, weight, targets, softcap, reduction, go, ignore_index=-1):
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    loss = ref_ce(h @ w.t(), targets.cpu(), softcap, reduction, ignore_index)
    gh, gw = torch.autograd.grad(loss, (h, w), go.cpu().double())
    return loss.detach(), gh, gw


def eager_linear(hidden, weight, targets, softcap, reduction, go):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = eager_ce(h @ w.t(), targets, softcap, reduction)
    gh, gw = torch.autograd.grad(loss, (h, w), go)
    return loss.detach(), gh, gw


def linear_vs_ref(hidden, weight, targets, softcap, reduction, rtol, seed, backend="auto", ignore_index=-1):
    """linear_cross_entropy's loss and gradients (random grad_output) vs float64, within rtol."""
    loss = linear_cross_entropy(
        hidden, weight, targets, softcap=softcap, reduction=reduction, backend=backend, ignore_index=ignore_index
    )
    go = grad_output_for(loss)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), go)
    r_loss, r_gh, r_gw = ref_linear(hidden, weight, targets, softcap, reduction, go, ignore_index)
    close(loss, r_loss, rtol, f"loss[{reduction}]", seed)
    close(gh, r_gh, rtol, f"grad hidden[{reduction}]", seed)
    close(gw, r_gw, rtol, f"grad weight[{reduction}]", seed)
    return loss


def check_linear(backend, dtype, softcap, reduction, N, D, V, n_ignored, seed, dev):
    hidden = (torch.randn(N, D, device=dev)).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=dev) * (2.0 / math.sqrt(D))).to(dtype).requires_grad_()
    targets = make_targets(N, V, n_ignored, dev) if N >= 3 else torch.randint(0, V, (N,), device=dev)
    loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap, reduction=reduction, backend=backend)
    assert loss.dtype == torch.float32
    go = grad_output_for(loss)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), go)
    assert gh.dtype == dtype and gw.dtype == dtype
    r_loss, r_gh, r_gw = ref_linear(hidden, weight, targets, softcap, reduction, go)
    e_loss, e_gh, e_gw = eager_linear(hidden, weight, targets, softcap, reduction, go)
    # within what plain eager PyTorch in the same dtype misses float64 by, plus a margin: grad
    # hidden sums V products that cancel, so fp32 itself can miss 1e-5 of its largest value
    tol = lambda e, r, ulps: maxerr(e, r) + ulps * r.abs().max().item()  # noqa: E731
    if dtype == torch.float32:
        close(loss, r_loss, 1e-5, "loss", seed)
        close(gh, r_gh, 0.0, "grad hidden", seed, atol=tol(e_gh, r_gh, 1e-5))
        close(gw, r_gw, 1e-5, "grad weight", seed)
    else:
        close(loss, r_loss, 0.0, "loss", seed, atol=tol(e_loss, r_loss, 1e-3))
        close(gh, r_gh, 0.0, "grad hidden", seed, atol=tol(e_gh, r_gh, 2**-8))
        close(gw, r_gw, 0.0, "grad weight", seed, atol=tol(e_gw, r_gw, 2**-8))
    ign = targets == -1
    assert (gh[ign] == 0).all()
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_matches_fp64(backend, dtype, softcap, reduction, seed):
    check_linear(
        backend, dtype, softcap, reduction, N=40, D=32, V=1000, n_ignored=12, seed=seed, dev=device_for(backend)
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_many_chunks(backend, reduction, seed, monkeypatch):
    # force chunks of 7 rows: several chunks, the last one partial
    monkeypatch.setattr(lce_module, "CHUNK_ELEMS", 7 * 1000)
    check_linear(
        backend, torch.float32, 15.0, reduction, N=40, D=16, V=1000, n_ignored=5, seed=seed, dev=device_for(backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_large_vocab(backend, seed):
    check_linear(
        backend, torch.float32, 15.0, "mean", N=6, D=16, V=32768 + 17, n_ignored=2, seed=seed, dev=device_for(backend)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_all_ignored_and_single_row(backend, reduction, seed):
    dev = device_for(backend)
    N, D, V = 5, 8, 1000
    hidden = torch.randn(N, D, device=dev, requires_grad=True)
    weight = torch.randn(V, D, device=dev, requires_grad=True)
    targets = torch.full((N,), -1, dtype=torch.long, device=dev)
    loss = linear_cross_entropy(hidden, weight, targets, softcap=15.0, reduction=reduction, backend=backend)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), grad_output_for(loss))
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (gh == 0).all() and (gw == 0).all()
    # a single trained row (target V-1)
    targets[2] = V - 1
    linear_vs_ref(hidden, weight, targets, 15.0, reduction, 1e-5, seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_partial_grads_and_no_grad(backend, seed):
    dev = device_for(backend)
    N, D, V = 10, 8, 300
    hidden = torch.randn(N, D, device=dev)
    weight = torch.randn(V, D, device=dev, requires_grad=True)
    targets = torch.randint(-1, V, (N,), device=dev)
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    (gw,) = torch.autograd.grad(loss, (weight,))
    r_loss, _, r_gw = ref_linear(hidden, weight, targets, None, "mean", torch.tensor(1.0))
    close(loss, r_loss, 1e-5, "loss", seed)
    close(gw, r_gw, 1e-5, "grad weight", seed)
    with torch.no_grad():
        l2 = linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert not l2.requires_grad
    close(l2, r_loss, 1e-5, "no_grad loss", seed)
    # leading dims are flattened
    l3 = linear_cross_entropy(hidden.reshape(2, 5, D), weight, targets.reshape(2, 5), reduction="none", backend=backend)
    assert l3.shape == (2, 5)


def test_linear_cross_entropy_autocast(seed):
    """Under autocast: bf16 matmuls like F.linear, fp32 master weights get fp32 gradients."""
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    t = torch.randint(-1, 64, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, softcap=15.0, backend="torch")
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    r_loss, r_gh, r_gw = ref_linear(h.bfloat16(), w.bfloat16(), t, 15.0, "mean", torch.tensor(1.0))
    # the chunk logits are bf16, as F.linear gives eager code under autocast: within eager's error
    e_loss, _, _ = eager_linear(h.bfloat16(), w.bfloat16(), t, 15.0, "mean", torch.tensor(1.0))
    close(loss, r_loss, 1e-5, "loss", seed, atol=maxerr(e_loss, r_loss))
    close(gw, r_gw, 2**-7, "grad weight", seed)


def test_linear_cross_entropy_invalid_args():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w.t(), t)  # weight must be [V, D]
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w.bfloat16(), t)  # dtype mismatch
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, t[:2])
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, t, reduction="batchmean")
    with pytest.raises(ValueError):
        linear_cross_entropy(h, w, t, backend="cutlass")
    with pytest.raises(ValueError):
        linear_cross_entropy(h.long(), w, t)


# ------------------------------------------------------------------------------------------
# rotary
# ------------------------------------------------------------------------------------------


def ref_rotary(x64, pos, base=10000.0):
    """float64 half-split rotation; pos [T] or [B, T] (ints)."""
    D = x64.shape[-1]
    half = D // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / D)
    ang = pos.double()[..., None] * inv  # [T, half] or [B, T, half]
    c, s = ang.cos(), ang.sin()
    if c.dim() == 2:
        c, s = c[None, :, None, :], s[None, :, None, :]
    else:
        c, s = c[:, :, None, :], s[:, :, None, :]
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)


ROTARY_CASES = {
    # name: (B, T, Hq, Hkv, D, offset, pos_mode)
    "gqa": (2, 7, 4, 2, 16, 0, None),
    "mha_offset": (1, 5, 3, 3, 32, 9, None),
    "t1_kvcache": (2, 1, 4, 1, 16, 13, None),
    "posids_bt": (2, 6, 2, 1, 16, 0, "bt"),
    "posids_t": (3, 5, 2, 2, 24, 0, "t"),  # D/2 = 12: not a power of two
    "qkv_view": (2, 4, 4, 2, 16, 3, "view"),  # q, k are strided views of one fused qkv tensor
}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_matches_fp64(backend, dtype, case, seed):
    dev = device_for(backend)
    B, T, Hq, Hkv, D, offset, mode = ROTARY_CASES[case]
    T_max = 32
    cos, sin = rotary_tables(T_max, D, device=dev)
    if mode == "view":
        qkv = torch.randn(B, T, Hq + 2 * Hkv, D, device=dev).to(dtype).requires_grad_()
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]
        leaves = (qkv,)
    else:
        q = torch.randn(B, T, Hq, D, device=dev).to(dtype).requires_grad_()
        k = torch.randn(B, T, Hkv, D, device=dev).to(dtype).requires_grad_()
        leaves = (q, k)
    kwargs = {"offset": offset}
    if mode == "bt":
        pos = torch.stack([torch.randperm(T_max)[:T] for _ in range(B)]).to(dev)
        kwargs = {"position_ids": pos}
    elif mode == "t":
        pos = torch.tensor([0, 1, 2, 0, 1][:T], device=dev)  # packed rows: restarts per document
        kwargs = {"position_ids": pos}
    else:
        pos = torch.arange(offset, offset + T)
    qo, ko = apply_rotary(q, k, cos, sin, backend=backend, **kwargs)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    rq, rk = ref_rotary(q.detach().cpu().double(), pos.cpu()), ref_rotary(k.detach().cpu().double(), pos.cpu())
    rtol = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: one rounding of an fp32 result
    close(qo, rq, rtol, "q_out", seed)
    close(ko, rk, rtol, "k_out", seed)
    # backward = inverse rotation: feeding the outputs back as gradients restores the inputs
    grads = torch.autograd.grad((qo, ko), leaves, (qo.detach(), ko.detach()), retain_graph=True)
    if mode == "view":
        gq, gk = grads[0][:, :, :Hq], grads[0][:, :, Hq : Hq + Hkv]
        assert (grads[0][:, :, Hq + Hkv :] == 0).all()  # v part untouched
    else:
        gq, gk = grads
    rtol_inv = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: two roundings
    close(gq, q.detach(), rtol_inv, "inverse(q)", seed)
    close(gk, k.detach(), rtol_inv, "inverse(k)", seed)
    # and against float64 autograd with a random upstream gradient
    uq, uk = torch.randn_like(qo), torch.randn_like(ko)
    grads = torch.autograd.grad((qo, ko), leaves, (uq, uk))
    if mode == "view":
        gq, gk = grads[0][:, :, :Hq], grads[0][:, :, Hq : Hq + Hkv]
    else:
        gq, gk = grads
    q64 = q.detach().cpu().double().requires_grad_()
    k64 = k.detach().cpu().double().requires_grad_()
    r_gq, r_gk = torch.autograd.grad(
        (ref_rotary(q64, pos.cpu()), ref_rotary(k64, pos.cpu())), (q64, k64), (uq.cpu().double(), uk.cpu().double())
    )
    close(gq, r_gq, rtol, "grad q", seed)
    close(gk, r_gk, rtol, "grad k", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_tensor_offset(backend, seed):
    """A 1-element tensor offset (a KV cache length on the device) rotates like the int offset;
    out of the table's range it raises (checked on the device, no host read)."""
    dev = device_for(backend)
    B, T, D, off = 2, 5, 16, 7
    cos, sin = rotary_tables(16, D, device=dev)
    q, k = torch.randn(B, T, 3, D, device=dev), torch.randn(B, T, 1, D, device=dev)
    qo, ko = apply_rotary(q, k, cos, sin, offset=torch.tensor(off, device=dev), backend=backend)
    pos = torch.arange(off, off + T)
    close(qo, ref_rotary(q.cpu().double(), pos), 1e-5, "q_out", seed)
    close(ko, ref_rotary(k.cpu().double(), pos), 1e-5, "k_out", seed)
    with pytest.raises(ValueError, match="offset"):
        apply_rotary(q, k, cos, sin, offset=torch.tensor(12, device=dev), backend=backend)
    with pytest.raises(ValueError, match="offset"):
        apply_rotary(q, k, cos, sin, offset=torch.tensor([1, 2], device=dev), backend=backend)


def test_rotary_tables():
    cos, sin = rotary_tables(50, 16, base=10000)
    assert cos.shape == (50, 8) and cos.dtype == torch.float32
    pos = torch.arange(50, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(8, dtype=torch.float64) * 2 / 16)
    close(cos, (pos * inv).cos(), 1e-6, "cos", None)
    close(sin, (pos * inv).sin(), 1e-6, "sin", None)


def test_rotary_invalid_args():
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos, sin, offset=5)  # 5 + 4 > 8
    with pytest.raises(ValueError):
        apply_rotary(q, k[:, :3], cos, sin)
    with pytest.raises(ValueError):
        apply_rotary(q[..., :15], k[..., :15], cos[:, :7], sin[:, :7])  # odd head dim
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos, sin, backend="magic")
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos, sin, position_ids=torch.tensor([0.0, 1, 2, 3]))
    with pytest.raises(ValueError):
        apply_rotary(q, k, cos, sin, position_ids=torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError):
        apply_rotary(q.double(), k.double(), cos, sin, backend="triton")  # float64 only on the torch path


# ------------------------------------------------------------------------------------------
# float64 (torch path), bad targets, in-place gradient, no host syncs
# ------------------------------------------------------------------------------------------


def test_float64_torch_path_matches_fp64(seed):
    """float64 in, float64 math out (the model's float64 tests rely on it): "auto" and "torch"."""
    N, D, V = 20, 16, 300
    x = (torch.randn(N, V, dtype=torch.float64) * 4).requires_grad_()
    t = make_targets(N, V, n_ignored=5, device="cpu")
    for backend in ("auto", "torch"):
        loss = cross_entropy(x, t, softcap=15.0, backend=backend)
        assert loss.dtype == torch.float64
        (g,) = torch.autograd.grad(loss, (x,))
        r_loss, r_g = ref_ce_with_grads(x, t, 15.0, "mean", torch.tensor(1.0))
        close(loss, r_loss, 1e-12, "f64 loss", seed)
        close(g, r_g, 1e-12, "f64 grad", seed)
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, D, dtype=torch.float64) * 0.3).requires_grad_()
    for red in ("mean", "none"):
        assert linear_vs_ref(h, w, t, 15.0, red, 1e-12, seed).dtype == torch.float64
    cos, sin = rotary_tables(8, 16, dtype=torch.float64)
    assert cos.dtype == torch.float64
    q, k = torch.randn(2, 8, 3, 16, dtype=torch.float64), torch.randn(2, 8, 1, 16, dtype=torch.float64)
    qo, ko = apply_rotary(q, k, cos, sin)
    close(qo, ref_rotary(q, torch.arange(8)), 1e-14, "f64 rotary q", seed)
    close(ko, ref_rotary(k, torch.arange(8)), 1e-14, "f64 rotary k", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_raises(backend, seed):
    """HF-style -100 labels with ignore_index=-1 are an error, not a silently wrong loss;
    ignore_index=-100 takes them."""
    dev = device_for(backend)
    N, D, V = 6, 8, 50
    x = torch.randn(N, V, device=dev)
    h, w = torch.randn(N, D, device=dev), torch.randn(V, D, device=dev)
    t = torch.randint(0, V, (N,), device=dev)
    t[2] = -100
    with pytest.raises(ValueError, match="ignore_index"):
        cross_entropy(x, t, backend=backend)
    with pytest.raises(ValueError, match="ignore_index"):
        linear_cross_entropy(h, w, t, backend=backend)
    t2 = t.clone()
    t2[3] = V
    with pytest.raises(ValueError):
        cross_entropy(x, t2, ignore_index=-100, backend=backend)
    loss = cross_entropy(x, t, ignore_index=-100, reduction="none", backend=backend)
    assert loss[2] == 0
    close(loss, ref_ce(x.cpu().double(), t.cpu(), None, "none", ignore_index=-100), 1e-5, "loss", seed)
    linear_vs_ref(
        h.requires_grad_(), w.requires_grad_(), t, 15.0, "mean", 1e-5, seed, backend=backend, ignore_index=-100
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_grad_in_logits(dtype, seed):
    """grad_in_logits=True: the gradient lands in the logits' memory, same values as the default."""
    dev = device_for("triton")
    N, V = 12, 700
    base = (torch.randn(N, V, device=dev) * 4).to(dtype)
    t = make_targets(N, V, n_ignored=3, device=dev)
    x = base.clone().requires_grad_()
    loss = cross_entropy(x, t, softcap=15.0, backend="triton")
    (g_ref,) = torch.autograd.grad(loss, (x,), torch.tensor(2.5))
    buf = base.clone()
    x2 = buf.requires_grad_()
    loss2 = cross_entropy(x2, t, softcap=15.0, backend="triton", grad_in_logits=True)
    (g2,) = torch.autograd.grad(loss2, (x2,), torch.tensor(2.5))
    assert g2.data_ptr() == buf.data_ptr()  # no second [N, V] buffer
    assert torch.equal(loss, loss2) and torch.equal(g_ref, g2)


_SYNC_METHODS = (
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "cpu",
    "numpy",
    "allclose",
    "equal",
)
_SYNC_FUNCTIONS = ("nonzero", "allclose", "equal", "is_nonzero")


def test_no_host_sync_in_kernel_calls(monkeypatch, seed):
    """The CE, linear CE and rotary calls (forward and backward) make no device-to-host read: no
    .item(), bool(tensor), int(tensor), float(tensor), torch.allclose, nonzero, .cpu(), ... from
    the kernels' own code (what would sync a CUDA stream and break CUDA-graph capture), the
    first call included (one-time capability probes too: their caches are cleared first).
    Checked on the CPU by instrumenting torch.Tensor and torch; the Triton interpreter's own
    host copies are not ours and are not counted."""
    import rustchat.kernels as kpkg

    src = os.path.realpath(kpkg.__path__[0])
    calls = []

    def spy(name, orig):
        def wrapped(self, *a, **kw):
            f = sys._getframe(1)
            if os.path.realpath(f.f_code.co_filename).startswith(src):
                calls.append(f"Tensor.{name} at {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
            return orig(self, *a, **kw)

        return wrapped

    backends = ["torch"] + (["triton"] if TRITON_DEV == "cpu" else [])

    def step(backend):
        N, D, V = 16, 8, 300
        x = torch.randn(N, V, requires_grad=True)
        t = torch.randint(-1, V, (N,))
        for red in ("mean", "none"):
            loss = cross_entropy(x, t, softcap=15.0, reduction=red, backend=backend)
            torch.autograd.grad(loss, (x,), torch.ones_like(loss))
        for dtype in (torch.float32, torch.bfloat16):
            h = torch.randn(N, D).to(dtype).requires_grad_()
            w = torch.randn(V, D).to(dtype).requires_grad_()
            for red in ("mean", "none"):
                loss = linear_cross_entropy(h, w, t, softcap=15.0, reduction=red, backend=backend)
                torch.autograd.grad(loss, (h, w), torch.ones_like(loss))
        cos, sin = rotary_tables(16, 16)
        q = torch.randn(2, 8, 2, 16, requires_grad=True)
        k = torch.randn(2, 8, 1, 16, requires_grad=True)
        for pos, off in ((None, 0), (torch.arange(8).repeat(2, 1), 0), (None, torch.tensor(5))):
            qo, ko = apply_rotary(q, k, cos, sin, offset=off, position_ids=pos, backend=backend)
            torch.autograd.grad((qo.sum() + ko.sum()), (q, k))

    def fn_spy(name, orig):
        def wrapped(*a, **kw):
            f = sys._getframe(1)
            if os.path.realpath(f.f_code.co_filename).startswith(src):
                calls.append(f"torch.{name} at {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
            return orig(*a, **kw)

        return wrapped

    # the first call of the process: one-time probes (addmm out_dtype, ...) run again
    monkeypatch.setattr(lce_module, "_ADDMM_OUT_DTYPE", {})
    monkeypatch.setattr(lce_module, "_MM_OUT_DTYPE", {})
    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    for name in _SYNC_FUNCTIONS:
        monkeypatch.setattr(torch, name, fn_spy(name, getattr(torch, name)))
    for backend in backends:
        step(backend)
    assert not calls, f"host syncs in the kernels' code path: {sorted(set(calls))}"


def test_instrumentation_sees_syncs(monkeypatch):
    """The spies above catch what they claim to: int(), float(), bool() of a tensor and
    torch.allclose called from a file under the kernels' directory are recorded."""
    import rustchat.kernels as kpkg

    src = os.path.realpath(kpkg.__path__[0])
    path = os.path.join(src, "_probe_not_a_module.py")  # only its name is used (co_filename)
    code = compile("int(t); float(t); bool(t); torch.allclose(t, t)", path, "exec")
    seen = []

    def spy(name, orig):
        def wrapped(*a, **kw):
            if os.path.realpath(sys._getframe(1).f_code.co_filename).startswith(src):
                seen.append(name)
            return orig(*a, **kw)

        return wrapped

    for name in ("__int__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "allclose", spy("allclose", torch.allclose))
    exec(code, {"t": torch.tensor(1.0), "torch": torch})
    assert seen == ["__int__", "__float__", "__bool__", "allclose"]


# ------------------------------------------------------------------------------------------
# dispatch, compilation, subprocess fallback
# ------------------------------------------------------------------------------------------


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.resolve_backend("auto", x) == "torch"
    assert _backend.resolve_backend("torch", x) == "torch"
    with pytest.raises(ValueError):
        _backend.resolve_backend("triton", x)  # CPU tensors without the interpreter
    with pytest.raises(ValueError):
        _backend.resolve_backend("bogus", x)
    if _backend.HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.resolve_backend("auto", x) == "triton"


_AOT_SCRIPT = r"""
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
    from triton.runtime.jit import JITFunction
except Exception as e:
    print("SKIP triton AOT API unavailable:", e); sys.exit(0)
from rustchat.kernels import _backend
from rustchat.kernels.cross_entropy import _CE_KERNEL, _CE_SCALE_KERNEL
from rustchat.kernels.rotary import _ROTARY_KERNEL

def compile_one(lazy, sig, consts, num_warps):
    fn = lazy.get(interp=False).fn  # binds the compiled device functions into the kernel's globals
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        triton.compile(ASTSource(JITFunction(fn), sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    except CompilationError:
        raise
    except Exception as e:  # toolchain problems (no ptxas, ...) are not kernel bugs
        print("SKIP cannot compile for sm_90 here:", type(e).__name__, e); sys.exit(0)

ce = dict(X="*bf16", stride_x="i64", TGT="*i64", LOSS="*fp32", G="*bf16", stride_g="i64", SCALE="*fp32",
          stride_scale="i32", R="i32", V="i32", ignore_index="i32", cap="fp32", k_sig="fp32")
for cap, fixed, grad, rescale, words in ((True, True, True, True, True), (True, True, True, True, False),
                                         (True, True, True, False, False), (True, False, True, False, False),
                                         (False, False, True, False, False), (True, True, False, False, True)):
    compile_one(_CE_KERNEL, ce, dict(HAS_CAP=cap, FIXED_MAX=fixed, WRITE_GRAD=grad, RESCALE=rescale, FAST=True,
                                     RNE_FIX=False, BLOCK=8192, TAIL=True, TAIL2=True, WORDS=words), 16)
compile_one(_CE_KERNEL, dict(ce, X="*fp32", G="*fp32"),
            dict(HAS_CAP=True, FIXED_MAX=True, WRITE_GRAD=True, RESCALE=True, FAST=True, RNE_FIX=False, BLOCK=8192,
                 TAIL=False, TAIL2=False, WORDS=False), 16)
compile_one(_CE_SCALE_KERNEL, dict(G="*bf16", stride_g="i64", GO="*fp32", stride_go="i32", R="i32", V="i32"),
            dict(RNE_FIX=False, BLOCK=8192), 16)
rot = dict(Q="*bf16", K="*bf16", QO="*bf16", KO="*bf16", COS="*fp32", SIN="*fp32", POS="*i64",
           sq_b="i64", sq_t="i64", sq_h="i64", sk_b="i64", sk_t="i64", sk_h="i64", sp_b="i64", sp_t="i64",
           stride_tab="i64", T="i32", HQ="i32", HKV="i32", n_q="i32", n_rows="i32", offset="i32", max_pos="i32")
for pos, inv, al in ((False, False, True), (True, True, False)):
    compile_one(_ROTARY_KERNEL, rot, dict(HALF=64, BLOCK_D=64, BLOCK_R=32, HAS_POS=pos, INVERSE=inv, ALIGNED=al,
                                          RNE_FIX=False), 4)
print("OK")
"""


def test_kernels_compile_for_sm90():
    """Compile the kernels ahead of time for an H100 (no GPU needed): catches errors only the
    compiler sees (the interpreter runs kernels as numpy), e.g. loop-carried type changes.
    In a subprocess: a process that imported triton for the interpreter cannot compile."""
    if not _backend.HAS_TRITON:
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout.strip()
    if r.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(out)
    assert r.returncode == 0 and out.endswith("OK"), out[-3000:] + r.stderr[-5000:]


_COST_SCRIPT = r"""
import json, sys
sys.argv = ["kernel_cost.py"]
sys.path.insert(0, sys.argv_dir if hasattr(sys, "argv_dir") else "scripts")
try:
    import kernel_cost as kc
except Exception as e:
    print("SKIP cannot import the cost script:", type(e).__name__, e); sys.exit(0)
try:
    rows = kc.variants()
except Exception as e:
    print("SKIP cannot compile for sm_90 here:", type(e).__name__, str(e)[:300]); sys.exit(0)
out = []
for r in rows:
    sw = []
    for w in r["sweeps"]:
        s, e = w["range"]
        body = [t for _, op, t in kc.sweeps(r["instrs"], r["elt_bytes"])[0][s:e + 1]]
        sw.append(dict(elems=w["elems"], body=body))
    out.append(dict(kernel=r["kernel"], block=r["block"], threads=r["threads"], elt_bytes=r["elt_bytes"], sweeps=sw,
                    per_thread=r.get("elems_per_thread"), all_sass=[t for _, _, t in r["instrs"]]))
print(json.dumps(out))
"""


def _ldg_bytes(line):
    """Bytes one thread loads with this SASS line (an independent reading of the widths)."""
    m = re.search(r"\bLDG\.E(?:\.(\w+))?(?:\.(\w+))?", line)
    if not m:
        return 0
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    for part in m.groups():
        if part in widths:
            return widths[part]
    return 4


@pytest.mark.slow
def test_kernel_cost_counts_elements_from_sass():
    """scripts/kernel_cost.py's elements per loop iteration equal what each sweep's loop body
    loads (its LDG widths, read here from the SASS; ptxas's unrolling included) over the element
    size, for every variant; each is a whole number of blocks per thread; rotary's one pass
    stores what it counts. Compiles every variant for sm_90 (~20-40 s on 2 cores; skipped where
    Triton cannot compile for sm_90)."""
    if not _backend.HAS_TRITON:
        pytest.skip("triton not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _COST_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    out = r.stdout.strip()
    if r.returncode == 0 and out.startswith("SKIP"):
        pytest.skip(out)
    assert r.returncode == 0, out[-3000:] + r.stderr[-5000:]
    rows = json.loads(out.splitlines()[-1])
    assert len(rows) >= 18
    for row in rows:
        per_block = row["block"] / row["threads"]  # elements per thread of one block
        if row["per_thread"] is not None:  # rotary: no loop, one pass per program
            stored = sum(16 if ".128" in t else 8 if ".64" in t else 4 for t in row["all_sass"] if "STG" in t) / 2
            assert row["per_thread"] == stored == per_block, row["kernel"]
            continue
        assert row["sweeps"], f"{row['kernel']}: no element loop found"
        for w in row["sweeps"]:
            loaded = sum(_ldg_bytes(t) for t in w["body"]) / row["elt_bytes"]
            assert w["elems"] == loaded, f"{row['kernel']}: {w['elems']} elements counted, the loop loads {loaded}"
            assert w["elems"] % per_block == 0, f"{row['kernel']}: {w['elems']} is not whole blocks of {per_block}"


@pytest.mark.slow
@pytest.mark.skipif(INTERP_IN_PROCESS or _CHILD, reason="interpreter tests already run in this process")
def test_triton_interpreter_in_subprocess():
    if not _backend.HAS_TRITON:
        pytest.skip("triton not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", RUSTCHAT_KERNELS_INTERP_CHILD="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "triton and not subprocess",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
