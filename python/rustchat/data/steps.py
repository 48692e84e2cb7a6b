"""Optimizer steps of data: each step is this rank's list of micro-batches.

Both classes follow the package's cursor protocol (`state()`, `state=`); see `rustchat.data`.
"""

from __future__ import annotations

import numpy as np

from ..common import MAX_BATCH_CONVERSATIONS, MAX_ROWS, MAX_SEQ_LEN, check_count
from ..conversation import collate_sft, pack_rows, render_batch


class StreamSteps:
    """base / mid: every token trained; a step is `grad_accum` consecutive batches of a loader
    (a `PretrainLoader` or `MidTrainStream`, itself resumed from the saved state)."""

    def __init__(self, loader, grad_accum: int):
        self.loader = loader
        self.it = iter(loader)
        self.grad_accum = grad_accum

    def next_step(self) -> list:
        return [next(self.it) for _ in range(self.grad_accum)]

    def state(self) -> dict:
        """Where the next step's data starts."""
        return self.loader.state()


class SFTSteps:
    """SFT: a fixed global batch of `examples_per_step` conversations per step, rank r taking
    every world-th one, rendered by the Rust core and collated (or packed) per micro-batch.
    The order is a fresh permutation per epoch, seeded by `seed + epoch`."""

    def __init__(
        self,
        tok,
        conversations,
        examples_per_step: int,
        device_batch_size: int,
        seq_len: int,
        rank: int,
        world: int,
        seed: int,
        state: dict | None = None,
        pack: bool = False,
    ):
        self.tok, self.convs = tok, conversations
        self.E = check_count("examples_per_step", examples_per_step, 1, MAX_BATCH_CONVERSATIONS)
        self.B = check_count("device_batch_size", device_batch_size, 1, MAX_ROWS)
        self.T = check_count("seq_len", seq_len, 1, MAX_SEQ_LEN)
        self.rank, self.world = rank, world
        self.pack = pack
        self.pad_id = tok.encode_special("<|assistant_end|>")
        self.seed = seed
        st = state or {}
        self.pos = int(st.get("pos", 0))
        self.epoch = int(st.get("epoch", 0))
        self._order = None
        self._order_epoch = None

    def _perm(self):
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.convs))
            self._order_epoch = self.epoch
        return self._order

    def next_step(self) -> list:
        idx = []
        while len(idx) < self.E:
            order = self._perm()
            take = min(self.E - len(idx), len(order) - self.pos)
            idx.extend(order[self.pos : self.pos + take].tolist())
            self.pos += take
            if self.pos >= len(order):
                self.pos, self.epoch = 0, self.epoch + 1
        mine = idx[self.rank :: self.world]
        rows = render_batch(self.tok, [self.convs[i] for i in mine], max_tokens=self.T + 1)
        out = []
        for s in range(0, len(rows), self.B):
            part = [rows[j] for j in range(s, min(s + self.B, len(rows)))]
            if self.pack:
                pb = pack_rows(part, self.T, pad_id=self.pad_id)
                out.append((pb.inputs, pb.targets, pb.doc_ids))
            else:
                out.append(collate_sft(part, self.pad_id, max_len=self.T + 1))
        return out

    def state(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch}
