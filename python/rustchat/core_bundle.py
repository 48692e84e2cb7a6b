"""The CORE eval bundle (DCLM's ICL tasks as nanochat packs them, at 48abd7d and 92d63d4 alike):
reading a bundle directory, checking it, and fetching nanochat's eval_bundle.zip into
<base dir>/eval_bundle on first use.

A bundle directory holds
  core.yaml            `icl_tasks`: label, icl_task_type, dataset_uri, num_fewshot, continuation_delimiter
  eval_data/<uri>      one JSON object per line (the fields each task type reads are checked)
  eval_meta_data.csv   `Eval Task` (a label) and `Random baseline` (percent) per task
Every problem with it is a one-line error naming the file and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock
from tqdm import tqdm

from .common import RustchatError

# where nanochat (48abd7d, 92d63d4) downloads the bundle from; RUSTCHAT_EVAL_BUNDLE_URL points elsewhere
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
URL_ENV = "RUSTCHAT_EVAL_BUNDLE_URL"
# SHA-256 of that zip as several public projects pin it (22 tasks); RUSTCHAT_EVAL_BUNDLE_SHA256
# replaces it (for another bundle behind RUSTCHAT_EVAL_BUNDLE_URL; empty: no checksum check)
EVAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
SHA_ENV = "RUSTCHAT_EVAL_BUNDLE_SHA256"
BUNDLE_DIRNAME = "eval_bundle"
MAX_DOWNLOAD_BYTES = 4 << 30  # the real zip is ~160 MB; refuse a runaway body
MAX_SHOTS = 64  # few-shot examples per prompt at most (the bundle uses up to 10)

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# JSON fields each task type reads: name -> (type, what the error says it must be)
_FIELDS = {
    "multiple_choice": {
        "query": (str, "a string"),
        "choices": (list, "a list of strings"),
        "gold": (int, "an integer"),
    },
    "schema": {
        "context_options": (list, "a list of strings"),
        "continuation": (str, "a string"),
        "gold": (int, "an integer"),
    },
    "language_modeling": {"context": (str, "a string"), "continuation": (str, "a string")},
}


@dataclass(frozen=True)
class CoreTask:
    """One ICL task of the bundle: how to render it and its chance accuracy (a fraction)."""

    label: str
    task_type: str
    data_path: Path
    num_fewshot: int
    continuation_delimiter: str
    baseline: float


# ----------------------------------------------------------------------------- reading
def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RustchatError(f"{path}: no such file (a CORE bundle holds core.yaml, eval_data/ and eval_meta_data.csv)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RustchatError(f"{path}: not valid YAML ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("icl_tasks"), list) or not doc["icl_tasks"]:
        raise RustchatError(f"{path}: field icl_tasks must be a non-empty list of tasks")
    return doc


def _shots(value, where: str) -> int:
    # the bundle lists the shot counts to run ([0], [10], ...); nanochat runs the first (48abd7d, 92d63d4)
    shots = value[0] if isinstance(value, list) and value else value
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS:
        raise RustchatError(
            f"{where} field num_fewshot must be an integer 0..{MAX_SHOTS} or a list starting with one, got {value!r}"
        )
    return shots


def _baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise RustchatError(f"{path}: no such file (the random baselines of the CORE tasks)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (csv.Error, UnicodeDecodeError) as e:
        raise RustchatError(f"{path}: not a readable CSV file ({e})") from None
    for col in ("Eval Task", "Random baseline"):
        if not rows or col not in rows[0]:
            raise RustchatError(f"{path}: no column {col!r} (header: {', '.join(rows[0]) if rows else 'none'})")
    out = {}
    for n, row in enumerate(rows, start=2):
        try:
            b = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise RustchatError(
                f"{path} line {n}: field 'Random baseline' must be a number, got {row['Random baseline']!r}"
            ) from None
        if not 0.0 <= b < 100.0:
            raise RustchatError(f"{path} line {n}: field 'Random baseline' must be a percentage in [0, 100), got {b}")
        out[row["Eval Task"]] = b / 100.0
    return out


def load_bundle(bundle_dir: str | os.PathLike) -> list[CoreTask]:
    """The tasks of a bundle directory, in core.yaml's order, each checked."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise RustchatError(f"--bundle {root}: no such directory")
    config = root / "core.yaml"
    doc = _read_yaml(config)
    baselines = _baselines(root / "eval_meta_data.csv")
    tasks, seen = [], set()
    for i, t in enumerate(doc["icl_tasks"]):
        where = f"{config}: icl_tasks[{i}]"
        if not isinstance(t, dict):
            raise RustchatError(f"{where} must be a mapping with label, icl_task_type, dataset_uri, num_fewshot")
        for key in ("label", "icl_task_type", "dataset_uri", "num_fewshot"):
            if key not in t:
                raise RustchatError(f"{where} has no field {key}")
        label = t["label"]
        if not isinstance(label, str) or not label:
            raise RustchatError(f"{where} field label must be a non-empty string, got {label!r}")
        where = f"{config}: task {label!r}"
        if label in seen:
            raise RustchatError(f"{where}: field label is used by two tasks")
        seen.add(label)
        if t["icl_task_type"] not in TASK_TYPES:
            raise RustchatError(
                f"{where} field icl_task_type must be one of {', '.join(TASK_TYPES)}, got {t['icl_task_type']!r}"
            )
        uri = t["dataset_uri"]
        if not isinstance(uri, str) or not uri:
            raise RustchatError(f"{where} field dataset_uri must be a file name under eval_data/, got {uri!r}")
        data = root / "eval_data" / uri
        if not data.resolve().is_relative_to((root / "eval_data").resolve()):
            raise RustchatError(f"{where} field dataset_uri {uri!r} points outside eval_data/")
        if not data.is_file():
            raise RustchatError(f"{where} field dataset_uri: {data} does not exist")
        delim = t.get("continuation_delimiter", " ")
        if not isinstance(delim, str):
            raise RustchatError(f"{where} field continuation_delimiter must be a string, got {delim!r}")
        if label not in baselines:
            raise RustchatError(
                f"{root / 'eval_meta_data.csv'}: no 'Random baseline' row for task {label!r} (field 'Eval Task')"
            )
        tasks.append(
            CoreTask(label, t["icl_task_type"], data, _shots(t["num_fewshot"], where), delim, baselines[label])
        )
    return tasks


