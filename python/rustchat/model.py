"""The GPT of docs/design.md ("Model"): pre-norm transformer, rotary + QK-norm, ReLU^2 MLP, softcapped fp32 logits.

Two architectures, one model: the classic one and the 2026 one (sliding windows, value
embeddings, per-layer lambdas, smear, backout, rotary base 100k, q/k scale), whose features are
GPTConfig fields ("The 2026 architecture" in docs/design.md). Module names follow nanochat
(transformer.wte, transformer.h.{i}.attn.c_q, ..., value_embeds.{i}, resid_lambdas, lm_head) so
a nanochat state dict of either commit (48abd7d, 92d63d4) maps onto ours by name. Rotary and the fused head+loss
come from rustchat.kernels, which picks Triton or plain-torch paths itself; attention from
rustchat.attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention, kernels
from .common import RustchatError, check_window_pattern
from .optim import build_optimizers

SOFTCAP = 15.0
ROPE_BASE = 10000  # the classic rotary base (the 2026 model uses 100,000)
VOCAB_PAD = 64  # pad the head/embedding rows to a multiple of this for matmul efficiency


# The two architectures rustchat trains and loads, as values of GPTConfig's feature fields.
# "classic" is nanochat's model of January 2026 (commit 48abd7d); "2026" its model of July 2026
# (commit 92d63d4) (docs/design.md, "Model"). A saved config without the feature fields is classic.
ARCHS = {
    "classic": dict(
        window_pattern=None,
        rope_base=ROPE_BASE,
        qk_scale=1.0,
        value_embeds=False,
        layer_lambdas=False,
        smear=False,
        backout=False,
    ),
    "2026": dict(
        window_pattern="SSSL",
        rope_base=100000,
        qk_scale=1.2,
        value_embeds=True,
        layer_lambdas=True,
        smear=True,
        backout=True,
    ),
}
VE_GATE_CHANNELS = 12  # value-embedding gates read this many leading channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the token embedding
WINDOW_TILE = 128  # short windows are rounded up to a multiple of this (flash-attention's tile)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    # -- the 2026 features (defaults: classic) --
    # per-layer attention windows: a string of L (window = sequence_len) and S (a quarter of it,
    # rounded up, then up to a multiple of WINDOW_TILE) tiled over the layers, last layer L;
    # None: unlimited causal
    window_pattern: str | None = None
    rope_base: int = 10000
    qk_scale: float = 1.0  # q and k are multiplied by this after QK-norm
    value_embeds: bool = False  # per-token value embeddings on alternating layers (last included)
    layer_lambdas: bool = False  # per-layer resid_lambdas / x0_lambdas mixing in the first embedding
    smear: bool = False  # the previous token's embedding gated into each token's
    backout: bool = False  # the middle layer's residual, scaled, subtracted before the head
    # rotary cos/sin rounded to bf16, as nanochat's January-2026 model (48abd7d) keeps them (set on
    # its imports so they compute what nanochat computes); not an architecture feature
    rope_bf16: bool = False

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int = 65536,
        sequence_len: int = 2048,
        n_kv_head: int | None = None,
        *,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        arch: str = "classic",
        window_pattern: str | None = None,
    ) -> "GPTConfig":
        """model_dim = aspect_ratio*depth (64 by default), heads of about head_dim (128) dims:
        n_head = ceil(model_dim/head_dim); n_kv_head defaults to n_head (GQA: a divisor of n_head).

        When head_dim does not split model_dim evenly (odd depths like 5, 9) the head count is
        raised to the next divisor so every head has the same (even: rotary pairs) width.
        arch: a key of ARCHS; window_pattern: the 2026 model's windows instead of its default SSSL."""
        if arch not in ARCHS:
            raise RustchatError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
        feats = dict(ARCHS[arch])
        if window_pattern is not None:
            if feats["window_pattern"] is None:
                raise RustchatError(
                    f"window pattern {window_pattern!r}: the {arch} architecture has no sliding windows"
                )
            feats["window_pattern"] = window_pattern
        if depth < 1 or aspect_ratio < 1 or head_dim < 2:
            raise RustchatError(
                f"depth, aspect_ratio and head_dim must be >= 1, 1 and 2, got {depth}, {aspect_ratio}, {head_dim}"
            )
        dim = aspect_ratio * depth
        if dim % 2:
            raise RustchatError(f"model_dim = depth x aspect_ratio = {dim} must be even (rotary turns pairs of dims)")
        n_head = max(1, math.ceil(dim / head_dim))
        while dim % n_head or (dim // n_head) % 2:
            n_head += 1
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_kv_head or n_head,
            n_embd=dim,
            **feats,
        )

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise RustchatError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise RustchatError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.head_dim % 2:
            raise RustchatError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.window_pattern is not None:
            check_window_pattern(self.window_pattern)
        if not (isinstance(self.rope_base, (int, float)) and 1 < self.rope_base <= 1e9):
            raise RustchatError(f"rope_base {self.rope_base!r} must be a number in (1, 1e9]")
        if not (isinstance(self.qk_scale, (int, float)) and 0 < self.qk_scale <= 100):
            raise RustchatError(f"qk_scale {self.qk_scale!r} must be a number in (0, 100]")
        if self.value_embeds and self.n_embd < VE_GATE_CHANNELS:
            raise RustchatError(f"value embeddings need n_embd >= {VE_GATE_CHANNELS}, got {self.n_embd}")
        if self.smear and self.n_embd < SMEAR_CHANNELS:
            raise RustchatError(f"the smear gate needs n_embd >= {SMEAR_CHANNELS}, got {self.n_embd}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    @property
    def arch(self) -> str:
        """'classic', '2026', or 'custom' (some other mix of the feature fields). The window
        pattern is a knob of the 2026 model (nanochat's --window-pattern): any pattern with the
        other 2026 features is that model, "L" (full context everywhere) included."""

        def features(d: dict) -> dict:
            return {**d, "window_pattern": d["window_pattern"] is not None}

        mine = features({k: getattr(self, k) for k in ARCHS["classic"]})
        return next((name for name, feats in ARCHS.items() if features(feats) == mine), "custom")

    def window_sizes(self) -> list[int | None]:
        """Per layer: how many earlier positions a query may see (key position >= query
        position - window), or None for unlimited."""
        if self.window_pattern is None:
            return [None] * self.n_layer
        long = self.sequence_len
        short = -(-long // 4 // WINDOW_TILE) * WINDOW_TILE  # ceil(ceil(long / 4) / tile) * tile: 2048 -> 512
        pattern = self.window_pattern.upper()
        sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = long
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers, the last one always included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a saved config; unknown keys (newer writers) are ignored, missing feature
        fields keep their classic defaults."""
        kinds = {f.name: f.type for f in fields(cls)}
        out = {}
        for k, v in d.items():
            if k not in kinds:
                continue
            if k == "window_pattern":
                out[k] = None if v is None else str(v)
            elif k == "qk_scale":
                out[k] = float(v)
            elif kinds[k] in ("bool", bool):
                out[k] = bool(v)
            else:
                out[k] = int(v)
        return cls(**out)


def _bf16_rotary_tables(n: int, head_dim: int, base, device, dtype):
    """cos/sin as nanochat's January-2026 model (48abd7d) makes them: angles in fp32, rounded to bf16."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    ang = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
    return ang.cos().to(torch.bfloat16).to(dtype), ang.sin().to(torch.bfloat16).to(dtype)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


class KVCache:
    """Preallocated keys/values [L, B, H_kv, T_max, D] for incremental decoding, and the smear
    state. Every position is kept; sliding-window layers mask what is out of their window.

    `pos` is the number of cached positions; the model advances it once per forward, after
    every layer has inserted its keys/values at [pos, pos + T)."""

    # the smear gate's state: the last fed token's embedding [B, 1, C] (None until a forward)
    prev_embedding = None

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        num_layers: int,
        *,
        device="cpu",
        dtype=torch.float32,
    ):
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
        return cls(
            batch_size,
            cfg.n_kv_head,
            max_len or cfg.sequence_len,
            cfg.head_dim,
            cfg.n_layer,
            device=device,
            dtype=dtype,
        )

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
        self.prev_embedding = None

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
        prev = other.prev_embedding
        self.prev_embedding = None if prev is None else prev.expand(B, -1, -1).clone()

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

    def layer_mask(self, layer: int, window: int | None) -> tuple[torch.Tensor | None, int | None]:
        """(mask, window) for a layer's attention over the keys `insert` returned: every row
        holds `pos` positions, so no mask, and the model cuts the layer's window itself (caches
        whose rows hold different lengths, rustchat.batching.SlotKVCache, give a mask)."""
        return None, window


# ---------------------------------------------------------------------------
# attention masks


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (0 at every document start), [B, T]."""
    T = doc_ids.size(1)
    ar = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - first


# ---------------------------------------------------------------------------
# modules


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.qk_scale = config.qk_scale
        self.window = config.window_sizes()[layer_idx]
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        # per kv head, how much of the token's value embedding joins its values (0..3)
        self.ve_gate = (
            nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if config.has_value_embed(layer_idx) else None
        )

    def forward(self, x, rope, kv_cache=None, doc_attn=None, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # [B, T, H_kv]
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        cos, sin, offset, position_ids, plain = rope
        q, k = kernels.apply_rotary(
            q, k, cos, sin, offset=offset, position_ids=position_ids, backend="torch" if plain else "auto"
        )
        # QK-norm after rotary; autocast may run rms_norm in fp32, keep q, k, v in one dtype
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)
        if self.qk_scale != 1.0:  # sharper attention, the scale split between q and k
            q, k = q * self.qk_scale, k * self.qk_scale
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None and doc_attn is None and attention.fa3_usable(q):
            y = attention.fa3_causal(q, k, v, self.window)  # [B, T, H, D] in and out
            return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            # rows of different lengths (a mask set) place their queries by position_ids
            mask, window = kv_cache.layer_mask(self.layer_idx, self.window)
            y = attention.cached(q, k, v, window, gqa, q_pos=position_ids, attn_mask=mask)
        elif doc_attn is not None:
            y = doc_attn(q, k, v, gqa, self.window)
        else:
            y = attention.causal(q, k, v, self.window, gqa)

        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with its gradient 2 relu(x) dy from the one saved relu(x), which c_proj saves
    as its input anyway. Autograd of `F.relu(x).square()` reads and writes the [B, T, 4C]
    activation seven times per layer and step (pow, pow's own backward with a pow and two
    multiplies, threshold_backward); this does four. The same numbers: x*x is what pow(x, 2)
    computes, and the factor 2 is exact (docs/benchmarks.md, "relu squared by its own gradient")."""

    @staticmethod
    def forward(ctx, x):
        h = F.relu(x)
        ctx.save_for_backward(h)
        return h * h

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return (dy * h).mul_(2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(ReluSquared.apply(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, rope, kv_cache=None, doc_attn=None, ve=None):
        x = x + self.attn(norm(x), rope, kv_cache, doc_attn, ve)
        x = x + self.mlp(norm(x))
        return x


def _embedding(num: int, dim: int, init: bool) -> nn.Embedding:
    """An embedding table; without `init` left unfilled for a checkpoint to fill. nn.Embedding's
    own normal_ fill is skipped then: on the meta device, where checkpoints are checked and
    loaded, it imports torch._dynamo, seconds at the start of every command that loads a model.
    With `init` it stays, so a seed draws the same initial weights as before."""
    return nn.Embedding(num, dim) if init else nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, init: bool = True, use_kernels: bool = True):
        super().__init__()
        self.config = config
        # False: plain-torch rotary and materialised-logits loss (eager baseline). float64
        # weights take the kernels' torch path (the Triton kernels stop at fp32).
        self.use_kernels = use_kernels
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": _embedding(V, config.n_embd, init),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # the 2026 features' parameters, named as nanochat 92d63d4 names them (a checkpoint maps 1:1)
        if config.layer_lambdas:  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:  # x[t] += smear_lambda * sigmoid(smear_gate(x[t][:24])) * x[t-1]
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:  # x -= backout_lambda * (the residual after block n_layer // 2)
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict(
                {str(i): _embedding(V, kv_dim, init) for i in range(config.n_layer) if config.has_value_embed(i)}
            )
        self._rope_cache: dict = {}  # (device, plain, dtype) -> (cos, sin, length); rebuilt on demand
        if init and self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # -- init ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        cfg = self.config
        if cfg.arch == "classic":
            self._init_trunk_classic(generator)
        else:
            self._init_trunk_2026(generator)
        if cfg.layer_lambdas:
            # stronger residual and more of the first embedding in early layers
            frac = torch.arange(cfg.n_layer, dtype=torch.float64) / max(cfg.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if cfg.smear:
            self.smear_lambda.zero_()
            self.smear_gate.weight.uniform_(0.0, 0.02, generator=generator)
        if cfg.backout:
            self.backout_lambda.fill_(0.2)
        # padded rows are never read by the loss or logits; keep them at zero
        self.transformer.wte.weight[cfg.vocab_size :].zero_()
        self.lm_head.weight[cfg.vocab_size :].zero_()

    def _init_trunk_classic(self, generator) -> None:
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                # 1/sqrt(fan_in), shrunk for wide-in/narrow-out maps (arXiv:2310.17813, as nanochat 48abd7d)
                std = fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))
                lin.weight.normal_(0.0, std, generator=generator)
            # residual-branch outputs start at zero so every block starts as identity
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.transformer.wte.weight.normal_(0.0, 1.0, generator=generator)
        self.lm_head.weight.normal_(0.0, 0.001, generator=generator)

    def _init_trunk_2026(self, generator) -> None:
        """nanochat's July-2026 init (92d63d4): uniform (no outliers) with std 1/sqrt(n_embd), c_fc at 0.4x,
        gates slightly open, value embeddings like c_v."""
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(n_embd)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                lin.weight.uniform_(-s, s, generator=generator)
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=generator)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=generator)
        if self.config.value_embeds:
            for ve in self.value_embeds.values():
                ve.weight.uniform_(-s, s, generator=generator)
        self.transformer.wte.weight.normal_(0.0, 0.8, generator=generator)
        self.lm_head.weight.normal_(0.0, 0.001, generator=generator)

    # -- helpers ------------------------------------------------------------
    def get_device(self) -> torch.device:
        return self.lm_head.weight.device

    def param_groups(self) -> dict:
        """Parameters by optimizer role: Muon for block matrices (value-embedding gates
        included), AdamW for the rest: embedding, head, and with the 2026 features value_embeds,
        resid (resid_lambdas), x0 (x0_lambdas) and smear (smear gate, smear and backout
        lambdas); a role the model lacks is an empty list."""
        cfg = self.config
        groups = {
            "matrix": list(self.transformer.h.parameters()),
            "embedding": list(self.transformer.wte.parameters()),
            "head": list(self.lm_head.parameters()),
            "value_embeds": list(self.value_embeds.parameters()) if cfg.value_embeds else [],
            "resid": [self.resid_lambdas] if cfg.layer_lambdas else [],
            "x0": [self.x0_lambdas] if cfg.layer_lambdas else [],
            "smear": ([self.smear_gate.weight, self.smear_lambda] if cfg.smear else [])
            + ([self.backout_lambda] if cfg.backout else []),
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters()))
        return groups

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:  # lookups, not matmuls: the token and value embeddings
            n -= self.transformer.wte.weight.numel()
            if self.config.value_embeds:
                n -= sum(p.numel() for p in self.value_embeds.parameters())
        return n

    def estimate_flops(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * (matmul params) + attention (12 * H * D * keys seen, per layer).

        Matmul params are the block matrices, the smear gate and the unpadded head (the loss only
        multiplies vocab_size rows); embeddings are lookups. Attention is counted un-masked, as
        nanochat 92d63d4 counts it, over min(window, T) keys."""
        cfg = self.config
        T = seq_len or cfg.sequence_len
        n_matmul = sum(p.numel() for p in self.transformer.h.parameters()) + cfg.vocab_size * cfg.n_embd
        if cfg.smear:
            n_matmul += self.smear_gate.weight.numel()
        keys = sum(T if w is None else min(w, T) for w in cfg.window_sizes())
        return 6 * n_matmul + 12 * cfg.n_head * cfg.head_dim * keys

    def setup_optimizers(
        self,
        *,
        recipe="2026",
        matrix_lr=0.02,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        scalar_lr=0.5,
        weight_decay=0.0,
        lr_scale=1.0,
    ):
        return build_optimizers(
            self,
            recipe=recipe,
            matrix_lr=matrix_lr,
            embedding_lr=embedding_lr,
            unembedding_lr=unembedding_lr,
            scalar_lr=scalar_lr,
            weight_decay=weight_decay,
            lr_scale=lr_scale,
        )

    def _rotary(self, length: int, device: torch.device, plain: bool, dtype: torch.dtype):
        """cos/sin tables covering at least `length` positions (grown on demand, never per step)."""
        key = (device, plain, dtype)
        hit = self._rope_cache.get(key)
        if hit is None or hit[2] < length:
            n = max(length, self.config.sequence_len, 2 * hit[2] if hit else 0)
            # plain tensors even when first asked for under inference_mode (the RL rollouts):
            # training reuses them, and autograd refuses inference tensors
            with torch.inference_mode(False):
                cos, sin = kernels.rotary_tables(
                    n, self.config.head_dim, base=self.config.rope_base, device=device, dtype=dtype
                )
                if self.config.rope_bf16:
                    cos, sin = _bf16_rotary_tables(n, self.config.head_dim, self.config.rope_base, device, dtype)
            hit = (cos, sin, n)
            self._rope_cache[key] = hit
        return hit[0], hit[1]

    def _apply(self, fn, *args, **kwargs):
        # moving/casting the model invalidates cached rotary tables
        self._rope_cache = {}
        return super()._apply(fn, *args, **kwargs)

    # -- forward ------------------------------------------------------------
    def _smear(self, x: torch.Tensor, kv_cache, doc_ids) -> torch.Tensor:
        """Each token's embedding plus its gated predecessor's. The first token of a row (or of
        a document in a packed row) has none, unless the cache holds the embedding of the token
        before it (`prev_embedding`, [B, 1, C]); the cache then keeps this call's last one."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]).to(x.dtype))
        prev = getattr(kv_cache, "prev_embedding", None) if kv_cache is not None and kv_cache.pos > 0 else None
        if prev is None:
            before = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        else:
            before = torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        if doc_ids is not None:  # nothing smears across a document boundary
            same = torch.ones_like(doc_ids, dtype=torch.bool)
            same[:, 1:] = doc_ids[:, 1:] == doc_ids[:, :-1]
            gate = gate * same[..., None].to(gate.dtype)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        return x + gate * before

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss_reduction: str = "mean",
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ):
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
            doc_attn = attention.DocAttention(doc_ids)
        # explicit positions with a cache: the caller's (rows of different lengths, rustchat.batching)
        rope = (cos, sin, offset if position_ids is None else 0, position_ids, plain)

        x = norm(self.transformer.wte(idx))
        if cfg.smear:
            x = self._smear(x, kv_cache, doc_ids)
        x0 = x
        backout_at = cfg.n_layer // 2 if cfg.backout else -1
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.layer_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx) if cfg.has_value_embed(i) else None
            x = block(x, rope, kv_cache, doc_attn, ve)
            if i == backout_at:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        head = self.lm_head.weight  # padded rows never reach logits or loss:
        if head.size(0) != cfg.vocab_size:
            head = head[: cfg.vocab_size]
        if targets is not None:
            if not self.use_kernels:  # eager baseline: materialised logits, plain-torch loss
                return kernels.cross_entropy(
                    F.linear(x, head),
                    targets,
                    ignore_index=-1,
                    softcap=SOFTCAP,
                    reduction=loss_reduction,
                    backend="torch",
                )
            dev = idx.device.type
            if torch.is_autocast_enabled(dev):  # a custom autograd op is not autocast: cast here
                dt = torch.get_autocast_dtype(dev)
                x, head = x.to(dt), head.to(dt)
            elif x.dtype != head.dtype:
                x = x.to(head.dtype)
            return kernels.linear_cross_entropy(
                x,
                head,
                targets,
                ignore_index=-1,
                softcap=SOFTCAP,
                reduction=loss_reduction,
                backend="torch" if f64 else "auto",
            )
        logits = F.linear(x, head)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        return SOFTCAP * torch.tanh(logits / SOFTCAP)
