"""Rows of a Hugging Face dataset, from the hub (via `datasets`) or from a local copy.

The hub path calls `datasets.load_dataset(hub_id, subset, split=split)`, so `HF_ENDPOINT`,
`HF_HOME`/the datasets cache and offline mode behave as they do for `datasets`. A local `path`
(JSONL, JSON array, gzipped JSONL, or parquet; a directory means all such files in it, sorted)
must hold rows with the hub dataset's field names; it needs neither `datasets` nor a network.

Rows come back in a deterministic shuffled order (`shuffle_seed`, None keeps file order), the
same for the hub and a local copy of the same rows.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from ..common import OFFLINE_ROUTE, RustchatError, hub_offline_mode, hub_unreachable
from ..data.textsource import jsonl_rows

_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


class HubUnavailable(RustchatError):
    """A hub dataset that could not be loaded. `what` says which and why; the message adds the
    way round it, which callers that know the --task-dir file name make exact (`tasks.task_from`)."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what}; {local_hint()}")


def local_hint(file_stem: str | None = None) -> str:
    named = f" holding {file_stem}.jsonl (or .jsonl.gz, .json, .parquet)" if file_stem else " with a local copy"
    return f"pass --task-dir DIR{named}, or {OFFLINE_ROUTE}"


class Rows:
    """Read-only list of row dicts over a list or a `datasets.Dataset`, in a given order."""

    def __init__(self, data, order: np.ndarray | None, source: str):
        self.data, self.order, self.source = data, order, source

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        j = int(self.order[i]) if self.order is not None else int(i)
        return self.data[j]


def load_rows(
    hub_id: str,
    subset: str | None,
    split: str,
    path=None,
    *,
    fields=(),
    field_types: dict | None = None,
    shuffle_seed: int | None = 42,
) -> Rows:
    """Rows of `hub_id`/`subset`/`split`, or of the local file(s) at `path`. `fields` are checked
    (and, in a local copy, every row's `field_types`: {field: type or tuple of types}), all rows
    before any is used, a problem naming FILE:LINE."""
    field_types = field_types or {}
    if path is not None:
        source = str(path)
        data = []
        for where, row in _read_local(Path(path)):  # every row checked before any is used
            missing = [f for f in fields if f not in row]
            if missing:
                raise RustchatError(
                    f"{where}: the row lacks the field(s) {', '.join(missing)} of {hub_id} "
                    f"(found: {', '.join(sorted(row))})"
                )
            for f in fields:
                want = field_types.get(f)
                if want is not None and not isinstance(row[f], want):
                    raise RustchatError(
                        f"{where}: field {f!r} is a {type(row[f]).__name__}, expected "
                        f"{' or '.join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))}"
                    )
            data.append(row)
    else:
        data, source = _load_hub(hub_id, subset, split), f"{hub_id}" + (f"/{subset}" if subset else "") + f" ({split})"
        missing = [f for f in fields if f not in data.column_names]
        if missing:
            raise RustchatError(f"{source}: the dataset lacks the field(s) {', '.join(missing)}")
    order = None
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(data))
    return Rows(data, order, source)


def _load_hub(hub_id: str, subset: str | None, split: str):
    where = f"{hub_id}" + (f" ({subset})" if subset else "") + f", split {split!r}"
    try:
        import datasets  # heavy; only a hub download needs it
    except ImportError:
        raise HubUnavailable(
            f"loading {where} from the Hugging Face hub needs the datasets package (pip install datasets)"
        ) from None
    # no network: say so now (once per process) rather than after the libraries' retries; in
    # offline mode `datasets` still reads its own cache
    why = hub_unreachable()
    if why and not hub_offline_mode():
        raise HubUnavailable(
            f"cannot load {where} from the Hugging Face hub ({why}; a copy already in the "
            "datasets cache is used with HF_HUB_OFFLINE=1)"
        )
    try:
        return datasets.load_dataset(hub_id, subset, split=split)
    except Exception as e:  # network, auth, unknown split... all end the same way for the user
        because = (f"{why}: " if why else "") + f"{type(e).__name__}: {str(e)[:300]}"
        raise HubUnavailable(f"could not load {where} from the Hugging Face hub ({because})") from e


