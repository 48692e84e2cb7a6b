"""What every layer shares and that needs no torch: the user-facing error, the base dir, rank-0 printing."""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path


class RustchatError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback."""

    def __init__(self, message: str):
        # keep the message on one line so it reads well after "error: "
        super().__init__(" ".join(str(message).split()))


def get_base_dir(create: bool = True) -> Path:
    """Root of all artifacts: $RUSTCHAT_BASE_DIR, else ~/.cache/rustchat."""
    env = os.environ.get("RUSTCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "rustchat"
    if create:
        base.mkdir(parents=True, exist_ok=True)
    return base


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
