"""transformers model of a rustchat GPT exported with `rustchat export` (remote code: loaded
with `trust_remote_code=True`; it needs only torch and transformers, not rustchat).

It computes what rustchat's GPT computes (docs/design.md, "Model"), written again here because
remote code cannot import rustchat: token embedding and RMSNorm (no weights); the optional
smear (the previous token's embedding, gated, added to each token's); per block the optional
resid/x0 lambdas, attention (rotary in nanochat's sign convention, 92d63d4's, QK RMSNorm, q and k times
qk_scale, values plus gated value embeddings on their layers, a sliding window per layer) and a
ReLU^2 MLP; the optional backout of the middle layer's residual; a final RMSNorm, the head and
a tanh softcap. Weight names are rustchat's. Generation keeps every key and value in
transformers' DynamicCache (windows are masks) and the smear state on the cache object; rows
must not be padded (one prompt, or prompts of one length)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_rustchat import RustchatConfig

VE_GATE_CHANNELS, SMEAR_CHANNELS, WINDOW_TILE = 12, 24, 128


def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def window_sizes(cfg):
    """Per layer how far back a query sees (None: unlimited). S = a quarter of the context
    (rounded up, then up to a multiple of 128), L = the context; the last layer is L."""
    if cfg.window_pattern is None:
        return [None] * cfg.n_layer
    long = cfg.sequence_len
    short = WINDOW_TILE * math.ceil(math.ceil(long / 4) / WINDOW_TILE)
    pattern = cfg.window_pattern.upper()
    sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(cfg.n_layer)]
    sizes[-1] = long
    return sizes


def has_value_embed(cfg, layer):
    return bool(cfg.value_embeds) and layer % 2 == (cfg.n_layer - 1) % 2


def _rotary(positions, head_dim, base, bf16, dtype):
    if bf16:  # fp32 angles rounded to bf16, as nanochat's January-2026 model (48abd7d)
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
        ang = positions.float()[:, None] * inv
        return ang.cos().to(torch.bfloat16).to(dtype), ang.sin().to(torch.bfloat16).to(dtype)
    inv = 1.0 / (
        float(base) ** (torch.arange(0, head_dim // 2, dtype=torch.float64, device=positions.device) * 2.0 / head_dim)
    )
    ang = positions.double()[:, None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(x, cos, sin):  # x [B, T, H, D]; cos, sin [T, D/2]
    half = x.size(-1) // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qk_scale, self.window = cfg.qk_scale, window_sizes(cfg)[layer]
        C = cfg.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_value_embed(cfg, layer) else None

    def forward(self, x, cos, sin, positions, cache, ve):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _norm(_rotate(q, cos, sin)) * self.qk_scale, _norm(_rotate(k, cos, sin)) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        Tk = k.size(2)
        d = positions[:, None] - torch.arange(Tk, device=x.device)[None, :]
        mask = d >= 0
        if self.window is not None:
            mask = mask & (d <= self.window)
        if self.n_head != self.n_kv_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg)

    def forward(self, x, cos, sin, positions, cache, ve):
        x = x + self.attn(_norm(x), cos, sin, positions, cache, ve)
        return x + self.mlp(_norm(x))


class RustchatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RustchatConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        cfg, C, V = config, config.n_embd, config.vocab_size
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(V, C), "h": nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])}
        )
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        if cfg.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if cfg.value_embeds:
            kv = cfg.n_kv_head * (C // cfg.n_head)
            self.value_embeds = nn.ModuleDict(
                {str(i): nn.Embedding(V, kv) for i in range(cfg.n_layer) if has_value_embed(cfg, i)}
            )
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint
        pass

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        cfg = self.config
        if input_ids is None:
            raise ValueError("rustchat models take input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("rustchat models do not take padded rows: give prompts of one length")
        cache = cache if cache is not None else past_key_values
        if cache is None and (use_cache if use_cache is not None else getattr(cfg, "use_cache", True)):
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + T, device=input_ids.device)
        x = _norm(self.transformer.wte(input_ids))
        if cfg.smear:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            prev = getattr(cache, "rustchat_prev", None) if past else None
            first = torch.zeros_like(x[:, :1]) if prev is None else prev
            before = torch.cat([first, x[:, :-1]], dim=1)
            if cache is not None:
                cache.rustchat_prev = x[:, -1:]
            x = x + gate * before
        cos, sin = _rotary(positions, cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.rope_bf16, x.dtype)
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            if cfg.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if has_value_embed(cfg, i) else None
            x = block(x, cos, sin, positions, cache, ve)
            if cfg.backout and i == cfg.n_layer // 2:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda * x_mid
        x = _norm(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x).float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        # the cache's field is `cache` in newer transformers, `past_key_values` in older ones
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{field: cache})
