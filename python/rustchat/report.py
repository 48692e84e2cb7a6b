"""report.md under the base dir: one section per stage (base, mid, sft, eval, ...), each
rewritten in place when its stage runs again, in pipeline order."""

from __future__ import annotations

import os
import platform
import sys
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


def machine() -> str:
    """The host, its CPU and the CPUs this process may use, and the vector ISA torch's CPU kernels
    picked: CPU runs of the same seed give other numbers and times on another CPU (its float sums
    and speed differ), and a VM's model name alone ("AMD EPYC") can hide which one it is."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        if "model name" in info:
            cpu = f"{info['model name']}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    except OSError:  # not Linux: platform's name for the processor
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = sys.modules.get("torch")  # the stages that train have it loaded; the tokenizer's need not
    isa = f", torch {torch.backends.cpu.get_cpu_capability()}" if torch is not None else ""
    return f"{platform.node()} ({cpu}, {n} CPUs{isa})"


def write_section(name: str, rows: dict, *, base_dir=None, table: str | None = None) -> Path:
    path = Path(base_dir or get_base_dir()) / "report.md"
    sections = _sections(path.read_text()) if path.exists() else {}
    lines = [f"## {name}\n", "\n", f"_{time.strftime('%Y-%m-%d %H:%M:%S')} on {machine()}_\n", "\n"]
    lines += ["| | |\n", "| --- | --- |\n"] + [f"| {k} | {v} |\n" for k, v in rows.items()]
    if table:
        lines += ["\n", table.rstrip() + "\n"]
    sections[name] = "".join(lines) + "\n"
    names = sorted(sections, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("# rustchat report\n\n" + "".join(sections[n] for n in names))
    os.replace(tmp, path)
    return path
