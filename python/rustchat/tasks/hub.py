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
    hub_id: str, subset: str | None, split: str, path=None, *, fields=(), shuffle_seed: int | None = 42
) -> Rows:
    """Rows of `hub_id`/`subset`/`split`, or of the local file(s) at `path`. `fields` are checked."""
    if path is not None:
        data, source = _read_local(Path(path)), str(path)
        if data:
            missing = [f for f in fields if f not in data[0]]
            if missing:
                raise RustchatError(
                    f"{source}: rows lack the field(s) {', '.join(missing)} of {hub_id} "
                    f"(found: {', '.join(sorted(data[0]))})"
                )
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


def _read_local(path: Path) -> list[dict]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
        if not files:
            raise RustchatError(f"{path}: directory holds no {', '.join(_SUFFIXES)} files")
        return [row for f in files for row in _read_file(f)]
    if not path.is_file():
        raise RustchatError(f"{path}: no such file or directory")
    return _read_file(path)


def _read_file(path: Path) -> list[dict]:
    if path.name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # heavy; only parquet copies need it
        except ImportError:
            raise RustchatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise RustchatError(f"{path}: not a readable parquet file ({e})") from e
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RustchatError(f"{path}: cannot read ({e})") from e
    if text.lstrip().startswith("["):  # one JSON array rather than JSON lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RustchatError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        pairs = list(enumerate(rows, 1))
    else:
        pairs = list(jsonl_rows(text.splitlines(), path))
    for lineno, row in pairs:
        if not isinstance(row, dict):
            raise RustchatError(f"{path}:{lineno}: expected a JSON object per row, got {type(row).__name__}")
    return [row for _, row in pairs]