def _read_local(path: Path) -> list[tuple[str, dict]]:
    """("FILE:LINE", row) of every row of the local file(s)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        if not files:
            raise RustchatError(f"{path}: directory holds no {', '.join(_SUFFIXES)} files")
    elif not path.is_file():
        raise RustchatError(f"{path}: no such file or directory")
    else:
        files = [path]
    return [(f"{f}:{lineno}", row) for f in files for lineno, row in _read_file(f)]


# Bounds on local task files (--task-dir copies, custom JSON tasks): JSON lines are read one line
# at a time; a JSON array must be parsed whole, so it is refused above its size before reading.
MAX_TASK_FILE_BYTES = 16 << 30  # a JSONL file (compressed files: their decompressed text)
MAX_TASK_ARRAY_BYTES = 1 << 30  # a JSON array file
MAX_TASK_LINE_BYTES = 64 << 20  # one row
MAX_JSON_DEPTH = 64  # nesting of one row (a conversation is 3 deep)


def json_depth_problem(value, limit: int = MAX_JSON_DEPTH) -> str | None:
    """A one-line problem when `value` nests deeper than `limit` lists/objects (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return f"nested more than {limit} levels deep"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def task_lines(path: Path):
    """(line number, parsed value) of each non-blank line of a JSONL task file (.gz: gzipped),
    streamed; every problem (unreadable, truncated gzip, bad UTF-8 or JSON, a line or file too
    large, nesting too deep) is a RustchatError reading `FILE:LINE: problem`. The JSON of each
    line is parsed by the package's one JSONL reader (data.textsource.jsonl_rows)."""
    read = [0]  # lines read so far: where an I/O error happened

    def bounded_lines(f):
        total = 0
        while True:
            line = f.readline(MAX_TASK_LINE_BYTES + 1)
            if not line:
                return
            read[0] += 1
            total += len(line)
            if len(line) > MAX_TASK_LINE_BYTES:
                raise RustchatError(f"{path}:{read[0]}: line longer than {MAX_TASK_LINE_BYTES} bytes")
            if total > MAX_TASK_FILE_BYTES:
                raise RustchatError(f"{path}:{read[0]}: file larger than {MAX_TASK_FILE_BYTES} bytes")
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RustchatError(f"{path}:{read[0]}: not UTF-8 text (byte {e.start})") from None

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, value in jsonl_rows(bounded_lines(f), path):
                problem = json_depth_problem(value)
                if problem:
                    raise RustchatError(f"{path}:{lineno}: {problem}")
                yield lineno, value
    except (EOFError, gzip.BadGzipFile, OSError) as e:  # a truncated or corrupt .gz, an I/O error
        why = "truncated (the compressed data ends early)" if isinstance(e, EOFError) else str(e)
        raise RustchatError(f"{path}:{read[0] + 1}: cannot read ({why})") from None


def _read_file(path: Path) -> list[dict]:
    if path.name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # heavy; only parquet copies need it
        except ImportError:
            raise RustchatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise RustchatError(f"{path}: not a readable parquet file ({e})") from e
        pairs = list(enumerate(rows, 1))
    elif _is_json_array(path):  # one JSON array rather than JSON lines: parsed whole, so bounded first
        size = path.stat().st_size
        if size > MAX_TASK_ARRAY_BYTES or path.name.endswith(".gz"):
            raise RustchatError(
                f"{path}: a JSON array file must be uncompressed and at most {MAX_TASK_ARRAY_BYTES} bytes "
                f"({size} bytes); use JSON lines (one row per line) for large files"
            )
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise RustchatError(f"{path}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise RustchatError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise RustchatError(f"{path}: nested more than {MAX_JSON_DEPTH} levels deep") from None
        if not isinstance(rows, list):
            raise RustchatError(f"{path}:1: expected a JSON array of rows or JSON lines")
        pairs = list(enumerate(rows, 1))  # numbered by position in the array
    else:
        pairs = task_lines(path)
    out = []
    for lineno, row in pairs:
        if not isinstance(row, dict):
            raise RustchatError(f"{path}:{lineno}: expected a JSON object per row, got {type(row).__name__}")
        problem = json_depth_problem(row)
        if problem:
            raise RustchatError(f"{path}:{lineno}: {problem}")
        out.append((lineno, row))
    return out


def _is_json_array(path: Path) -> bool:
    """Whether the file's first non-blank character is `[` (a JSON array, not JSON lines)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except (EOFError, OSError):
        return False  # task_lines reports it with its line
    return head.lstrip()[:1] == b"["
