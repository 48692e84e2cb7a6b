"""Pretraining data: FineWeb-Edu parquet shards (downloaded on demand) or local files,
tokenized by the Rust tokenizer in a background thread, served as [B, T] next-token batches.

Documents are encoded with `<|bos|>` in front and concatenated into one stream; each batch
takes B*T+1 consecutive tokens (inputs = stream[:-1], targets = stream[1:]). `state()` is
the cursor of the NEXT batch (file, row group, document, tokens to skip), from which the stream
can be rebuilt exactly (`state=`), so a resumed run sees the same tokens as an uninterrupted one. With several ranks,
row group g belongs to rank g % world_size.
"""

from __future__ import annotations

import http.client
import os
import queue
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import pyarrow.parquet as pq
import torch

from ..common import (
    MAX_PREFETCH,
    MAX_ROWS,
    MAX_SEQ_LEN,
    OFFLINE_ROUTE,
    RustchatError,
    check_count,
    hub_endpoint,
    hub_unreachable,
)
from .textsource import SUFFIXES, TextSourceError, jsonl_docs, list_files, parquet_texts, text_file_docs

FINEWEB_REPO = "karpathy/fineweb-edu-100b-shuffle"
DOCS_PER_TEXT_GROUP = 1024  # plain-text files are cut into groups like parquet row groups


def shard_url(index: int, repo: str = FINEWEB_REPO) -> str:
    return f"{hub_endpoint()}/datasets/{repo}/resolve/main/shard_{index:05d}.parquet"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _NoCredentialsAcrossHosts(urllib.request.HTTPRedirectHandler):
    """urllib copies every header, Authorization included, onto the redirected request; the hub
    redirects downloads to a CDN on another host, which must never see HF_TOKEN (as
    huggingface_hub does, the header is kept only when scheme, host and port stay the same)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for key in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[key]
            for key in [k for k in new.unredirected_hdrs if k.lower() == "authorization"]:
                del new.unredirected_hdrs[key]
        return new


_OPENER = urllib.request.build_opener(_NoCredentialsAcrossHosts)


def _fetch(url: str, dest: Path) -> None:
    """Download `url` into `dest` (a temp file), refusing a body shorter than its Content-Length
    or a file that is not a whole parquet file (a connection closed early looks like the end)."""
    headers = {}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=60) as r, open(dest, "wb") as f:
        expected = r.headers.get("Content-Length")
        got = 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            got += len(chunk)
    if expected is not None and expected.isdigit() and got != int(expected):
        raise OSError(f"the body ended after {got} of {expected} bytes")
    try:
        pq.ParquetFile(dest)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise OSError(f"the download is not a complete parquet file ({e})") from None


def download_shards(indices, data_dir: str | os.PathLike, *, repo: str = FINEWEB_REPO, retries: int = 4) -> list[Path]:
    """Fetch the given FineWeb-Edu shards into data_dir (skipping ones present); written to a
    temporary name, checked, then renamed, so an interrupted or short download never leaves a
    file under a shard's name. HF_TOKEN is sent to the endpoint only, never across a redirect
    to another host."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    no_data = f"pass --data-dir with local parquet/text files, or {OFFLINE_ROUTE}"
    for i in indices:
        path = d / f"shard_{i:05d}.parquet"
        out.append(path)
        if path.exists():
            continue
        url = shard_url(i, repo)
        why = hub_unreachable()  # asked once: no retries against a network that is not there
        if why:
            raise RustchatError(f"cannot download {path.name} from {hub_endpoint()} ({why}); {no_data}")
        for attempt in range(1, retries + 1):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=d)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                _fetch(url, tmp)
                os.replace(tmp, path)
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                tmp.unlink(missing_ok=True)
                # only a transfer cut short or a server error is worth another try
                lasting = (
                    isinstance(e, urllib.error.HTTPError)
                    and e.code < 500
                    or (isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError))
                )
                if attempt == retries or lasting:
                    raise RustchatError(
                        f"could not download {url} ({e}); check the network or HF_ENDPOINT, or {no_data}"
                    ) from None
                time.sleep(min(30, 2**attempt))
    return out


@dataclass(frozen=True)
class Cursor:
    """Where a batch's first input token comes from: skip `skip` tokens of the stream that starts at
    document `doc` of row group `group` of file `file` (indices into this rank's ordering)."""

    file: int = 0
    group: int = 0
    doc: int = 0
    skip: int = 0
    epoch: int = 0


class DocumentSource:
    """Ordered row groups of documents from parquet shards and text/JSONL files."""

    def __init__(self, files: list[Path], text_column: str = "text"):
        if not files:
            raise RustchatError(
                f"no pretraining files: pass --data-dir with parquet/text files, allow downloads, or {OFFLINE_ROUTE}"
            )
        self.files = files
        self.text_column = text_column
        for f in files:
            if f.suffix not in SUFFIXES:
                raise TextSourceError(f"{f}: unsupported file type (use {', '.join(sorted(SUFFIXES))})")

    @classmethod
    def from_paths(cls, paths, text_column: str = "text") -> "DocumentSource":
        return cls(list_files(paths), text_column)

    def num_groups(self, path: Path) -> int:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).num_row_groups
        return sum(1 for _ in self.groups(path))

    def read_group(self, file: int, group: int) -> list[str]:
        """The documents of one row group (to rebuild a packer's buffer on resume)."""
        for i, docs in enumerate(self.groups(self.files[file])):
            if i == group:
                return docs
        raise RustchatError(
            f"{self.files[file]} has no row group {group}: the pretraining files changed since "
            "the checkpoint was written"
        )

    def groups(self, path: Path) -> Iterator[list[str]]:
        if path.suffix == ".parquet":
            yield from parquet_texts(path, self.text_column)
            return
        docs: list[str] = []
        it = jsonl_docs(path, self.text_column, [0]) if path.suffix == ".jsonl" else text_file_docs(path, [0])
        for doc in it:
            docs.append(doc)
            if len(docs) == DOCS_PER_TEXT_GROUP:
                yield docs
                docs = []
        if docs:
            yield docs


