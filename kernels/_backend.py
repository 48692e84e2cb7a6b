"""Backend dispatch shared by the kernels: pick "triton" or "torch", and build Triton kernels lazily.

Kernels are written as plain functions and turned into Triton kernels on first use (not at import),
because `triton.jit` decides at decoration time whether to use the CPU interpreter
(TRITON_INTERPRET=1). Deciding at call time means the env var only has to be set before the first
kernel call, not before the first `import rustchat.kernels` (which another module may do early).
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:  # triton is optional: without it every backend resolves to "torch"
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
# the Triton kernels take these; the torch references also take float64 (exact checks, tests)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """ "auto" -> "triton" on CUDA tensors (or under the interpreter), else "torch".
    float64 always resolves to "torch" under "auto" (the kernels compute in fp32)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    f64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto":
        return "triton" if HAS_TRITON and (on_cuda or interpreting()) and not f64 else "torch"
    if f64:
        raise ValueError("backend='triton' does not take float64 (use backend='torch' or 'auto')")
    if not HAS_TRITON:
        raise ValueError("backend='triton' requested but triton is not installed")
    if not (on_cuda or interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return "triton"


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    try:
        s = float(softcap)
    except (TypeError, ValueError):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}") from None
    if not (s > 0.0) or s != s or s == float("inf"):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    return s


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for the 16/32-bit dtypes, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_targets(targets: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")


def device_check(ok: torch.Tensor, msg: str) -> None:
    """Raise if the 0-dim bool tensor `ok` is False, without a host sync in the caller.

    CPU: the check runs at once (there is no device to wait for) and raises ValueError.
    CUDA: torch._assert_async queues a device-side assert; the error surfaces as a RuntimeError
    at the next natural sync (loss.item(), the optimizer's logging, ...), the way PyTorch's own
    F.cross_entropy reports a bad target. Capturable by CUDA graphs and torch.compile."""
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok, msg)
        except RuntimeError:
            raise ValueError(msg) from None
    else:
        torch._assert_async(ok, msg)


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or equal to ignore_index, on every device, no host sync.
    (The Triton kernels also give a NaN loss for such a row instead of reading out of bounds.)"""
    if targets.numel() == 0:
        return
    ok = ((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all()
    device_check(
        ok,
        f"targets must be in [0, {vocab}) or equal to ignore_index={ignore_index} "
        "(e.g. HF-style -100 labels need ignore_index=-100)",
    )


# Device functions shared by several kernels (softcap, rounding, fast exp2/rcp): plain functions
# marked with @device_fn, jitted lazily like the kernels (an interpreted kernel can only call
# interpreted helpers, a compiled one only compiled helpers).
_DEVICE_FNS: list = []
_JIT_CACHE: dict = {}


def device_fn(fn):
    _DEVICE_FNS.append(fn)
    return fn


def _version(mod) -> tuple:
    return tuple(int(p) for p in mod.__version__.split("+")[0].split(".")[:2] if p.isdigit())


def _interpreter_numpy_compat() -> None:
    """Triton < 3.7's interpreter turns a scalar (a 1-element array) into a Python int with
    int(array), which numpy >= 2.4 rejects: every `range(0, V, BLOCK)` loop then fails with
    "only 0-dimensional arrays can be converted to Python scalars". Fixed upstream in 3.7; for
    older Tritons, wrap that one conversion (a no-op with numpy < 2.4, the pinned setup)."""
    from triton.runtime import interpreter as ti  # only the CPU interpreter needs patching

    if _version(triton) >= (3, 7) or _version(np) < (2, 4) or getattr(ti, "_rustchat_index_fix", False):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._rustchat_index_fix = True


def _jit(fn, interp: bool):
    k = _JIT_CACHE.get((fn, interp))
    if k is None:
        if interp:
            _interpreter_numpy_compat()
        # triton.jit reads TRITON_INTERPRET at decoration time: set it to the wanted mode
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interp else "0"
        try:
            k = triton.jit(fn)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
        _JIT_CACHE[(fn, interp)] = k
    return k


def bind_device_fns(interp: bool, *namespaces: dict) -> None:
    """Point every name that refers to a @device_fn (plain or jitted in the other mode) in the
    helpers' own modules and in `namespaces` at its jitted version for this mode."""
    spaces = [fn.__globals__ for fn in _DEVICE_FNS] + list(namespaces)
    for fn in _DEVICE_FNS:
        j = _jit(fn, interp)
        for g in spaces:
            cur = g.get(fn.__name__)
            if cur is fn or getattr(cur, "fn", None) is fn:
                g[fn.__name__] = j


class LazyKernel:
    """A Triton kernel built on first call, separately for the interpreter and for the GPU
    (block sizes are chosen by the launcher: no autotuning, whose reruns would clobber the
    in-place outputs and whose timing runs sync the host)."""

    def __init__(self, fn):
        self.fn = fn
        self._cache = {}

    def get(self, interp: bool | None = None):
        if not HAS_TRITON:
            raise ValueError("triton is not installed")
        interp = interpreting() if interp is None else interp
        # rebind every time: one process may run both modes (tests, the cost report)
        bind_device_fns(interp, self.fn.__globals__)
        k = self._cache.get(interp)
        if k is None:
            k = _jit(self.fn, interp)
            self._cache[interp] = k
        return k


_DEVICE_PROPS: dict = {}


def device_props(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes) of a CUDA device, cached (host-side query, no sync). Under the
    interpreter: a small made-up device so the persistent loops run several rows per program."""
    if device.type != "cuda":
        return 4, 1 << 20
    idx = device.index if device.index is not None else torch.cuda.current_device()
    hit = _DEVICE_PROPS.get(idx)
    if hit is None:
        p = torch.cuda.get_device_properties(idx)
        hit = (p.multi_processor_count, int(getattr(p, "L2_cache_size", 0)) or (50 << 20))
        _DEVICE_PROPS[idx] = hit
    return hit


def autocast_dtype(device_type: str):
    """The autocast dtype if autocast is on for this device type, else None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # older torch: no device_type argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def no_autocast(device_type: str):
    """Our own matmuls pick their precision explicitly; autocast must not rewrite them."""
    return torch.autocast(device_type=device_type, enabled=False)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()
