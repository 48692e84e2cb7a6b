"""What every layer shares and that needs no torch: the user-facing error, the base dir, rank-0 printing."""

from __future__ import annotations

import numbers
import os
import tempfile
import socket
import urllib.parse
from pathlib import Path


class RustchatError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback."""

    def __init__(self, message: str):
        # keep the message on one line so it reads well after "error: "
        super().__init__(" ".join(str(message).split()))


class OutOfRangeError(RustchatError, ValueError):
    """A count outside its allowed range: one line naming the flag or argument and the range.
    A RustchatError (the CLI prints it as one line) and a ValueError (what Python callers of
    the public API expect for a bad argument value)."""


# ----------------------------------------------------------------------------- bounds
# Fixed maxima of the counts a caller can name, on the command line or through the Python API.
# Generous for real runs, finite: an extra zero or three fails at once, in one line, instead of
# exhausting memory, threads or descriptors minutes later. Counts of parallelism are bounded by
# the machine instead (`available_cpus`, and the visible GPUs where processes use them).
MAX_ROWS = 4096  # rows in one forward: a micro-batch, an eval batch, a decode batch (KV-cache rows)
MAX_SEQ_LEN = 1 << 17  # tokens per training row (the model's context)
MAX_BATCH_TOKENS = 1 << 26  # tokens per optimizer step (total batch size)
MAX_BATCH_CONVERSATIONS = 1 << 16  # conversations per SFT optimizer step
MAX_NEW_TOKENS = 1 << 16  # tokens of one reply (chat, eval, RL rollouts; the context caps it further)
MAX_SAMPLES = 256  # replies sampled per prompt (pass@n, an RL group)
MAX_QUESTIONS = 4096  # questions sampled together: RL's per step, RL's per pass@k evaluation
# requests one BatchScheduler holds waiting: RL queues a step's MAX_QUESTIONS * MAX_SAMPLES replies
MAX_QUEUE = MAX_QUESTIONS * MAX_SAMPLES
MAX_SERVE_QUEUE = 1 << 16  # requests `rustchat serve` holds waiting for a batch slot
MAX_CONNECTIONS = 1 << 16  # open connections of `rustchat serve` (the descriptor limit lowers it)
MAX_EXAMPLES = 1 << 20  # problems or examples per task: eval caps, CORE caps, generated RL splits
MAX_SCORED_TOKENS = 1 << 30  # validation tokens held and scored for bits per byte
DEFAULT_BPB_TOKENS = 1 << 20  # validation tokens a base run scores for val bpb unless told otherwise
MAX_VOCAB_SIZE = 1 << 24  # ids the Rust core's dense per-id tables hold (_core.MAX_VOCAB)
MAX_TOP_K = MAX_VOCAB_SIZE  # a top-k beyond the vocabulary means all of it
MAX_DEPTH = 256  # transformer layers
MAX_WIDTH = 1024  # per-layer width (aspect ratio) and attention head width, in dims
MAX_NPROC = 1024  # processes on one machine (the machine's CPUs and GPUs bound it further)
MAX_NODES = 1024  # machines in one run
MAX_PORT = 65535
FINEWEB_SHARDS = 1823  # shard_00000 .. shard_01822 of FineWeb-Edu; the last one is kept for validation
MAX_SHARDS = FINEWEB_SHARDS - 1  # FineWeb-Edu training shards
MAX_PREFETCH = 64  # row groups the pretraining loader tokenizes ahead


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset or a container limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return max(1, os.cpu_count() or 1)


def check_count(name: str, value, lo: int, hi: int, why: str = ""):
    """`value` as an int when it is one in [lo, hi]; else OutOfRangeError "name must be in
    [lo, hi], got value" (`why` says where hi comes from, e.g. "the CPUs available")."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or not lo <= value <= hi:
        kind = "" if ok else "an int "
        raise OutOfRangeError(f"{name} must be {kind}in [{lo}, {hi}]{f' ({why})' if why else ''}, got {value!r}")
    return int(value)


MAX_WINDOW_PATTERN = 64  # letters of an attention window pattern (tiled over the layers)


def check_window_pattern(pattern, name: str = "window_pattern") -> None:
    """A window pattern is 1..MAX_WINDOW_PATTERN letters S (short window) and L (full context)."""
    if not isinstance(pattern, str) or not 1 <= len(pattern) <= MAX_WINDOW_PATTERN or set(pattern.upper()) - set("SL"):
        raise RustchatError(f"{name} must be 1 to {MAX_WINDOW_PATTERN} letters S and L, got {pattern!r}")


def get_base_dir(create: bool = True) -> Path:
    """Root of all artifacts: $RUSTCHAT_BASE_DIR, else ~/.cache/rustchat."""
    env = os.environ.get("RUSTCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "rustchat"
    if create:
        base.mkdir(parents=True, exist_ok=True)
    return base


def probe_writable(directory) -> None:
    """Create `directory` (and its parents), then create and remove a file in it; raises the
    OSError. Trying is the only test that holds for root (who ignores mode bits) and read-only mounts."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".rustchat_write_probe_", dir=d)
    os.close(fd)
    os.unlink(probe)


def check_writable(directory, flag: str = "") -> Path:
    """Fail now, in one line, where a command could not write its output at the end."""
    d = Path(directory)
    try:
        probe_writable(d)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise RustchatError(f"{flag + ' ' if flag else ''}{d}: not writable ({why})") from None
    return d


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (torchrun sets RANK in every process it starts)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


# ----------------------------------------------------------------------------- the network, asked once
# What every "no data" error offers: the tasks and the pipeline that need no network.
OFFLINE_ROUTE = (
    "offline, use the generated tasks (--tasks tiny) or run the whole pipeline with rustchat speedrun --preset tiny"
)
_TRUE = ("1", "true", "yes", "on")
_HUB_REACH: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: it can)


def hub_endpoint() -> str:
    """The Hugging Face endpoint, honouring HF_ENDPOINT as the hub libraries do."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline_mode() -> str | None:
    """'HF_HUB_OFFLINE is set' (or HF_DATASETS_OFFLINE) when the user asked for no network."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    return None


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now, or None. Offline mode answers at once; otherwise one TCP
    connection to the endpoint (5 s) is tried, once per process, so a machine without network
    fails in seconds instead of going through the download libraries' retries. Behind a proxy
    the answer is left to the libraries."""
    reason = hub_offline_mode()
    if reason:
        return reason
    endpoint = hub_endpoint()
    if endpoint not in _HUB_REACH:
        parts = urllib.parse.urlsplit(endpoint)
        proxied = any(
            os.environ.get(v)
            for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
        )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        _HUB_REACH[endpoint] = None
        if not proxied and parts.hostname:
            try:
                socket.create_connection((parts.hostname, port), timeout=5).close()
            except OSError as e:
                _HUB_REACH[endpoint] = f"cannot reach {parts.hostname}:{port}: {e.strerror or e}"
    return _HUB_REACH[endpoint]
