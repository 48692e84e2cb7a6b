"""Mid-training data: rendered conversations back to back, cut into fixed rows."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..common import MAX_ROWS, MAX_SEQ_LEN, check_count
from ..conversation import DEFAULT_MAX_TOKENS, render_batch

MAX_RENDER_CHUNK = 1 << 16  # conversations rendered (and held) at once


class Cursor(NamedTuple):
    """Where a stream stands: the next token is token `offset` of the rendering of
    conversation `conversation` in pass `epoch` over the data."""

    conversation: int
    offset: int
    epoch: int


class MidTrainStream:
    """Mid-train batches: rendered conversations back to back, cut into rows of seq_len+1
    tokens, every token trained (the mask is ignored). Yields (inputs int32 [B, T], targets
    int64 [B, T]): rows are consecutive, non-overlapping (T+1)-token windows of the stream,
    inputs = row[:-1], targets = row[1:]. `state()` is where the next batch starts, and a
    stream built with `state=` that dict continues exactly from there.

    `conversations`: any sequence (`__len__`, `__getitem__`). Rank r of `world_size` takes
    conversations r, r+W, r+2W, ... (wrapping into the next epoch like the reference).
    Conversations are rendered `render_chunk` at a time in Rust, each truncated to
    `max_tokens`. With `num_epochs`, the stream ends once that many passes are used up (a last
    partial batch is dropped); by default it never ends.
    """

    def __init__(
        self,
        tok,
        conversations,
        batch_size: int,
        seq_len: int,
        *,
        state: dict | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        num_epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        render_chunk: int = 256,
        num_threads: int | None = None,
    ):
        check_count("batch_size", batch_size, 1, MAX_ROWS)
        check_count("seq_len", seq_len, 1, MAX_SEQ_LEN)
        check_count("render_chunk", render_chunk, 1, MAX_RENDER_CHUNK)
        for name, v in (
            ("world_size", world_size),
            ("max_tokens", max_tokens),
            *((("num_epochs", num_epochs),) if num_epochs is not None else ()),
        ):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        n = len(conversations)
        if n == 0:
            raise ValueError("conversations is empty")
        self._tok, self._convs, self._n = tok, conversations, n
        self._b, self._t = int(batch_size), int(seq_len)
        self._max_tokens, self._num_epochs = int(max_tokens), num_epochs
        self._world, self._chunk, self._threads = int(world_size), int(render_chunk), num_threads
        c = Cursor(**state) if state else Cursor(int(rank), 0, 0)
        c = Cursor(*(int(x) for x in c))
        if not 0 <= c.conversation < n or c.offset < 0 or c.epoch < 0:
            raise ValueError(f"invalid cursor {tuple(c)} for {n} conversations")
        if c.conversation % self._world != rank % self._world and n % self._world == 0:
            raise ValueError(f"cursor conversation {c.conversation} does not belong to rank {rank} of {world_size}")
        self._next = (c.conversation, c.epoch)  # next conversation to render
        self._skip = c.offset  # tokens of it already consumed
        self._buf = np.zeros(0, np.int32)  # rendered, not yet consumed
        self._starts = np.zeros(0, np.int64)  # where each buffered conversation starts in _buf (first may be < 0)
        self._marks: list[tuple[int, int]] = []  # (conversation, epoch) of each start

    def __iter__(self):
        return self

    def state(self) -> dict:
        """Where the next batch starts (JSON-able; `state=` resumes from it)."""
        return self._cursor()._asdict()

    def _cursor(self) -> Cursor:
        if len(self._buf) == 0:
            return Cursor(self._next[0], self._skip, self._next[1])
        k = int(np.searchsorted(self._starts, 0, side="right")) - 1
        conv, epoch = self._marks[k]
        return Cursor(conv, int(-self._starts[k]), epoch)

    def _render_more(self) -> bool:
        idx, epoch = self._next
        picks = []
        while len(picks) < self._chunk and (self._num_epochs is None or epoch < self._num_epochs):
            picks.append((idx, epoch))
            idx += self._world
            if idx >= self._n:
                idx %= self._n
                epoch += 1
        if not picks:
            return False
        self._next = (idx, epoch)
        batch = render_batch(
            self._tok, [self._convs[i] for i, _ in picks], self._max_tokens, self._threads, names=[i for i, _ in picks]
        )
        ids, starts = batch.ids, batch.offsets[:-1] + len(self._buf)
        if self._skip:
            first = int(batch.lengths[0])
            if self._skip >= first:
                raise ValueError(
                    f"cursor offset {self._skip} is beyond conversation {picks[0][0]}, which renders to {first} tokens"
                )
            ids, starts = ids[self._skip :], starts - self._skip
            self._skip = 0
        self._buf = np.concatenate([self._buf, ids])
        self._starts = np.concatenate([self._starts, starts])
        self._marks.extend(picks)
        return True

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        need = self._b * (self._t + 1)
        while len(self._buf) < need:
            if not self._render_more():
                raise StopIteration
        rows = self._buf[:need].reshape(self._b, self._t + 1)
        inputs, targets = rows[:, :-1].copy(), rows[:, 1:].astype(np.int64)
        self._buf = self._buf[need:]
        self._starts = self._starts - need
        # Keep the marks from the conversation holding the next token on.
        k = max(int(np.searchsorted(self._starts, 0, side="right")) - 1, 0)
        if len(self._buf) == 0:
            k = len(self._marks)
        self._starts, self._marks = self._starts[k:], self._marks[k:]
        return inputs, targets

    def __repr__(self) -> str:
        return f"MidTrainStream(batch_size={self._b}, seq_len={self._t}, state={self.state()})"
