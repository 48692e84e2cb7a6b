"""Causal attention with an optional sliding window (docs/design.md, "Model"), by the fastest
backend the device allows: FlashAttention-3 on CUDA when the `kernels` package can load it and
activations are bf16, else PyTorch SDPA with the window (and packed documents) as a mask, or a
flex-attention block mask on CUDA. On the CPU, training attention runs SDPA in query tiles
(`masked`). The backend is resolved once per process (`backend_name`),
so a run never switches mid-way and the stage banner can say which it uses.

A window w lets the query at position i see keys at positions i-w..i (w+1 keys); None: all of
0..i. Tensors are [B, H, T, D] (SDPA's layout) unless a function says otherwise.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.nn.functional as F

from .common import RustchatError

# FlashAttention-3 builds on the kernels hub: the Hopper build, and the community one for
# Ampere/Ada (it has none for Blackwell yet)
_FA3_HOPPER = "varunneal/flash-attention-3"
_FA3_OTHER = "kernels-community/flash-attn3"
# kernels >= 0.15 refuses a hub kernel without a version or a revision: major version 1 first,
# then the repository's main branch, which is what kernels < 0.12 (and nanochat 92d63d4 with it)
# loaded when none was named
_FA3_VERSION = 1
# RUSTCHAT_ATTENTION=sdpa forces the SDPA path (comparisons, debugging); fa3 demands FA3
_ENV = "RUSTCHAT_ATTENTION"

_STATE = {"fa3": None, "fa3_tried": False, "fa3_error": None, "flex": None, "flex_failed": False}


def _one_line(e: Exception, limit: int = 240) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fetch_fa3(name: str):
    """The kernel `name` from the `kernels` package, as its installed version asks to be called.
    Newer kernels (0.19 here) also check the publisher's trust on the hub, and varunneal is not
    one of its trusted organisations: `name` alone is allow-listed. Without a network, kernels' own
    LOCAL_KERNELS="<name>=<build dir>" or HF_HUB_OFFLINE=1 with a cached build load it."""
    from kernels import get_kernel  # optional (PyPI `kernels`); heavy, CUDA only

    params = inspect.signature(get_kernel).parameters
    trust = {"trust_remote_code": [name]} if "trust_remote_code" in params else {}
    if "version" not in params:  # kernels < 0.12: the main branch, implicitly
        return get_kernel(name, **trust)
    try:
        return get_kernel(name, version=_FA3_VERSION, **trust)
    except Exception as by_version:  # noqa: BLE001 - try the main branch before giving up
        try:
            return get_kernel(name, revision="main", **trust)
        except Exception as by_main:  # noqa: BLE001
            raise RuntimeError(
                f"{name} version {_FA3_VERSION}: {_one_line(by_version, 160)}; main: {_one_line(by_main, 160)}"
            ) from by_main


def _load_fa3():
    """FA3's interface module, or None (no CUDA, no `kernels` package, no build for this GPU);
    why it is None stays in _STATE["fa3_error"] for the banner."""
    if _STATE["fa3_tried"]:
        return _STATE["fa3"]
    _STATE["fa3_tried"] = True
    if os.environ.get(_ENV, "auto") == "sdpa" or not torch.cuda.is_available():
        return None
    try:
        major, _ = torch.cuda.get_device_capability()
        _STATE["fa3"] = _fetch_fa3(_FA3_HOPPER if major == 9 else _FA3_OTHER).flash_attn_interface
    except Exception as e:  # noqa: BLE001 - missing package, no network, no build: all mean "no FA3"
        _STATE["fa3_error"] = _one_line(e, 400)
        if os.environ.get(_ENV) == "fa3":
            raise RustchatError(f"{_ENV}=fa3 but FlashAttention-3 cannot be loaded: {_STATE['fa3_error']}") from e
        _STATE["fa3"] = None
    return _STATE["fa3"]


def backend_name(device) -> str:
    """What training attention runs on `device`, for the banner."""
    device = torch.device(device)
    if device.type == "cuda":
        if _load_fa3() is not None:
            return "flash-attention-3 (bf16; SDPA for packed rows and the KV cache)"
        why = f"; FA3 not loaded: {_STATE['fa3_error']}" if _STATE["fa3_error"] else ""
        return f"sdpa (windows as masks, flex block masks for packed rows{why})"
    return f"sdpa (windows as masks, in query tiles of {CPU_QUERY_TILE})"


def fa3_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype == torch.bfloat16 and _load_fa3() is not None


def fa3_causal(q, k, v, window: int | None):
    """FA3 over [B, T, H, D] tensors (its native layout), GQA handled by the kernel."""
    out = _load_fa3().flash_attn_func(q, k, v, causal=True, window_size=(-1 if window is None else window, 0))
    return out[0] if isinstance(out, tuple) else out  # some builds also return the softmax LSE


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool mask (True = attend) of queries at q_pos [..., Tq] over keys at k_pos [Tk]:
    causal, and within `window`; shape [..., Tq, Tk]."""
    d = q_pos[..., :, None] - k_pos
    ok = d >= 0
    if window is not None:
        ok = ok & (d <= window)
    return ok


# SDPA on the CPU scores every (query, key) pair, whatever a mask hides, and its is_causal kernel
# gains little from the triangle at these lengths. Training on the CPU therefore cuts the queries
# into tiles of CPU_QUERY_TILE, each over only the keys its queries may see (docs/benchmarks.md,
# "Attention in tiles, in the code"): the same sums up to rounding, about half the work at T=512.
CPU_QUERY_TILE = 128


