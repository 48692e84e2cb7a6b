"""Conversations to training rows: rendering (ids + mask), SFT collation and packing. The work is done by the Rust core (`rustchat._core`); this module checks
arguments and wraps the flat buffers it returns as numpy arrays (no Python object per token).

Rendering follows docs/design.md, "Conversation rendering". A conversation is `{"messages": [...]}` or a
list of messages; `mask` is 1 where the token is a trained target.

Training rows (collation and packing): a conversation of n ids gives n-1 positions, with
inputs ids[:-1] and targets ids[1:], a target being -1 where mask[1:] is 0 and at padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _core

DEFAULT_MAX_TOKENS = 2048


def _core_of(tok):
    return getattr(tok, "_core", tok)


def _check_max_tokens(max_tokens):
    if max_tokens is not None and (
        not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise ValueError(f"max_tokens must be a non-negative int or None, got {max_tokens!r}")
    return None if max_tokens is None else int(max_tokens)


@dataclass(frozen=True)
class RenderedBatch:
    """Rendered conversations, flattened: conversation i is ids[offsets[i]:offsets[i+1]]
    (int32 ids, uint8 mask, int64 offsets). Indexing gives (ids, mask) views."""

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"conversation {i} out of range for {len(self)}")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def render_batch(
    tok,
    conversations,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    num_threads: int | None = None,
    *,
    completion: bool = False,
    names: Sequence[int] | None = None,
) -> RenderedBatch:
    """Renders many conversations in parallel (GIL released) into one flat `RenderedBatch`.

    With `completion`, each is rendered as `render_for_completion` does (the final
    `<|assistant_start|>` has mask 0), without truncation unless `max_tokens` is given. Errors
    are ValueErrors naming the conversation (its position, or `names[position]`) and message.
    """
    if isinstance(conversations, dict):
        raise TypeError("conversations must be a list of conversations, not a single conversation")
    convs = conversations if isinstance(conversations, list) else list(conversations)
    names = None if names is None else [int(n) for n in names]
    ids, mask, offs = _core.render_conversations(
        _core_of(tok), convs, _check_max_tokens(max_tokens), num_threads, completion, names, False
    )
    return RenderedBatch(np.frombuffer(ids, "<i4"), np.frombuffer(mask, np.uint8), np.frombuffer(offs, "<i8"))


def render_conversation(
    tok, conversation, max_tokens: int | None = DEFAULT_MAX_TOKENS
) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (ids int32, mask uint8), truncated to `max_tokens` (None: never)."""
    ids, mask, _ = _core.render_conversations(
        _core_of(tok), [conversation], _check_max_tokens(max_tokens), None, False, None, True
    )
    # one conversation: writable copies (torch.as_tensor warns on a read-only array)
    return np.frombuffer(bytearray(ids), "<i4"), np.frombuffer(bytearray(mask), np.uint8)


