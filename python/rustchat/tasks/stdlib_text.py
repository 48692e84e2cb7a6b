"""Pretraining text that every machine has: this Python's standard library source (code,
docstrings, comments) and, where present, the plain-text files under /usr/share/doc.

For the tiny offline recipe, in place of FineWeb-Edu. Each file is cut into documents of at most
`max_chars` at blank lines. A file goes wholly to train or to val by a hash of its name
relative to its root, so the split is deterministic and the same for the same files anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc")
_DOC_NAMES = ("README", "NEWS", "AUTHORS", "TODO", "THANKS", "changelog", "HISTORY", "CHANGES")
_DOC_SUFFIXES = (".txt", ".md", ".rst")
_MAX_FILE_BYTES = 1 << 20


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(include_doc: bool = True) -> list[tuple[str, Path]]:
    """(key, path) of every source file, sorted by key; the key names the file for the split."""
    out = []
    root = _stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        # prune installed packages (often gigabytes) and caches before descending
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for fn in filenames:
            if fn.endswith(".py"):
                p = Path(dirpath, fn)
                out.append(("stdlib/" + p.relative_to(root).as_posix(), p))
    if include_doc and DOC_ROOT.is_dir():
        for p in DOC_ROOT.rglob("*"):
            name = p.name[:-3] if p.name.endswith(".gz") else p.name
            if (name.endswith(_DOC_SUFFIXES) or name.startswith(_DOC_NAMES)) and p.is_file() and not p.is_symlink():
                out.append(("doc/" + p.relative_to(DOC_ROOT).as_posix(), p))
    out.sort()
    return out


def split_of(key: str, val_fraction: float = 0.05) -> str:
    """ "train" or "val" for a file key, by its SHA-256."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        if len(raw) > 4 * _MAX_FILE_BYTES:
            return None
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None  # unreadable or binary: skip
    return None if "\x00" in text else text


def chunk(text: str, max_chars: int) -> Iterator[str]:
    """Pieces of at most ~max_chars, cut at blank lines (a longer paragraph is cut hard)."""
    buf, size = [], 0
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            if buf:
                yield "\n\n".join(buf)
                buf, size = [], 0
            yield para[:max_chars]
            para = para[max_chars:]
        if size + len(para) + 2 > max_chars and buf:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(para)
        size += len(para) + 2
    if buf and "".join(buf).strip():
        yield "\n\n".join(buf)


def stdlib_documents(
    split: str = "train", val_fraction: float = 0.05, max_chars: int = 8000, include_doc: bool = True
) -> Iterator[str]:
    """Documents of one split ("train" or "val"), in a fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    for key, path in source_files(include_doc):
        if split_of(key, val_fraction) != split:
            continue
        text = _read_text(path)
        if text and text.strip():
            for doc in chunk(text, max_chars):
                if doc.strip():
                    yield doc


def write_corpus(
    out_dir, val_fraction: float = 0.05, max_chars: int = 8000, include_doc: bool = True
) -> dict[str, Path]:
    """Write train.jsonl and val.jsonl ({"text": doc} per line) under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val"):
        p = out / f"{split}.jsonl"
        tmp = p.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in stdlib_documents(split, val_fraction, max_chars, include_doc):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        tmp.replace(p)  # atomic: a half-written corpus never looks complete
        paths[split] = p
    return paths
