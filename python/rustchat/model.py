"""The GPT of docs/design.md ("Model"): pre-norm transformer, rotary + QK-norm, ReLU^2 MLP, softcapped fp32 logits.

Module names follow nanochat (transformer.wte, transformer.h.{i}.attn.c_q, ..., lm_head) so a
nanochat state dict maps onto ours by name. Rotary and the fused head+loss come from
rustchat.kernels, which picks Triton or plain-torch paths itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .common import RustchatError
from .optim import build_optimizers

SOFTCAP = 15.0
ROPE_BASE = 10000
VOCAB_PAD = 64  # pad the head/embedding rows to a multiple of this for matmul efficiency


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 65536, sequence_len: int = 2048,
                   n_kv_head: int | None = None, *, aspect_ratio: int = 64, head_dim: int = 128) -> "GPTConfig":
        """model_dim = aspect_ratio*depth (64 by default), heads of about head_dim (128) dims:
        n_head = ceil(model_dim/head_dim); n_kv_head defaults to n_head (GQA: a divisor of n_head).

        When head_dim does not split model_dim evenly (odd depths like 5, 9) the head count is
        raised to the next divisor so every head has the same (even: rotary pairs) width."""
        if depth < 1 or aspect_ratio < 1 or head_dim < 2:
            raise RustchatError(f"depth, aspect_ratio and head_dim must be >= 1, 1 and 2, got {depth}, "
                                f"{aspect_ratio}, {head_dim}")
        dim = aspect_ratio * depth
        if dim % 2:
            raise RustchatError(f"model_dim = depth x aspect_ratio = {dim} must be even (rotary turns pairs of dims)")
        n_head = max(1, math.ceil(dim / head_dim))
        while dim % n_head or (dim // n_head) % 2:
            n_head += 1
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_kv_head or n_head, n_embd=dim)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise RustchatError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise RustchatError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.head_dim % 2:
            raise RustchatError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a saved config; unknown keys (newer writers) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


class KVCache:
    """Preallocated keys/values [L, B, H_kv, T_max, D] for incremental decoding.

    `pos` is the number of cached positions; the model advances it once per forward, after
    every layer has inserted its keys/values at [pos, pos + T)."""

    # a [B, 1, T, Tk] bool mask (True = attend) for caches whose rows hold different lengths
    # (rustchat.batching.SlotKVCache sets one per forward); None: every row holds `pos` tokens
    attn_mask = None

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 num_layers: int, *, device="cpu", dtype=torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int | None = None, *, dtype=None) -> "KVCache":
        """A cache shaped for `model`; bf16 on CUDA (autocast activations), else the weights' dtype."""
        cfg = model.config
        device = model.get_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else model.lm_head.weight.dtype
        return cls(batch_size, cfg.n_kv_head, max_len or cfg.sequence_len, cfg.head_dim, cfg.n_layer,
                   device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def get_pos(self) -> int:
        return self.pos

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, other: "KVCache") -> None:
        """Copy a (usually batch-1) cache into every row of this one: prefill once, sample N."""
        L, B, H, _, D = self.k.shape
        oL, oB, oH, _, oD = other.k.shape
        if (L, H, D) != (oL, oH, oD):
            raise RustchatError("KVCache.prefill: layer/head/dim shapes differ between caches")
        if oB not in (1, B):
            raise RustchatError(f"KVCache.prefill: source batch {oB} must be 1 or {B}")
        if other.pos > self.max_len:
            raise RustchatError(f"KVCache.prefill: {other.pos} cached tokens exceed capacity {self.max_len}")
        n = other.pos
        self.k[:, :, :, :n] = other.k[:, :, :, :n]  # broadcasts batch 1 -> B
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v ([B, H_kv, T, D]) at the current position; return all keys/values so far."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_len:
            raise RustchatError(f"KV cache is full: {t1} tokens > capacity {self.max_len}")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def advance(self, n: int) -> None:
        self.pos += n


# ---------------------------------------------------------------------------
# attention masks


def _doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: causal and same document (True = attend)."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (0 at every document start), [B, T]."""
    T = doc_ids.size(1)
    ar = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - first