def load_examples(task: CoreTask) -> list[dict]:
    """The task's examples in file order (blank lines skipped), each checked for the fields its
    type reads."""
    fields = _FIELDS[task.task_type]
    out = []
    try:
        f = open(task.data_path, encoding="utf-8")
    except OSError as e:
        raise RustchatError(f"{task.data_path}: cannot read ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{task.data_path} line {n}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise RustchatError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(ex, dict):
                raise RustchatError(f"{where}: must be a JSON object")
            for key, (kind, what) in fields.items():
                v = ex.get(key)
                if not isinstance(v, kind) or isinstance(v, bool):
                    raise RustchatError(f"{where}: field {key} must be {what}, got {v!r}"[:300])
                if kind is list and (not v or not all(isinstance(c, str) for c in v)):
                    raise RustchatError(f"{where}: field {key} must be a non-empty list of strings"[:300])
            options = ex.get("choices", ex.get("context_options"))
            if "gold" in fields and not 0 <= ex["gold"] < len(options):
                raise RustchatError(f"{where}: field gold {ex['gold']} is not an index into its {len(options)} options")
            out.append(ex)
    if not out:
        raise RustchatError(f"{task.data_path}: no examples")
    return out


# ----------------------------------------------------------------------------- fetching
def bundle_url() -> str:
    return os.environ.get(URL_ENV) or EVAL_BUNDLE_URL


def _expected_sha256() -> str:
    return os.environ.get(SHA_ENV, EVAL_BUNDLE_SHA256).strip().lower()


def _download(url: str, dest: Path, quiet: bool) -> str:
    """Stream `url` into `dest`; returns the SHA-256 of what was written."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        size = r.headers.get("Content-Length") if hasattr(r, "headers") else None
        total = int(size) if size and size.isdigit() else None
        got = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="eval_bundle.zip", disable=quiet, mininterval=1.0
        ) as bar:
            while chunk := r.read(1 << 20):
                got += len(chunk)
                if got > MAX_DOWNLOAD_BYTES:
                    raise OSError(f"the body exceeds {MAX_DOWNLOAD_BYTES >> 20} MiB")
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise OSError(f"the body ended after {got} of {total} bytes")
    return h.hexdigest()


def _unpack(zip_path: Path, into: Path) -> Path:
    """Check the zip (every member's CRC, the bundle's own files) and extract it; returns the
    extracted eval_bundle directory."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            bad = z.testzip()
            if bad is not None:
                raise RustchatError(f"the downloaded eval_bundle.zip is corrupt (member {bad} fails its CRC)")
            names = set(z.namelist())
            for need in (f"{BUNDLE_DIRNAME}/core.yaml", f"{BUNDLE_DIRNAME}/eval_meta_data.csv"):
                if need not in names:
                    raise RustchatError(f"the downloaded eval_bundle.zip has no {need}")
            if not any(n.startswith(f"{BUNDLE_DIRNAME}/eval_data/") and not n.endswith("/") for n in names):
                raise RustchatError(f"the downloaded eval_bundle.zip has no {BUNDLE_DIRNAME}/eval_data/ files")
            z.extractall(into)  # zipfile drops absolute paths and '..' from member names
    except zipfile.BadZipFile as e:
        raise RustchatError(f"the downloaded eval_bundle.zip is not a zip file ({e})") from None
    return into / BUNDLE_DIRNAME


def ensure_bundle(base_dir: str | os.PathLike, *, quiet: bool = False) -> Path:
    """<base dir>/eval_bundle, downloaded and unpacked on first use. One process downloads
    (a file lock; other ranks wait, then find it), into temporary names that are renamed into
    place only once the checksum and the zip check pass, so an interrupted or bad download
    never leaves a bundle behind."""
    base = Path(base_dir)
    target = base / BUNDLE_DIRNAME
    if (target / "core.yaml").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    url = bundle_url()
    with FileLock(str(base / f"{BUNDLE_DIRNAME}.lock")):
        if (target / "core.yaml").is_file():  # another process fetched it while we waited
            return target
        work = Path(tempfile.mkdtemp(prefix=".eval_bundle.", dir=base))
        try:
            zip_path = work / "eval_bundle.zip"
            try:
                digest = _download(url, zip_path, quiet)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise RustchatError(
                    f"could not download the CORE eval bundle from {url} ({reason}); offline? fetch "
                    f"eval_bundle.zip on another machine, unzip it and move its eval_bundle/ folder to {target} "
                    f"(or pass --bundle DIR, or set {URL_ENV} to a reachable copy)"
                ) from None
            want = _expected_sha256()
            if want and digest != want:
                raise RustchatError(
                    f"eval_bundle.zip from {url} has SHA-256 {digest}, expected {want} "
                    f"(set {SHA_ENV} to accept another bundle)"
                )
            unpacked = _unpack(zip_path, work / "unpacked")
            load_bundle(unpacked)  # a bundle that cannot be read never takes the name
            if target.exists():  # a stale, incomplete directory (no core.yaml)
                shutil.rmtree(target)
            os.replace(unpacked, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"CORE eval bundle placed at {target}")
    return target


def resolve_bundle(bundle: str | None, base_dir: str | os.PathLike, *, quiet: bool = False) -> list[CoreTask]:
    """The tasks of --bundle DIR, else of the base dir's bundle (fetched on first use)."""
    root = Path(bundle) if bundle else ensure_bundle(base_dir, quiet=quiet)
    return load_bundle(root)
