"""Step-numbered checkpoints per stage: <base>/<stage>_checkpoints/d<depth>/

  model_{step:06d}.safetensors      weights (rank 0)
  optim_{step:06d}_rank{r}.pt       optimizer state dicts of rank r (torch.save)
  meta_{step:06d}.json              model config, step, trainer state; written last

Every file goes to a temp name in the same directory and is os.replace'd into place, and
meta is written last, so a checkpoint is complete iff its meta exists. Loading never runs
code from the files: safetensors, json, torch.load(weights_only=True). Every file is checked
before it is opened (a regular file, not a FIFO or a link to a device, of a sane size) and
after (well-formed, a model config that makes sense, finite weights); any problem is one
RustchatError "<file>: <problem>".
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import random
import re
import secrets
import socket
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

import numpy as np
from safetensors.torch import load_file, save_file

from .common import RustchatError, get_base_dir, probe_writable
from .config import STAGES
from .model import GPT, GPTConfig
from .runtime import autodetect_device, get_world_size, setup_cpu_math
from .tokenizer import Tokenizer, load_tokenizer

_PREVIOUS = {"base": None, "mid": "base", "sft": "mid", "rl": "sft"}
# Caps on what a checkpoint's files may hold, far above any real model, far below what
# would exhaust memory before a shape check could fail.
MAX_META_BYTES = 64 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20  # the limit safetensors itself applies
MAX_STEP = 10**12  # a step a checkpoint may be filed under (far past any run; a name, not a count)
CONFIG_LIMITS = {
    "sequence_len": 1 << 20,
    "vocab_size": 1 << 24,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 1 << 16,
}
# the architecture's feature fields (GPTConfig), optional in a meta: the accepted JSON types
_FEATURE_TYPES = {
    "window_pattern": (str,),
    "rope_base": (int, float),
    "qk_scale": (int, float),
    "value_embeds": (bool,),
    "layer_lambdas": (bool,),
    "smear": (bool,),
    "backout": (bool,),
    "rope_bf16": (bool,),
}
_FEATURE_NAMES = {
    "window_pattern": "null or a string of S and L",
    "rope_base": "a number",
    "qk_scale": "a number",
    "value_embeds": "true or false",
    "layer_lambdas": "true or false",
    "smear": "true or false",
    "backout": "true or false",
    "rope_bf16": "true or false",
}
_META_RE = re.compile(r"^meta_(\d{6,})\.json$")
_DEPTH_RE = re.compile(r"^d(\d+)$")


def stage_dir(stage: str, depth: int, base_dir=None) -> Path:
    """<base>/<stage>_checkpoints/d<depth>/ (not created)."""
    if stage not in STAGES:
        raise RustchatError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    return base / f"{stage}_checkpoints" / f"d{depth}"


def find_depths(stage: str, base_dir=None) -> list[int]:
    """Depths that have a checkpoint directory for `stage`, ascending."""
    root = stage_dir(stage, 0, base_dir).parent
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for d in root.iterdir() if d.is_dir() and (m := _DEPTH_RE.match(d.name)))


def pick_depth(stage: str, base_dir=None) -> int:
    """The depth a command without --depth uses, the same way for every command: the one depth
    that has a complete checkpoint of `stage` (the checkpoint the command needs), or a one-line
    error naming the depths found."""
    depths = [d for d in find_depths(stage, base_dir) if find_last_step(stage_dir(stage, d, base_dir)) is not None]
    root = stage_dir(stage, 0, base_dir).parent
    if not depths:
        raise _missing(root, f"no {stage} checkpoints")
    if len(depths) > 1:
        raise RustchatError(
            f"{root} has {stage} checkpoints at depths {', '.join(map(str, depths))}: choose one with --depth"
        )
    return depths[0]


def latest_meta(ckpt_dir) -> dict | None:
    """The meta of the directory's latest complete checkpoint (no weights read), or None."""
    step = find_last_step(ckpt_dir)
    return None if step is None else read_json_object(_paths(Path(ckpt_dir), step)[2], "checkpoint meta")


