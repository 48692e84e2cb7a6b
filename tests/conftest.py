"""Shared fixtures: a real-text corpus for tokenizer tests.

If RUSTCHAT_TEST_CORPUS names a directory of en/zh/code text files (CI builds one), its
en/zh/code files are used; otherwise real text is gathered from this Python's own standard
library (source code and docstrings), which every machine has.
"""

import os
import sysconfig
from pathlib import Path

import pytest


def _stdlib_text(limit: int) -> str:
    parts, size = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        size += len(t)
        if size >= limit:
            break
    return "\n\n".join(parts)


@pytest.fixture(scope="session")
def corpus() -> dict[str, str]:
    """Kind of text -> a few hundred KB of it."""
    d = os.environ.get("RUSTCHAT_TEST_CORPUS")
    out = {}
    if d and Path(d).is_dir():
        for name in ("en", "zh", "code"):
            p = Path(d) / f"{name}.txt"
            if p.is_file():
                with open(p, encoding="utf-8", errors="replace") as f:
                    out[name] = f.read(400_000)
    if "code" not in out:
        out["code"] = _stdlib_text(400_000)
    return out
