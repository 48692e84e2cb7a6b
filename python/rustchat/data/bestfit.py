"""BOS-aligned best-fit pretraining batches (the 2026 rules' loader: nanochat's at 92d63d4).

Every row of a batch starts at a document's `<|bos|>`, so no token sees the tail of an
unrelated document before its own start. Documents wait in a buffer of about BUFFER_DOCS;
each row takes the largest buffered document that fits the space left, and when none fits the
shortest one is cropped to fill the row exactly (its rest is dropped). Rows are never padded:
every position is trained, at the price of the cropped tokens (`crop_share`). The packing runs
in the Rust core (`BestFitPacker`); the documents come from the same tokenizing thread and
rank split as `PretrainLoader`'s stream.

Exact resume: the packer's buffer is refilled REFILL_DOCS documents at a time, always from a
multiple of REFILL_DOCS within a row group, so the state at a batch boundary is the cursor of
the next document to feed plus the positions (file, group, document) of the buffered ones;
`state=` re-reads and re-encodes those documents in their buffer order, and the rows that
follow are the same as without the interruption.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .._core import BestFitPacker
from ..common import RustchatError
from .pretrain import Cursor, PretrainLoader

PACKING = "bos_bestfit"
BUFFER_DOCS = 1000  # documents buffered before each placement (nanochat 92d63d4's)
REFILL_DOCS = 128  # documents fed at a time (nanochat 92d63d4's tokenizer batch)


class BestFitLoader(PretrainLoader):
    """(inputs int64 [B, T], targets int64 [B, T]) forever, every row starting at a BOS;
    `state()` / `state=` as every loader of the package."""

    def __init__(
        self,
        tok,
        source,
        batch_size: int,
        seq_len: int,
        *,
        state: dict | None = None,
        buffer_docs: int = BUFFER_DOCS,
        refill_docs: int = REFILL_DOCS,
        **kw,
    ):
        if not 1 <= buffer_docs <= 1_000_000 or not 1 <= refill_docs <= 1_000_000:
            raise ValueError(f"buffer_docs and refill_docs must be in 1..1e6, got {buffer_docs}, {refill_docs}")
        st = dict(state or {})
        if st and st.pop("packing", None) != PACKING:
            raise RustchatError(
                "the checkpoint's data cursor is a plain token stream's, not a best-fit packer's: "
                "resume it with the rules it was started with (--rules classic)"
            )
        self._resume_buffer = [(f, g, d) for f, g, docs in st.pop("buffer", []) for d in docs]
        super().__init__(tok, source, batch_size, seq_len, state=st or None, **kw)
        self.buffer_docs, self.refill_docs = buffer_docs, refill_docs
        self._state = self._pack_state(self.start, self._resume_buffer)
        self.placed_tokens = 0
        self.cropped_tokens = 0

    @staticmethod
    def _pack_state(cursor: Cursor, buffered: list[tuple[int, int, int]]) -> dict:
        # the buffered documents, one entry per run of the same row group: [file, group, [docs]]
        runs = [[f, g, [d for _, _, d in docs]] for (f, g), docs in itertools.groupby(buffered, key=lambda r: r[:2])]
        return {"packing": PACKING, **vars(cursor), "buffer": runs}

    def state(self) -> dict:
        return {**self._state, "buffer": [list(r) for r in self._state["buffer"]]}

    @staticmethod
    def reshard(states: list[dict], world: int) -> list[dict]:
        """The cursors of a run on len(states) ranks -> cursors for `world` ranks (a resume on
        another number of processes). Ranks own row groups by index, so every new rank starts
        after the furthest group any old rank had begun, with an empty buffer: no document is
        trained twice; the old buffers and the rest of the groups in flight are skipped."""
        last = max(
            (Cursor(**{k: v for k, v in s.items() if k not in ("packing", "buffer")}) for s in states),
            key=lambda c: (c.epoch, c.file, c.group),
        )
        return [
            BestFitLoader._pack_state(Cursor(last.file, last.group + 1, 0, 0, last.epoch), []) for _ in range(world)
        ]

    def crop_share(self) -> float:
        """Share of the documents' tokens taken from the buffer that crops dropped so far."""
        total = self.placed_tokens + self.cropped_tokens
        return self.cropped_tokens / total if total else 0.0

    def __iter__(self):
        packer = BestFitPacker(self.T + 1, self.buffer_docs)
        where: dict[int, tuple[int, int, int]] = {}  # tag -> (file, group, doc) of each fed document
        next_tag = [0]

        def push(ids: np.ndarray, offs: np.ndarray, docs: list[tuple[int, int, int]]) -> None:
            first = next_tag[0]
            next_tag[0] += len(docs)
            where.update(zip(range(first, first + len(docs)), docs))
            packer.push(
                np.ascontiguousarray(ids, dtype="<u4").tobytes(),
                np.ascontiguousarray(offs - offs[0], dtype="<i8").tobytes(),
                np.arange(first, first + len(docs), dtype="<u8").tobytes(),
            )

        # a resumed run first rebuilds the buffer, in its order
        for (f, g), run in itertools.groupby(self._resume_buffer, key=lambda r: r[:2]):
            run = list(run)
            texts = self.source.read_group(f, g)
            if max(d for _, _, d in run) >= len(texts):
                raise RustchatError(
                    f"{self.source.files[f]}: row group {g} has {len(texts)} documents, the checkpoint "
                    "names more: the pretraining files changed since it was written"
                )
            ids, offs = self.tok.encode_batch_numpy([texts[d] for _, _, d in run], prepend=self.bos)
            push(ids, offs, run)

        producer, stop, q = self._start_producer()
        pin = str(self.device).startswith("cuda")
        group = None  # (epoch, file, group, first doc, ids, offsets) being fed
        fed = 0  # documents of `group` fed so far
        cursor = self.start
        try:
            while True:
                while not packer.fill(self.B):
                    if group is None or fed == len(group[5]) - 1:
                        item = q.get()
                        if isinstance(item, BaseException):
                            raise item
                        group, fed = item, 0
                        epoch, f, g, d0, _, _ = group
                        cursor = Cursor(f, g, d0, 0, epoch)
                        continue
                    epoch, f, g, d0, ids, offs = group
                    n = min(self.refill_docs, len(offs) - 1 - fed)
                    push(
                        ids[offs[fed] : offs[fed + n]],
                        offs[fed : fed + n + 1],
                        [(f, g, d0 + fed + k) for k in range(n)],
                    )
                    fed += n
                    cursor = Cursor(f, g, d0 + fed, 0, epoch)
                rows = np.frombuffer(packer.take(self.B), dtype="<u4").reshape(self.B, self.T + 1).astype(np.int64)
                buffered = [where[t] for t in packer.tags()]
                where = {t: where[t] for t in packer.tags()}
                self._state = self._pack_state(cursor, buffered)
                self.placed_tokens, self.cropped_tokens = packer.placed_tokens, packer.cropped_tokens
                x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
                yield self._deliver(x, y, pin)
        finally:
            self._stop_producer(producer, stop)