def _paths(ckpt_dir: Path, step: int, rank: int = 0):
    return (
        ckpt_dir / f"model_{step:06d}.safetensors",
        ckpt_dir / f"optim_{step:06d}_rank{rank}.pt",
        ckpt_dir / f"meta_{step:06d}.json",
    )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path, what: str, max_bytes: int | None = None) -> int:
    """Size of `path`, a regular file (symlinks followed); refused without opening it when it
    is a FIFO (reading would hang), a device (/dev/zero never ends) or larger than max_bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RustchatError(f"{path}: {what} not found") from None
    except OSError as e:
        raise RustchatError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise RustchatError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise RustchatError(f"{path}: {what} is {st.st_size} bytes, more than the {max_bytes} a {what} may have")
    return st.st_size


def read_json_object(path, what: str, max_bytes: int = MAX_META_BYTES) -> dict:
    """A JSON file whose top level must be an object."""
    regular_file(path, what, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RustchatError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RustchatError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, RecursionError, ValueError) as e:  # ValueError: an int past Python's 4300 digits
        raise RustchatError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise RustchatError(f"{path}: {what} is a JSON {type(obj).__name__}, expected an object")
    return obj


def check_model_config(mc, where) -> GPTConfig:
    """meta["model_config"] as a GPTConfig, refusing missing, non-integer, non-positive,
    inconsistent or absurd values before anything is allocated."""
    if not isinstance(mc, dict):
        raise RustchatError(f"{where}: no 'model_config' object (found {type(mc).__name__})")
    values = {}
    for key, limit in CONFIG_LIMITS.items():
        v = mc.get(key)
        if key not in mc:
            raise RustchatError(f"{where}: model_config lacks {key!r}")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise RustchatError(f"{where}: model_config {key}={v!r} must be an integer in 1..{limit}")
        values[key] = v
    for key, kinds in _FEATURE_TYPES.items():  # the 2026 features; absent: classic
        if key not in mc:
            continue
        v = mc[key]
        if (v is None and key != "window_pattern") or (
            v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds))
        ):
            raise RustchatError(f"{where}: model_config {key}={v!r} must be {_FEATURE_NAMES[key]}")
        values[key] = v
    try:
        return GPTConfig(**values)
    except RustchatError as e:
        raise RustchatError(f"{where}: model_config: {e}") from None


# bytes per element of each safetensors dtype
_SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})


def safetensors_header(path, max_header: int = _MAX_SAFETENSORS_HEADER) -> tuple[dict, dict]:
    """({name: (dtype, shape)}, metadata) from a safetensors file's header, read without loading
    any tensor: the 8-byte length (at most `max_header`) and the JSON header are checked, and
    every tensor's offsets must match its dtype and shape, and the tensors must tile the data
    exactly (no overlap, no gap, nothing past the end), as the library requires. Any problem
    is one RustchatError "<file>: not a valid safetensors file: <why>"."""
    size = regular_file(path, "weights file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(max_header, size - 8):
                raise ValueError(
                    f"header length {n} does not fit in the file's {size} bytes or the {max_header} a header may have"
                )
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ is not an object of strings")
        tensors, spans = {}, []
        for name, info in header.items():
            if not (
                isinstance(info, dict)
                and info.get("dtype") in _SAFETENSORS_DTYPES
                and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2
                and all(type(x) is int and x >= 0 for x in info["shape"] + info["data_offsets"])
            ):
                raise ValueError(f"malformed header entry for {name!r} (dtype, shape or data_offsets)")
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            if end - begin != numel * _SAFETENSORS_DTYPES[info["dtype"]]:
                raise ValueError(
                    f"tensor {name!r} spans bytes {begin}..{end} but its {info['dtype']} shape {info['shape']} "
                    f"needs {numel * _SAFETENSORS_DTYPES[info['dtype']]}"
                )
            tensors[name] = (info["dtype"], tuple(info["shape"]))
            spans.append((begin, end, name))
        at = 0
        for begin, end, name in sorted(spans):
            if begin != at:
                what = "overlaps the tensor before it" if begin < at else f"leaves a gap at byte {at}"
                raise ValueError(f"tensor {name!r} at bytes {begin}..{end} {what}")
            at = end
        if 8 + n + at != size:
            raise ValueError(f"the tensors need {8 + n + at} bytes but the file has {size} (truncated?)")
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as e:
        raise RustchatError(f"{path}: not a valid safetensors file: {e}") from None
    return tensors, meta


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking the header and the data
    offsets fit the file exactly (a truncated file fails here, before any tensor is read)."""
    return {name: shape for name, (_, shape) in safetensors_header(path)[0].items()}


