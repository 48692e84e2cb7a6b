"""Documents from local files: plain text, JSONL, and parquet shards.

Used by `rustchat tok train` and by the pretraining loader. A path may be a file or a
directory (searched recursively, sorted, for .txt .md .rst .py .jsonl .parquet). Plain text
files are split into documents at blank lines; JSONL and parquet rows are documents (their
`text` field / column). Errors name the file (and line) at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..common import RustchatError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}


class TextSourceError(RustchatError, ValueError):
    """A data file is missing, unreadable or lacks the expected field."""


def list_files(paths: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise TextSourceError(f"{p}: directory holds no {', '.join(sorted(SUFFIXES))} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TextSourceError(f"{p}: no such file or directory")
    return files


def text_file_docs(path: Path, sizes: list[int]) -> Iterator[str]:
    # Stream paragraph by paragraph so a multi-GB file never sits in memory at once.
    buf: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            sizes[0] += len(line)
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf)
                buf = []
    if buf:
        yield "".join(buf)


def jsonl_rows(lines: Iterable[str], path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank JSON line; a bad line is a one-line error
    naming the file and line (every JSONL reader of the package goes through here)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise TextSourceError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise TextSourceError(f"{path}:{lineno}: nested too deep to parse") from None


def jsonl_docs(path: Path, text_field: str, sizes: list[int]) -> Iterator[str]:
    def counted(f):
        for line in f:
            sizes[0] += len(line)
            yield line

    with open(path, encoding="utf-8") as f:
        for lineno, row in jsonl_rows(counted(f), path):
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise TextSourceError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
            yield row[text_field]


def parquet_texts(path: Path, text_column: str = "text") -> Iterator[list[str]]:
    """Row groups of a parquet shard's text column, one list of str per row group."""
    try:
        import pyarrow.parquet as pq  # heavy: only parquet input needs it, `tok train` on text stays light
    except ImportError:
        raise TextSourceError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise TextSourceError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise TextSourceError(f"{path}: parquet shard has no {text_column!r} column (columns: {names})")
    for i in range(pf.num_row_groups):
        yield [t for t in pf.read_row_group(i, columns=[text_column]).column(0).to_pylist() if t is not None]


def iter_documents(
    paths: list[str | os.PathLike], *, text_field: str = "text", progress: list[int] | None = None
) -> Iterator[str]:
    """Yield documents from files/directories. If given, `progress[0]` counts chars read."""
    sizes = progress if progress is not None else [0]
    for path in list_files(paths):
        if path.suffix == ".parquet":
            for group in parquet_texts(path, text_field):
                for t in group:
                    sizes[0] += len(t)
                    yield t
        elif path.suffix == ".jsonl":
            yield from jsonl_docs(path, text_field, sizes)
        else:
            yield from text_file_docs(path, sizes)