_FLEX = {"fn": None, "failed": False}


def _flex_attention():
    """Compiled flex_attention on CUDA, or None when unavailable / previously failed."""
    if _FLEX["failed"]:
        return None
    if _FLEX["fn"] is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # CUDA-only path
        except ImportError:
            _FLEX["failed"] = True
            return None
        _FLEX["fn"] = (torch.compile(flex_attention, dynamic=False), create_block_mask)
    return _FLEX["fn"]


class _DocAttention:
    """Per-forward attention plan for packed rows, shared by all layers (mask built once)."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        self.block_mask = None
        self.dense_mask = None
        flex = _flex_attention() if doc_ids.is_cuda else None
        if flex is not None:
            try:
                _, create_block_mask = flex
                B, T = doc_ids.shape

                def mask_mod(b, h, q_idx, kv_idx):
                    return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

                self.block_mask = create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)
            except Exception as e:  # fall back to a dense mask rather than fail training
                warnings.warn(f"flex_attention block mask failed ({e!r}); using a dense SDPA mask")
                _FLEX["failed"] = True
        if self.block_mask is None:
            self.dense_mask = _doc_mask(doc_ids)

    def __call__(self, q, k, v, enable_gqa: bool):
        if self.block_mask is not None:
            try:
                flex_attention, _ = _FLEX["fn"]
                return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=enable_gqa)
            except Exception as e:
                warnings.warn(f"flex_attention failed ({e!r}); using a dense SDPA mask")
                _FLEX["failed"] = True
                self.block_mask = None
                self.dense_mask = _doc_mask(self.doc_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask, enable_gqa=enable_gqa)


# ---------------------------------------------------------------------------
# modules


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, rope, kv_cache=None, doc_attn=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin, offset, position_ids, plain = rope
        q, k = kernels.apply_rotary(q, k, cos, sin, offset=offset, position_ids=position_ids,
                                   backend="torch" if plain else "auto")
        # QK-norm after rotary; autocast may run rms_norm in fp32, keep q, k, v in one dtype
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        gqa = self.n_head != self.n_kv_head

        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            Tk = k.size(2)
            if kv_cache.attn_mask is not None:  # rows of different lengths
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.attn_mask, enable_gqa=gqa)
            elif Tk == T:  # empty cache: plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:  # one new token sees everything cached
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # full over the cached prefix, causal within the new chunk
                prefix = Tk - T
                mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif doc_attn is not None:
            y = doc_attn(q, k, v, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache=None, doc_attn=None):
        x = x + self.attn(norm(x), rope, kv_cache, doc_attn)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, init: bool = True, use_kernels: bool = True):
        super().__init__()
        self.config = config
        # False: plain-torch rotary and materialised-logits loss (eager baseline). float64
        # weights take the kernels' torch path (the Triton kernels stop at fp32).
        self.use_kernels = use_kernels
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self._rope_cache: dict = {}  # (device, plain, dtype) -> (cos, sin, length); rebuilt on demand
        if init and self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # -- init ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        cfg = self.config
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                # 1/sqrt(fan_in), shrunk for wide-in/narrow-out maps (arXiv:2310.17813, as nanochat)
                std = fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in))
                lin.weight.normal_(0.0, std, generator=generator)
            # residual-branch outputs start at zero so every block starts as identity
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.transformer.wte.weight.normal_(0.0, 1.0, generator=generator)
        self.lm_head.weight.normal_(0.0, 0.001, generator=generator)
        # padded rows are never read by the loss or logits; keep them at zero
        self.transformer.wte.weight[cfg.vocab_size:].zero_()
        self.lm_head.weight[cfg.vocab_size:].zero_()

    # -- helpers ------------------------------------------------------------
    def get_device(self) -> torch.device:
        return self.lm_head.weight.device

    def param_groups(self) -> dict:
        """Parameters by optimizer role: Muon for block matrices, AdamW for embedding and head."""
        groups = {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "head": list(self.lm_head.parameters()),
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.transformer.wte.weight.numel()
        return n

    def estimate_flops(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * (matmul params) + attention (12 * L * H * D * T).

        Matmul params are the block matrices plus the unpadded head (the loss only multiplies
        vocab_size rows); the embedding is a lookup. Attention is counted un-masked, as nanochat."""
        cfg = self.config
        T = seq_len or cfg.sequence_len
        n_matmul = sum(p.numel() for p in self.transformer.h.parameters()) + cfg.vocab_size * cfg.n_embd
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def setup_optimizers(self, *, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                         weight_decay=0.0, lr_scale=1.0):
        return build_optimizers(self, matrix_lr=matrix_lr, embedding_lr=embedding_lr,
                                unembedding_lr=unembedding_lr, weight_decay=weight_decay, lr_scale=lr_scale)

    def _rotary(self, length: int, device: torch.device, plain: bool, dtype: torch.dtype):
        """cos/sin tables covering at least `length` positions (grown on demand, never per step)."""
        key = (device, plain, dtype)
        hit = self._rope_cache.get(key)
        if hit is None or hit[2] < length:
            n = max(length, self.config.sequence_len, 2 * hit[2] if hit else 0)
            # plain tensors even when first asked for under inference_mode (the RL rollouts):
            # training reuses them, and autograd refuses inference tensors
            with torch.inference_mode(False):
                cos, sin = kernels.rotary_tables(n, self.config.head_dim, base=ROPE_BASE, device=device, dtype=dtype)
            hit = (cos, sin, n)
            self._rope_cache[key] = hit
        return hit[0], hit[1]

    def _apply(self, fn, *args, **kwargs):
        # moving/casting the model invalidates cached rotary tables
        self._rope_cache = {}
        return super()._apply(fn, *args, **kwargs)

    # -- forward ------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, loss_reduction: str = "mean",
                kv_cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None):
        """Loss (with targets; -1 = ignored) or fp32 softcapped logits [B, T, vocab_size].

        doc_ids [B, T]: packed rows, attention stays inside each document; position_ids [B, T]
        (rotary positions) default to each token's position inside its document. kv_cache:
        rotary positions start at the cache length and the cache advances by T.
        loss_reduction: 'mean' over trained tokens (0, not NaN, if none), 'sum', or 'none'
        ([B, T], 0 at ignored targets)."""
        B, T = idx.shape
        cfg = self.config
        if kv_cache is not None and doc_ids is not None:
            raise RustchatError("doc_ids (packed rows) cannot be combined with a KV cache")
        offset = kv_cache.pos if kv_cache is not None else 0
        f64 = self.lm_head.weight.dtype == torch.float64
        plain = f64 or not self.use_kernels
        # position_ids restart per document, so they never exceed T; offsets come from the cache
        cos, sin = self._rotary(offset + T, idx.device, plain, torch.float64 if f64 else torch.float32)
        doc_attn = None
        if doc_ids is not None:
            if position_ids is None:
                position_ids = positions_from_doc_ids(doc_ids)
            doc_attn = _DocAttention(doc_ids)
        # explicit positions with a cache: the caller's (rows of different lengths, rustchat.batching)
        rope = (cos, sin, offset if position_ids is None else 0, position_ids, plain)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, doc_attn)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        head = self.lm_head.weight  # padded rows never reach logits or loss:
        if head.size(0) != cfg.vocab_size:
            head = head[: cfg.vocab_size]
        if targets is not None:
            if not self.use_kernels:  # eager baseline: materialised logits, plain-torch loss
                return kernels.cross_entropy(F.linear(x, head), targets, ignore_index=-1, softcap=SOFTCAP,
                                            reduction=loss_reduction, backend="torch")
            dev = idx.device.type
            if torch.is_autocast_enabled(dev):  # a custom autograd op is not autocast: cast here
                dt = torch.get_autocast_dtype(dev)
                x, head = x.to(dt), head.to(dt)
            elif x.dtype != head.dtype:
                x = x.to(head.dtype)
            return kernels.linear_cross_entropy(x, head, targets, ignore_index=-1, softcap=SOFTCAP,
                                               reduction=loss_reduction, backend="torch" if f64 else "auto")
        logits = F.linear(x, head)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        return SOFTCAP * torch.tanh(logits / SOFTCAP)
