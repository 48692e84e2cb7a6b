"""report.md under the base dir: one section per stage (base, mid, sft, eval, ...), each
rewritten in place when its stage runs again, in pipeline order."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .common import get_base_dir

ORDER = ["tokenizer", "base", "mid", "sft", "eval", "speedrun"]


def _sections(text: str) -> dict[str, str]:
    out, name, buf = {}, None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            if name is not None:
                out[name] = "".join(buf)
            name, buf = line[3:].strip(), [line]
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "".join(buf)
    return out


def write_section(name: str, rows: dict, *, base_dir=None, table: str | None = None) -> Path:
    path = Path(base_dir or get_base_dir()) / "report.md"
    sections = _sections(path.read_text()) if path.exists() else {}
    lines = [f"## {name}\n", "\n", f"_{time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}_\n", "\n"]
    lines += ["| | |\n", "| --- | --- |\n"] + [f"| {k} | {v} |\n" for k, v in rows.items()]
    if table:
        lines += ["\n", table.rstrip() + "\n"]
    sections[name] = "".join(lines) + "\n"
    names = sorted(sections, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("# rustchat report\n\n" + "".join(sections[n] for n in names))
    os.replace(tmp, path)
    return path