def in_tiles(device: torch.device, T: int) -> bool:
    """Whether attention of T queries on `device` runs in query tiles: on the CPU, beyond one tile."""
    return device.type == "cpu" and T > CPU_QUERY_TILE


def query_tiles(mask: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(first query, end query, first key, end key) of each query tile under mask [..., Tq, Tk]
    (True = attend): every key a query of the tile may see, in any row or head, lies in
    [first key, end key). A tile whose queries see nothing keeps every key, so it computes what
    one SDPA call would (NaN rows)."""
    Tq, Tk = mask.shape[-2:]
    rows = mask.reshape(-1, Tq, Tk)
    tiles = []
    for start in range(0, Tq, CPU_QUERY_TILE):
        end = min(start + CPU_QUERY_TILE, Tq)
        seen = rows[:, start:end].any(dim=1).any(dim=0).nonzero()
        first, last = (int(seen[0]), int(seen[-1]) + 1) if seen.numel() else (0, Tk)
        tiles.append((start, end, first, last))
    return tiles


def masked(q, k, v, mask: torch.Tensor, gqa: bool, tiles: list | None = None):
    """SDPA of q [B, H, Tq, D] over k, v [B, H, Tk, D] under the bool mask [..., Tq, Tk]; on the CPU
    in query tiles (`tiles` from query_tiles(mask), computed here when not given)."""
    if not in_tiles(q.device, q.size(2)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask[..., s:e, lo:hi], enable_gqa=gqa
        )
        for s, e, lo, hi in (tiles if tiles is not None else query_tiles(mask))
    ]
    return torch.cat(parts, dim=2)


def causal(q, k, v, window: int | None, gqa: bool):
    """Queries 0..T-1 over keys 0..T-1 (no cache, one document per row)."""
    T = q.size(2)
    full = window is None or window >= T - 1
    if full and not in_tiles(q.device, T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    pos = torch.arange(T, device=q.device)
    return masked(q, k, v, window_mask(pos, pos, None if full else window), gqa)


def cached(
    q, k, v, window: int | None, gqa: bool, q_pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
):
    """New queries over a KV cache's keys 0..Tk-1. Without q_pos the queries are the last T
    positions (every row holds Tk keys); with q_pos [B, T] (rows of different lengths) each row's
    attn_mask [B, 1, T, Tk] says which keys it holds, and the window is cut from its positions."""
    T, Tk = q.size(2), k.size(2)
    if attn_mask is not None:
        if window is not None:
            attn_mask = attn_mask & window_mask(q_pos, torch.arange(Tk, device=q.device), window)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    full = window is None or window >= Tk - 1
    if T == 1:  # one new token: its window is the last window+1 keys
        if not full:
            k, v = k[:, :, Tk - window - 1 :], v[:, :, Tk - window - 1 :]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tk == T and full:  # empty cache: plain causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    pos = torch.arange(Tk, device=q.device)
    mask = window_mask(pos[Tk - T :], pos, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------- packed rows
def _flex():
    """(compiled flex_attention, create_block_mask) on CUDA, or None when unavailable / failed."""
    if _STATE["flex_failed"]:
        return None
    if _STATE["flex"] is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # CUDA-only path
        except ImportError:
            _STATE["flex_failed"] = True
            return None
        _STATE["flex"] = (torch.compile(flex_attention, dynamic=False), create_block_mask)
    return _STATE["flex"]


def doc_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] bool: causal, same document, within the window (True = attend)."""
    pos = torch.arange(doc_ids.size(1), device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & window_mask(pos, pos, window))[:, None]


class DocAttention:
    """Per-forward attention plan for packed rows (attention stays inside each document),
    shared by all layers: one mask per distinct window, built on first use."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        self.masks: dict = {}  # window -> ("flex", block mask) | ("dense", (bool mask, its query tiles))

    def _mask(self, window):
        hit = self.masks.get(window)
        if hit is not None:
            return hit
        doc_ids = self.doc_ids
        flex = _flex() if doc_ids.is_cuda else None
        if flex is not None:
            try:
                _, create_block_mask = flex
                B, T = doc_ids.shape
                w = T if window is None else window

                def mask_mod(b, h, q_idx, kv_idx):
                    return (q_idx >= kv_idx) & (q_idx - kv_idx <= w) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

                hit = ("flex", create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device))
            except Exception as e:  # fall back to a dense mask rather than fail training
                warnings.warn(f"flex_attention block mask failed ({e!r}); using a dense SDPA mask")
                _STATE["flex_failed"] = True
        if hit is None:
            mask = doc_mask(doc_ids, window)
            # the tiles are planned once per mask: every layer with this window shares them
            hit = ("dense", (mask, query_tiles(mask) if in_tiles(mask.device, mask.size(-2)) else None))
        self.masks[window] = hit
        return hit

    def __call__(self, q, k, v, gqa: bool, window: int | None = None):
        kind, mask = self._mask(window)
        if kind == "flex":
            try:
                return _STATE["flex"][0](q, k, v, block_mask=mask, enable_gqa=gqa)
            except Exception as e:
                warnings.warn(f"flex_attention failed ({e!r}); using a dense SDPA mask")
                _STATE["flex_failed"] = True
                self.masks = {}
                kind, mask = self._mask(window)
        dense, tiles = mask
        return masked(q, k, v, dense, gqa, tiles)