def inside_dir(root, path, what: str, where=None) -> Path:
    """`path` resolved (every symlink followed), refused in one line unless it stays inside the
    directory `root` (the error starts with `where`, default `path`): an import reads only the directory it was given, whatever a file in it
    names (a "../" climb, "/etc/shadow") or a symlink in it points to."""
    root, path = Path(root), Path(path)
    try:
        real_root = root.resolve(strict=True)
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise RustchatError(f"{path}: cannot resolve {what} ({e})") from None
    if real != real_root and real_root not in real.parents:
        link = " (a symlink)" if path.is_symlink() else ""
        raise RustchatError(f"{where or path}: {what}{link} resolves to {real}, outside {root}; refusing to read it")
    return real


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then fsync + os.replace: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(e, path.parent)  # judged before the temp file frees space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise RustchatError(
                f"{path}: no space left on device while saving the checkpoint "
                f"({type(e).__name__}: {e}); free space or use another --base-dir"
            ) from None
        if isinstance(e, OSError):
            raise RustchatError(f"{path}: cannot save the checkpoint ({e.strerror or e})") from None
        raise


def _disk_full(e: Exception, directory: Path) -> bool:
    """ENOSPC, however the writer reported it: Python raises OSError(ENOSPC), but torch.save
    says only "file write failed" and safetensors "os error 28", so the device is asked too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(e) or "os error 28" in str(e):
        return True
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < (16 << 20)


def checkpoint_bytes(model) -> int:
    """Rough size of one checkpoint: fp32 weights plus optimizer state (at most two moments)."""
    weights = sum(p.numel() * 4 for p in model.parameters())
    return 3 * weights + (1 << 20)


def check_checkpoint_dir(ckpt_dir, need_bytes: int) -> None:
    """Before step 1: the directory can be created and written, and its device has room for a
    checkpoint, so a long run does not fail only at its first save."""
    ckpt_dir = Path(ckpt_dir)
    try:
        probe_writable(ckpt_dir)
    except OSError as e:
        raise _unwritable(ckpt_dir, e) from None
    st = os.statvfs(ckpt_dir)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise RustchatError(
            f"{ckpt_dir}: not enough space for a checkpoint: {free / 2**20:.0f} MiB free on the "
            f"device, about {need_bytes / 2**20:.0f} MiB needed (saving would fail with "
            "'no space left on device'); free space or use another --base-dir"
        )


def _unwritable(ckpt_dir, e: OSError) -> RustchatError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RustchatError(f"{ckpt_dir}: no space left on device; free space or use another --base-dir")
    return RustchatError(
        f"{ckpt_dir}: checkpoint directory is not writable ({e.strerror or e}); use another --base-dir"
    )


def _remove_stale_temps(ckpt_dir: Path, rank: int) -> None:
    """Temp files of a save that was killed (SIGKILL, power loss) never become checkpoints:
    remove this rank's ones (other ranks may be writing theirs right now)."""
    own = rf"optim_\d{{6,}}_rank{rank}\.pt\..*"
    if rank == 0:
        own += r"|model_\d{6,}\.safetensors\..*|meta_\d{6,}\.json\..*|write_test_.*"
    mine = re.compile(rf"^\.({own})\.tmp$")
    for f in ckpt_dir.iterdir():
        if mine.match(f.name):
            try:
                f.unlink()
            except FileNotFoundError:
                pass


