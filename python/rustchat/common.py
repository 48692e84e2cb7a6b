"""What every layer shares and that needs no torch: the user-facing error, the base dir, rank-0 printing."""
from __future__ import annotations

import os
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