def render_conversations(
    tok, conversations, max_tokens: int | None = DEFAULT_MAX_TOKENS, num_threads: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Many conversations -> list of (ids, mask) pairs, read-only views into one flat
    buffer (use `render_batch` for the flat arrays themselves)."""
    return list(render_batch(tok, conversations, max_tokens, num_threads))


def render_for_completion(tok, conversation, max_tokens: int | None = None) -> np.ndarray:
    """The prompt for generating the last (assistant) message: the conversation without it,
    then `<|assistant_start|>`. int32 ids; no truncation unless `max_tokens` is given."""
    ids, _, _ = _core.render_conversations(
        _core_of(tok), [conversation], _check_max_tokens(max_tokens), None, True, None, True
    )
    return np.frombuffer(bytearray(ids), "<i4")  # writable, so torch.as_tensor(prompt) does not warn


# ------------------------------------------------------------------ rows for training
def _flatten(rows) -> tuple[bytes, bytes, bytes]:
    """(ids, mask) pairs or a RenderedBatch -> (u32 ids, u8 mask, i64 offsets) buffers."""
    if isinstance(rows, RenderedBatch):
        return (
            rows.ids.astype("<u4", copy=False).tobytes(),
            rows.mask.tobytes(),
            rows.offsets.astype("<i8", copy=False).tobytes(),
        )
    ids_list, mask_list, lens = [], [], [0]
    for i, row in enumerate(rows):
        try:
            ids, mask = row
        except (TypeError, ValueError):
            raise ValueError(f"rows[{i}] must be an (ids, mask) pair") from None
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 1 or mask.ndim != 1 or len(ids) != len(mask):
            raise ValueError(
                f"rows[{i}]: ids and mask must be 1-D of equal length, got shapes {ids.shape} and {mask.shape}"
            )
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"rows[{i}]: ids must be integers, got dtype {ids.dtype}")
        ids_list.append(ids)
        mask_list.append(mask)
        lens.append(len(ids))
    if len(lens) == 1:
        return b"", b"", np.zeros(1, "<i8").tobytes()
    ids = np.concatenate(ids_list).astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() > 0x7FFFFFFF):
        offs = np.cumsum(lens)
        bad = int(np.argmax((ids < 0) | (ids > 0x7FFFFFFF)))
        raise ValueError(
            f"rows[{int(np.searchsorted(offs, bad, side='right')) - 1}]: ids must be integers in [0, 2**31)"
        )
    mask = np.concatenate(mask_list) != 0
    return ids.astype("<u4").tobytes(), mask.astype(np.uint8).tobytes(), np.cumsum(lens, dtype="<i8").tobytes()


def _check_id(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v <= 0x7FFFFFFF:
        raise ValueError(f"{name} must be a token id (int in [0, 2**31)), got {v!r}")
    return int(v)


def _check_len(name, v, minimum):
    if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum):
        raise ValueError(f"{name} must be an int >= {minimum} or None, got {v!r}")
    return None if v is None else int(v)


def collate_sft(rows, pad_id: int, *, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SFT batch from (ids, mask) pairs (or a RenderedBatch), padded to the longest.

    Returns (writable) inputs int32 [B, L] (padded with `pad_id`, the `<|assistant_end|>` id in the
    reference) and targets int64 [B, L] (-1 where not trained or padding), L = longest - 1.
    With `max_len`, L is at most max_len - 1 and a longer conversation keeps its first
    `max_len` ids (its later targets are dropped).
    """
    pad_id = _check_id("pad_id", pad_id)
    max_len = _check_len("max_len", max_len, 1)
    ids, mask, offs = _flatten(rows)
    if len(offs) == 8:
        raise ValueError("rows is empty")
    inputs, targets, b, l = _core.collate_sft(ids, mask, offs, pad_id, max_len)
    return np.frombuffer(inputs, "<i4").reshape(b, l), np.frombuffer(targets, "<i8").reshape(b, l)


@dataclass(frozen=True)
class PackedBatch:
    """Conversations packed side by side into rows of `row_len` positions (writable arrays).

    inputs int32 [R, T]; targets int64 [R, T] (-1: not trained or padding); position_ids
    int32 [R, T] restart at 0 in each segment; doc_ids int32 [R, T] number the segments over
    the whole batch. A segment is one conversation (or piece of one) or the padding at the end
    of a row; it never crosses rows. cu_seqlens int32 [S+1] bound the segments in the
    flattened batch (flash-attention varlen: attend within [cu[s], cu[s+1]) only);
    max_seqlen is the longest segment. seg_conv int32 [S]: index of the source conversation
    (-1 for padding); seg_start int32 [S]: index in its ids of the segment's first input.
    leftover int64: conversations not placed because `max_rows` rows were full.
    dropped_targets: trained targets lost to long="truncate".
    """

    inputs: np.ndarray
    targets: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    seg_conv: np.ndarray
    seg_start: np.ndarray
    leftover: np.ndarray
    dropped_targets: int

    @property
    def padding_fraction(self) -> float:
        """Share of positions that are padding."""
        pad = self.seg_conv < 0
        n = self.inputs.size
        return float(np.diff(self.cu_seqlens)[pad].sum() / n) if n else 0.0


def pack_rows(
    rows,
    row_len: int,
    *,
    pad_id: int = 0,
    policy: str = "best_fit",
    long: str = "truncate",
    max_rows: int | None = None,
) -> PackedBatch:
    """Packs whole conversations ((ids, mask) pairs or a RenderedBatch) into rows of
    `row_len` positions, so attention and positions never cross conversations.

    policy: "best_fit" (longest first, each into the fullest row it fits: best-fit decreasing)
    or "next_fit" (in order; the current row, else a new one).
    long: a conversation with more than row_len positions (row_len+1 ids) is
    "truncate"d to its first row_len positions (`dropped_targets` counts the trained targets
    lost), or "split" into pieces of row_len positions (the last shorter), each its own
    segment with positions from 0: no target is lost, but a piece does not see the context of
    the pieces before it.
    max_rows: return exactly this many rows; conversations that do not fit are listed in
    `leftover` (a split conversation is placed whole or not at all). Default: as many rows as
    needed. Conversations of fewer than 2 ids have no position and are skipped.
    """
    row_len = _check_len("row_len", row_len, 1)
    if row_len is None:
        raise ValueError("row_len must be an int >= 1")
    max_rows = _check_len("max_rows", max_rows, 0)
    pad_id = _check_id("pad_id", pad_id)
    ids, mask, offs = _flatten(rows)
    d = _core.pack_rows(ids, mask, offs, row_len, pad_id, policy, long, max_rows)
    shape = (d["rows"], row_len)
    return PackedBatch(
        inputs=np.frombuffer(d["inputs"], "<i4").reshape(shape),
        targets=np.frombuffer(d["targets"], "<i8").reshape(shape),
        position_ids=np.frombuffer(d["position_ids"], "<i4").reshape(shape),
        doc_ids=np.frombuffer(d["doc_ids"], "<i4").reshape(shape),
        cu_seqlens=np.frombuffer(d["cu_seqlens"], "<i4"),
        max_seqlen=d["max_seqlen"],
        seg_conv=np.frombuffer(d["seg_conv"], "<i4"),
        seg_start=np.frombuffer(d["seg_start"], "<i4"),
        leftover=np.frombuffer(d["leftover"], "<i8"),
        dropped_targets=d["dropped_targets"],
    )