def prune_checkpoints(ckpt_dir, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints (every rank's files); call on
    rank 0 after the save's barrier. Meta goes first, so a half-pruned step is never loadable."""
    ckpt_dir = Path(ckpt_dir)
    steps = sorted(int(m.group(1)) for f in ckpt_dir.iterdir() if (m := _META_RE.match(f.name)))
    dropped = steps[:-keep_last] if keep_last > 0 else []
    for step in dropped:
        model_path, _, meta_path = _paths(ckpt_dir, step)
        meta_path.unlink(missing_ok=True)
        model_path.unlink(missing_ok=True)
        for f in ckpt_dir.glob(f"optim_{step:06d}_rank*.pt"):
            f.unlink(missing_ok=True)
    return dropped


def _plain_state_dict(model) -> dict:
    """CPU, contiguous tensors, without torch.compile's `_orig_mod.` prefix."""
    sd = model.state_dict()
    return {k.replace("_orig_mod.", ""): v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and hasattr(x, "dtype"):  # numpy scalars
        return x.item()
    raise TypeError(f"meta value of type {type(x).__name__} is not JSON-serialisable")


def save_checkpoint(ckpt_dir, step: int, model, optimizers, meta: dict, *, rank: int = 0) -> Path:
    """Write this rank's part of checkpoint `step`: every rank its optimizer state, rank 0
    also the weights and then the meta, which marks the checkpoint complete. Under torchrun
    call it on all ranks, then barrier.

    meta: anything JSON-able the trainer needs to resume (data cursor, RNG states from
    capture_rng_state(), losses, user config). `model_config` and `step` are added."""
    ckpt_dir = Path(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RustchatError(f"{ckpt_dir}: cannot create the checkpoint directory ({e.strerror or e})") from None
    _remove_stale_temps(ckpt_dir, rank)
    model_path, optim_path, meta_path = _paths(ckpt_dir, step, rank)
    if optimizers is not None:
        states = [opt.state_dict() for opt in optimizers]  # this rank's shard
        _atomic_write(optim_path, lambda tmp: torch.save(states, tmp))
    if rank == 0:
        sd = _plain_state_dict(model)
        _atomic_write(model_path, lambda tmp: save_file(sd, tmp))
        raw = getattr(model, "_orig_mod", model)
        full = dict(meta)
        full["step"] = step
        full["model_config"] = raw.config.to_dict()
        if optimizers is not None:  # how many optimizer files (shards) make up the state
            full["optim_world_size"] = get_world_size()
        text = json.dumps(full, indent=2, default=_to_jsonable)
        _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text))
    return ckpt_dir


def find_last_step(ckpt_dir) -> int | None:
    """Largest step with a complete checkpoint (meta and weights present), or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    steps = []
    for f in ckpt_dir.iterdir():
        m = _META_RE.match(f.name)
        if m and _paths(ckpt_dir, int(m.group(1)))[0].exists():
            steps.append(int(m.group(1)))
    return max(steps) if steps else None


def _stage_of(path: Path) -> str | None:
    """'sft' for .../sft_checkpoints/d4 or .../sft_checkpoints."""
    for name in (path.parent.name, path.name):
        if name.endswith("_checkpoints") and name[: -len("_checkpoints")] in STAGES:
            return name[: -len("_checkpoints")]
    return None


def _missing(path: Path, what: str) -> RustchatError:
    stage = _stage_of(path)
    hint = f"run the {stage} stage first" if stage else "train a model first"
    hint += " (offline, rustchat speedrun --preset tiny trains every stage on bundled data)"
    return RustchatError(f"{what} in {path}: {hint}")


def load_checkpoint(ckpt_dir, step: int | None = None, device="cpu", load_optimizer: bool = True, *, rank: int = 0):
    """-> (model_state, optim_states or None, meta). step None: the last complete one."""

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise _missing(ckpt_dir, "no checkpoint directory")
    if step is None:
        step = find_last_step(ckpt_dir)
        if step is None:
            raise _missing(ckpt_dir, "no complete checkpoint")
    model_path, optim_path, meta_path = _paths(ckpt_dir, step, rank)
    if not (meta_path.exists() and model_path.exists()):
        raise _missing(ckpt_dir, f"no complete checkpoint for step {step}")
    meta = read_json_object(meta_path, "checkpoint meta")
    config = check_model_config(meta.get("model_config"), meta_path)
    shapes = _safetensors_shapes(model_path)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config, init=False).state_dict().items()}
    if shapes != want:
        diff = sorted(set(shapes.items()) ^ set(want.items()))[:3]
        raise RustchatError(
            f"{model_path}: tensors do not match the model_config in {meta_path.name} (first differences: {diff})"
        )
    try:
        model_state = load_file(str(model_path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise RustchatError(f"{model_path}: not a valid safetensors file: {type(e).__name__}: {e}") from None
    for name, t in model_state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RustchatError(f"{model_path}: tensor {name} holds NaN or infinite values")
    optim_states = None
    if load_optimizer:
        optim_states = _load_optimizer_shards(ckpt_dir, step, meta)
    return model_state, optim_states, meta


def _load_optimizer_shards(ckpt_dir: Path, step: int, meta: dict) -> list:
    """Every rank's optimizer file of `step`, in rank order (a list per rank of the state dicts
    of its optimizers): optimizer state is sharded, and a resume on another number of ranks
    needs all the shards. Memory-mapped on the CPU: a rank reads only the slices it keeps."""
    saved = meta.get("optim_world_size")
    n = saved if isinstance(saved, int) and not isinstance(saved, bool) and 1 <= saved <= 1 << 16 else None
    if n is None:  # checkpoints that do not record it: the consecutive rank files present
        n = 1
        while _paths(ckpt_dir, step, n)[1].exists():
            n += 1
    shards = []
    for rank in range(n):
        path = _paths(ckpt_dir, step, rank)[1]
        if not path.exists():
            raise RustchatError(
                f"optimizer state {path.name} missing in {ckpt_dir} (the run that saved it had {n} ranks)"
            )
        regular_file(path, "optimizer state")
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # weights_only refuses arbitrary pickled objects
            raise RustchatError(f"cannot load {path}: {type(e).__name__}: {e}") from None
        if not isinstance(shards[-1], list):
            raise RustchatError(f"{path}: optimizer state is a {type(shards[-1]).__name__}, expected a list")
    return shards


def load_optimizer_states(optimizers, optim_states) -> None:
    """Load a checkpoint's optimizer states: every rank's list (load_checkpoint), or one rank's."""
    per_rank = optim_states if optim_states and isinstance(optim_states[0], list) else [optim_states]
    counts = {len(states) for states in per_rank}
    if counts == {2} and len(optimizers) == 1:  # a classic [AdamW, Muon] pair (replicated on every rank)
        optimizers[0].load_state_dict(per_rank[0])
        return
    if counts != {len(optimizers)}:
        raise RustchatError(f"checkpoint has {sorted(counts)} optimizer states per rank, run has {len(optimizers)}")
    for i, opt in enumerate(optimizers):
        opt.load_state_dict([states[i] for states in per_rank] if len(per_rank) > 1 else per_rank[0][i])


def build_model_from_meta(meta: dict, device="cpu", model_state: dict | None = None):
    """A GPT shaped by meta['model_config']; with model_state, its weights are loaded (strict)."""
    cfg = check_model_config(meta.get("model_config"), "checkpoint meta")
    if model_state is None:
        with torch.device(device):
            return GPT(cfg)
    with torch.device("meta"):
        model = GPT(cfg, init=False)
    model.to_empty(device=device)
    model.load_state_dict(model_state, strict=True)
    return model


def load_stage_model(
    stage: str,
    depth: int | None = None,
    step: int | None = None,
    device="cpu",
    *,
    base_dir=None,
    load_optimizer: bool = False,
):
    """Model of a stage's checkpoint -> (model, optim_states or None, meta).
    depth None picks the one depth that has a complete checkpoint (`pick_depth`)."""
    if depth is None:
        depth = pick_depth(stage, base_dir)
    d = stage_dir(stage, depth, base_dir)
    model_state, optim_states, meta = load_checkpoint(d, step, device, load_optimizer)
    model = build_model_from_meta(meta, device, model_state)
    return model, optim_states, meta


def previous_stage(stage: str) -> str | None:
    """The stage whose checkpoint `stage` starts from (base <- mid <- sft <- rl)."""
    return _PREVIOUS[stage]


def load_model(
    source: str = "sft", *, depth: int | None = None, step: int | None = None, device: str = "cpu", base_dir=None
) -> tuple[GPT, Tokenizer, dict]:
    """A trained model, ready to use: (model in eval mode, the base dir's tokenizer, meta).

    `source` is the stage (base, mid, sft); depth None picks the largest depth with a
    checkpoint, step None the last step. `model(ids)` on a LongTensor [B, T] returns fp32
    logits [B, T, vocab]. meta holds the checkpoint's step, model config and training state."""
    if source not in _PREVIOUS:
        raise RustchatError(f"unknown source {source!r}; expected one of {', '.join(_PREVIOUS)}")
    device = autodetect_device(device)
    if device.startswith("cpu"):
        setup_cpu_math()
    base = Path(base_dir) if base_dir else get_base_dir(create=False)
    tok = load_tokenizer(base)
    model, _, meta = load_stage_model(source, depth, step, device=device, base_dir=base)
    model.eval()
    if model.config.vocab_size != tok.vocab_size:
        raise RustchatError(
            f"the {source} checkpoint has vocab {model.config.vocab_size} but the tokenizer in "
            f"{base / 'tokenizer'} has {tok.vocab_size}"
        )
    return model, tok, meta


# ---------------------------------------------------------------------------
# RNG states as JSON (meta is json, never pickle)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA (current device) generator states, JSON-able."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict | None) -> None:
    """Inverse of capture_rng_state; generators missing from `state` are left as they are."""
    state = state or {}
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# ---------------------------------------------------------------------------
# Runs: what a --resume carries over, which run a directory holds, and who writes it


def new_run_id() -> str:
    """A run's name in its checkpoints' meta: when it started, plus random hex for uniqueness."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunLedger:
    """The bookkeeping that carries a run across --resume: its id, its loss history, its first
    record and its wall time. `resumed_meta` is the meta of the checkpoint a --resume starts
    from (None for a new run); `meta()` is what every checkpoint of the run records, and
    `summary()` the whole run for the report, while a stage's own history and seconds cover
    one invocation only."""

    def __init__(self, resumed_meta: dict | None = None):
        prior = resumed_meta or {}
        self.run_id = str(prior.get("run_id") or new_run_id())
        self.resumed_at = int(prior.get("step", 0)) if resumed_meta else None
        self.prior_history = list(prior.get("history") or [])
        self.run_first = prior.get("run_first") or (self.prior_history[0] if self.prior_history else None)
        self.prior_seconds = float(prior.get("run_seconds") or 0.0)

    def meta(self, history: list[dict], seconds: float) -> dict:
        return {
            "run_id": self.run_id,
            "history": (self.prior_history + history)[-2000:],
            # the run from its first step, across resumes (history above is capped)
            "run_first": self.run_first or (history[0] if history else None),
            "run_seconds": self.prior_seconds + seconds,
        }

    def summary(self, history: list[dict], seconds: float) -> dict:
        run_history = self.prior_history + history
        if self.run_first and (not run_history or run_history[0]["step"] != self.run_first["step"]):
            run_history.insert(0, self.run_first)
        return {
            "run_id": self.run_id,
            "run_history": run_history,
            "run_seconds": self.prior_seconds + seconds,
            "resumed_at": self.resumed_at,
        }


def _run_of(ckpt_dir: Path, step: int) -> str:
    try:
        meta = read_json_object(_paths(ckpt_dir, step)[2], "checkpoint meta")
    except RustchatError:
        return f"unnamed-{step:06d}"
    return str(meta.get("run_id") or f"unnamed-{step:06d}")


def check_fresh_run(ckpt_dir, *, force: bool, resume_hint: str = "--resume") -> None:
    """A new run must not hide behind an old one: where `ckpt_dir` holds checkpoints, refuse in
    one line unless force (then `archive_run` moves the old run aside before the first save, so
    a start that fails loses nothing)."""
    ckpt_dir = Path(ckpt_dir)
    last = find_last_step(ckpt_dir)
    if last is not None and not force:
        raise RustchatError(
            f"{ckpt_dir} holds run {_run_of(ckpt_dir, last)} (up to step {last}): continue it with "
            f"{resume_hint}, or start a new run with --force (the old one is archived)"
        )


def archive_run(ckpt_dir) -> str | None:
    """Move the checkpoints in `ckpt_dir` to <ckpt_dir>/archived/<their run id>/, saying so, so
    the directory's latest checkpoint is always the new run's. Returns the archive or None."""
    ckpt_dir = Path(ckpt_dir)
    last = find_last_step(ckpt_dir)
    if last is None:
        return None
    old = _run_of(ckpt_dir, last)
    dest = ckpt_dir / "archived" / old
    n = 1
    while dest.exists():
        n += 1
        dest = ckpt_dir / "archived" / f"{old}.{n}"
    dest.mkdir(parents=True)
    for f in ckpt_dir.iterdir():
        if f.is_file() and re.match(r"^(model|optim|meta)_\d{6,}", f.name):
            os.replace(f, dest / f.name)
    print(f"--force: archived the previous run {old} (up to step {last}) to {dest}", flush=True)
    return str(dest)


class StageLock:
    """One writer per stage directory: an advisory lock (flock) on <ckpt_dir>/.lock held for
    the run. The kernel releases it when the process ends however it ends, so a crashed run
    never blocks the next; the file names the holder (pid, command, start) for the refusal,
    and a file left by a dead pid is simply taken over."""

    NAME = ".lock"

    def __init__(self, ckpt_dir):
        self.path = Path(ckpt_dir) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> "StageLock":
        for _ in range(10):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _unwritable(self.path.parent, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise RustchatError(
                    f"{self.path.parent} is in use by another run ({holder}); wait for it to end, "
                    "or use another --depth or --base-dir"
                ) from None
            # the file may have been removed by a holder releasing just now: lock the live one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["rustchat", *sys.argv[1:]])[:300],
            }
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            self.fd = fd
            return self
        raise RustchatError(f"{self.path}: could not take the run lock (it keeps changing)")

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            rec = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        except (OSError, ValueError):
            rec = {}
        if not isinstance(rec, dict) or "pid" not in rec:
            return "holder unknown"
        pid = rec.get("pid")
        alive = ""
        if isinstance(pid, int):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = ", which has exited: a child process of it still holds the lock"
            except OSError:
                pass
        return (
            f"pid {pid} on {rec.get('host', '?')}, started {rec.get('started', '?')}: {rec.get('command', '?')}{alive}"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then re-checks the live file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
