"""Bits per byte: the one validation number of a base model.

The token set is defined once: the validation files' documents, each prefixed with <|bos|>,
encoded and concatenated, cut after `max_tokens` + 1 tokens into rows of the model's context
(a row's targets are its inputs shifted by one), scored BPB_BATCH_ROWS rows at a time. Bits per
byte = summed nats over the targets' bytes / (ln 2 * those bytes); special tokens have 0 bytes
and count in neither sum, so the number compares across tokenizers.

Training's in-loop evaluation of `rustchat base`, `rustchat eval -i base`, report.md and the
speedrun's table all call `bits_per_byte` here, so for the same checkpoint, files and token
count they print the same value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .common import MAX_SCORED_TOKENS, RustchatError, check_count
from .data.pretrain import DocumentSource
from .runtime import autocast_ctx, get_rank, get_world_size
from .trainer import all_reduce_sum

BPB_BATCH_ROWS = 8  # rows per forward: fixed, so the number does not depend on a batch flag


def val_token_stream(tok, files, max_tokens: int) -> np.ndarray:
    """The first max_tokens + 1 tokens of the <|bos|>-prefixed documents of `files` (max_tokens
    at most MAX_SCORED_TOKENS: they are held in memory)."""
    check_count("max_tokens", max_tokens, 1, MAX_SCORED_TOKENS)
    src = DocumentSource(list(files))
    pieces, have = [], 0
    for f in src.files:
        for docs in src.groups(f):
            ids, _ = tok.encode_batch_numpy(docs, prepend=tok.bos_token_id)
            pieces.append(ids)
            have += len(ids)
            if have > max_tokens:
                break
        if have > max_tokens:
            break
    stream = np.concatenate(pieces)[: max_tokens + 1] if pieces else np.zeros(0, np.int32)
    if len(stream) < 2:
        raise RustchatError(f"validation text in {', '.join(map(str, files))} holds fewer than 2 tokens")
    return stream


def bits_per_byte(model, tok, stream: np.ndarray) -> tuple[float, int]:
    """(bits per byte, tokens scored) of `model` on a `val_token_stream`. Under torchrun the
    rows are shared out between ranks and the sums gathered: every rank returns the same value."""
    T = min(model.config.sequence_len, len(stream) - 1)
    n_rows = (len(stream) - 1) // T
    device = model.get_device()
    token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64, device=device)
    rank, world = get_rank(), get_world_size()
    nats = nbytes = 0.0
    batches = list(range(0, n_rows, BPB_BATCH_ROWS))
    for r0 in batches[rank::world]:
        r1 = min(r0 + BPB_BATCH_ROWS, n_rows)
        chunk = torch.as_tensor(stream[r0 * T : r1 * T + 1].astype(np.int64))
        x = torch.stack([chunk[r * T : (r + 1) * T] for r in range(r1 - r0)]).to(device)
        y = torch.stack([chunk[r * T + 1 : (r + 1) * T + 1] for r in range(r1 - r0)]).to(device)
        with torch.inference_mode(), autocast_ctx(device):
            loss = model(x, y, loss_reduction="none").float()
        b = token_bytes[y]
        nats += float((loss * (b > 0)).sum(dtype=torch.float64))
        nbytes += float(b.sum())
    nats, nbytes = all_reduce_sum(nats, device), all_reduce_sum(nbytes, device)
    return nats / (math.log(2) * max(nbytes, 1.0)), n_rows * T
