"""The torch runtime: device and dtype choice, autocast, torchrun process groups."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .common import RustchatError, available_cpus, check_count


def autodetect_device(device: str = "auto") -> str:
    """Resolve "auto" to cuda > mps > cpu; validate an explicit choice."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise RustchatError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise RustchatError(f"device {device!r} requested but MPS is not available; use --device cpu")
    if kind not in ("cuda", "cpu", "mps"):
        raise RustchatError(f"unknown device {device!r}; expected auto, cuda, cpu or mps")
    return device


def device_type(device) -> str:
    """'cuda' / 'cpu' / 'mps' for a device string or torch.device."""
    return str(device).split(":")[0]


def compute_dtype(device):
    """Activation dtype: bf16 on CUDA (autocast); fp32 elsewhere since bf16 matmuls are slow on CPUs."""
    return torch.bfloat16 if device_type(device) == "cuda" else torch.float32


def autocast_ctx(device):
    """bf16 autocast on CUDA, a no-op elsewhere. Parameters stay fp32 (master weights)."""
    if device_type(device) == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device) -> None:
    """Wait for queued device work (for honest timings)."""
    if device_type(device) == "cuda":
        torch.cuda.synchronize()
    elif device_type(device) == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------
# distributed (torchrun)


@dataclass(frozen=True)
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int


def get_dist_info() -> DistInfo:
    """Rank info from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); single process otherwise."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return DistInfo(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    return DistInfo(False, 0, 0, 1)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_process_limit(device: str = "auto") -> tuple[int, str]:
    """(most processes this machine runs for one job, what bounds it): one per CPU this process
    may use, and on CUDA (`device` resolved) one per visible GPU, each rank owning cuda:LOCAL_RANK."""
    cpus = available_cpus()
    if device_type(autodetect_device(device)) == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < cpus:
            return gpus, f"the {gpus} GPU(s) visible"
    return cpus, f"the {cpus} CPU(s) this process may use"


def check_local_processes(nproc: int, device: str = "auto", name: str = "--nproc") -> int:
    """`nproc` when this machine can run that many processes for one job; else one line naming
    `name` and the range (OutOfRangeError)."""
    limit, why = local_process_limit(device)
    return check_count(name, nproc, 1, limit, why)


def init_distributed(device: str = "auto", seed: int | None = 42):
    """Set up the process: resolve the device, init the process group under torchrun
    (nccl on CUDA, gloo otherwise), seed RNGs. Returns (info, device_str).

    Under torchrun on CUDA each rank uses cuda:LOCAL_RANK."""
    device = autodetect_device(device)
    info = get_dist_info()
    if info.ddp:
        if device_type(device) == "cuda":
            gpus = torch.cuda.device_count()
            if info.local_rank >= gpus:  # torchrun started more processes on this node than GPUs
                raise RustchatError(
                    f"process {info.local_rank} of this node has no GPU: {gpus} visible; start at most "
                    f"{gpus} processes per node (--nproc, torchrun's --nproc-per-node)"
                )
            device = f"cuda:{info.local_rank}"
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device_type(device) == "cpu":
            backend = "gloo"
        else:
            raise RustchatError(f"multi-process training is not supported on {device}; use cuda or cpu")
        if not dist.is_initialized():
            if backend == "nccl":
                dist.init_process_group(backend=backend, device_id=torch.device(device))
            else:
                dist.init_process_group(backend=backend)
    if seed is not None:
        torch.manual_seed(seed)
    if device_type(device) == "cpu":
        setup_cpu_math()
    if device_type(device) == "cuda":
        # tf32 for the fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return info, device


def setup_cpu_math() -> None:
    """Flush denormals to zero on CPU. Tiny gradients (e.g. Muon's Newton-Schulz on an almost
    zero matrix, exp of very negative logits) otherwise hit x86's slow denormal path: measured
    50x slower steps on a small model. GPUs flush them in bf16 math anyway.

    numpy < 2.4 works out a float type's limits on first use; once denormals flush, it finds a
    smallest subnormal of zero and prints a warning for each type, on every command's stderr.
    Its cache keeps what it finds first, so the limits are looked up before the switch."""
    for t in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(t)
    torch.set_flush_denormal(True)


def cleanup_distributed() -> None:
    """Tear down the process group if we own one (safe to call always)."""
    global _HAD_PROCESS_GROUP
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
        _HAD_PROCESS_GROUP = True


# Set once this process has torn down a process group; see exit_without_finalizing.
_HAD_PROCESS_GROUP = False


def had_process_group() -> bool:
    return _HAD_PROCESS_GROUP


def exit_without_finalizing(code: int) -> None:
    """End a process that ran collectives, skipping the interpreter's finalization.

    Why: gloo frees a finished collective's work object on its own worker thread, a moment after
    the collective returns. The work still owns the tensors it reduced, and where their Python
    objects are already gone, freeing them needs the GIL. If the main thread is finalizing the
    interpreter by then, the worker thread cannot take the GIL, and the C++ runtime aborts the
    process ("terminate called without an active exception", exit -6) after all its work was
    done and written (docs/design.md, "Safety", has the measurements under "Ending a multi-process run").
    Destroying the process group does not wait for that thread. Every file rustchat writes is
    closed by now, so only the standard streams need flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def barrier() -> None:
    if is_dist():
        dist.barrier()
