"""Backend dispatch shared by the kernels: pick "triton" or "torch", and build Triton kernels lazily.

Kernels are written as plain functions and turned into Triton kernels on first use (not at import),
because `triton.jit` decides at decoration time whether to use the CPU interpreter
(TRITON_INTERPRET=1). Deciding at call time means the env var only has to be set before the first
kernel call, not before the first `import rustchat.kernels` (which another module may do early).
"""
from __future__ import annotations

import os

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
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """"auto" -> "triton" on CUDA tensors (or under the interpreter), else "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if HAS_TRITON and (on_cuda or interpreting()) else "torch"
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
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_targets(targets: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Range check only for CPU tensors: on CUDA it would cost a device sync every step.
    (The Triton kernels mask out-of-range targets instead of reading out of bounds.)"""
    if targets.is_cuda or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab}) or equal to ignore_index={ignore_index}")


class LazyKernel:
    """A Triton kernel built on first call, separately for the interpreter and for the GPU.

    On the GPU it is optionally autotuned over `configs` (autotune needs a real device);
    under the interpreter the caller passes the block sizes by hand (`interp_meta`).
    """

    def __init__(self, fn, configs=None, key=None):
        self.fn = fn
        self.configs = configs
        self.key = key or []
        self._cache = {}

    def get(self, interp: bool | None = None):
        if not HAS_TRITON:
            raise ValueError("triton is not installed")
        interp = interpreting() if interp is None else interp
        k = self._cache.get(interp)
        if k is None:
            # triton.jit reads TRITON_INTERPRET now, so the mode matches `interp`
            k = triton.jit(self.fn)
            if self.configs and not interp:
                k = triton.autotune(configs=self.configs, key=self.key)(k)
            self._cache[interp] = k
        return k

    @property
    def autotuned(self) -> bool:
        return bool(self.configs) and not interpreting()


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