class PretrainLoader:
    """Iterates (inputs int64 [B, T], targets int64 [B, T]) forever (epochs wrap); `state()` is
    where the next batch starts, `state=` resumes there.

    Tokenization runs in a background thread (the Rust encoder releases the GIL), a few row
    groups ahead of the consumer. `device` moves batches there (pinned, non-blocking on CUDA).
    """

    def __init__(
        self,
        tok,
        source: DocumentSource,
        batch_size: int,
        seq_len: int,
        *,
        device="cpu",
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        prefetch_groups: int = 4,
    ):
        self.B = check_count("batch_size", batch_size, 1, MAX_ROWS)
        self.T = check_count("seq_len", seq_len, 1, MAX_SEQ_LEN)
        # the producer's queue: at most this many tokenized row groups wait (0 would be unbounded)
        self.prefetch = check_count("prefetch_groups", prefetch_groups, 1, MAX_PREFETCH)
        self.tok, self.source = tok, source
        self.device = device
        self.rank, self.world = rank, world_size
        self.start = Cursor(**state) if state else Cursor()
        self._next = self.start
        self.bos = tok.bos_token_id

    def _encoded_groups(self, start: Cursor, stop: threading.Event, out: queue.Queue) -> None:
        """Producer: (file, group, first_doc, ids, doc_offsets) for this rank's groups, from start."""
        try:
            epoch = start.epoch
            first = True
            while not stop.is_set():
                gidx = 0
                for fi, path in enumerate(self.source.files):
                    if first and fi < start.file:
                        # Count the skipped file's groups so the rank split stays aligned.
                        gidx += self.source.num_groups(path)
                        continue
                    for gi, docs in enumerate(self.source.groups(path)):
                        mine = gidx % self.world == self.rank
                        gidx += 1
                        if not mine or (first and fi == start.file and gi < start.group):
                            continue
                        d0 = start.doc if (first and fi == start.file and gi == start.group) else 0
                        ids, offs = self.tok.encode_batch_numpy(docs[d0:], prepend=self.bos)
                        while not stop.is_set():
                            try:
                                out.put((epoch, fi, gi, d0, ids, offs), timeout=0.5)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                first = False
                epoch += 1
                if gidx == 0 or gidx <= self.rank:
                    raise RustchatError("the pretraining files hold no documents for this rank")
        except BaseException as e:  # delivered to the consumer
            out.put(e)

    def state(self) -> dict:
        """Where the next batch starts (JSON-able)."""
        return asdict(self._next)

    @staticmethod
    def reshard(states: list[dict], world: int) -> list[dict]:
        """The cursors of a run on len(states) ranks -> cursors for `world` ranks (a resume on
        another number of processes). Ranks own row groups by index, so every new rank starts
        after the furthest group any old rank had begun: no document is trained twice; the
        rest of the groups in flight (at most one per old rank) is skipped."""
        last = max((Cursor(**s) for s in states), key=lambda c: (c.epoch, c.file, c.group))
        return [asdict(Cursor(last.file, last.group + 1, 0, 0, last.epoch)) for _ in range(world)]

    def _start_producer(self) -> tuple[threading.Thread, threading.Event, queue.Queue]:
        """The tokenizing thread from `self.start`, its stop event and the queue it fills;
        `_stop_producer` ends it."""
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        thread = threading.Thread(target=self._encoded_groups, args=(self.start, stop, q), daemon=True)
        thread.start()
        return thread, stop, q

    @staticmethod
    def _stop_producer(thread: threading.Thread, stop: threading.Event) -> None:
        """Stops the tokenizing thread and waits for it: a daemon thread still inside the Rust
        encoder when the interpreter exits aborts the process."""
        stop.set()
        thread.join(timeout=60)

    def __iter__(self):
        producer, stop, q = self._start_producer()
        need = self.B * self.T + 1
        buf: list[np.ndarray] = []  # pending stream pieces, fewer than `need` tokens in all
        buf_len = 0
        head: Cursor | None = None  # where the first token of `buf` comes from
        first_skip = self.start.skip
        pin = str(self.device).startswith("cuda")
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                epoch, fi, gi, d0, full, offs = item
                used = full[first_skip:] if first_skip else full
                if head is None:
                    head = Cursor(fi, gi, d0, first_skip, epoch)
                first_skip = 0
                buf.append(used)
                buf_len += len(used)
                while buf_len >= need:
                    stream = np.concatenate(buf) if len(buf) > 1 else buf[0]
                    batch = stream[:need].astype(np.int64)
                    # The last target is the next batch's first input.
                    rest = stream[need - 1 :]
                    buf, buf_len = [rest], len(rest)
                    # buf held < need tokens before this group arrived, so what is left lies
                    # inside this group: locate its first token's document.
                    pos = len(full) - buf_len
                    k = int(np.searchsorted(offs, pos, side="right")) - 1
                    head = Cursor(fi, gi, d0 + k, pos - int(offs[k]), epoch)
                    x = torch.from_numpy(batch[:-1].reshape(self.B, self.T))
                    y = torch.from_numpy(batch[1:].reshape(self.B, self.T))
                    self._next = head
                    yield self._deliver(x, y, pin)
        finally:
            self._stop_producer(producer, stop)

    def _deliver(self, x: torch.Tensor, y: torch.Tensor, pin: bool):
        """The batch on the loader's device (pinned and non-blocking on CUDA)."""
        if pin:
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        if str(self.device) != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y
