"""Independent reference GPT written from docs/design.md ("Model"), classic and 2026, for tests only.

Plain PyTorch, explicit loops, any float dtype (tests use float64). No rustchat imports, so a
bug shared with python/rustchat/model.py would have to be written twice to go unnoticed.

Weights are a dict in nanochat naming:
  transformer.wte.weight [V_any, C], transformer.h.{i}.attn.c_{q,k,v,proj}.weight,
  transformer.h.{i}.mlp.c_{fc,proj}.weight, lm_head.weight [V_any, C]
Only the first vocab_size rows of wte/lm_head are meaningful (padding is ignored here).
The 2026 model adds value_embeds.{i}.weight, transformer.h.{i}.attn.ve_gate.weight,
resid_lambdas, x0_lambdas, smear_gate.weight, smear_lambda, backout_lambda.
"""

import math

import torch

SOFTCAP = 15.0


def rms_norm(x):
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def rotate_half_split(x, positions, base=10000.0, bf16_tables=False):
    """x [B, T, H, D]; positions [B, T]. x1 = first half, x2 = second half of D:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, angle = pos * base^(-2i/D); bf16_tables:
    angles in fp32 and cos, sin rounded to bf16 first."""
    D = x.size(-1)
    half = D // 2
    i = torch.arange(half, dtype=torch.float64, device=x.device)
    inv_freq = base ** (-2.0 * i / D)
    ang = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, half]
    cos, sin = ang.cos(), ang.sin()
    if bf16_tables:  # as nanochat's January model (48abd7d): fp32 angles, then bf16
        inv32 = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        ang32 = positions.to(torch.float32)[..., None] * inv32
        cos, sin = ang32.cos().to(torch.bfloat16), ang32.sin().to(torch.bfloat16)
    cos = cos.to(x.dtype)[:, :, None, :]
    sin = sin.to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def ref_windows(cfg):
    """Per layer: how far back a query may look (None = no limit). The pattern of S/L is tiled
    over the layers, the last layer is L; L = sequence_len, S = a quarter of it rounded up to an
    integer, then up to a multiple of 128."""
    pattern = cfg.get("window_pattern")
    L = cfg["n_layer"]
    if pattern is None:
        return [None] * L
    long = cfg["sequence_len"]
    short = 128 * math.ceil(math.ceil(long / 4) / 128)
    out = []
    for i in range(L):
        out.append(long if pattern.upper()[i % len(pattern)] == "L" or i == L - 1 else short)
    return out


def ref_forward(weights, cfg, idx, positions=None, doc_ids=None):
    """Softcapped logits [B, T, vocab_size] in the weights' dtype.

    cfg: dict with vocab_size, n_layer, n_head, n_kv_head, n_embd, and for the 2026 model
    sequence_len, window_pattern, rope_base, qk_scale, value_embeds, layer_lambdas, smear,
    backout (absent = classic), rope_bf16. positions default to 0..T-1; doc_ids (default: one document
    per row) restrict attention (and the smear) to the same document."""
    B, T = idx.shape
    V, L = cfg["vocab_size"], cfg["n_layer"]
    H, Hkv, C = cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    D = C // H
    group = H // Hkv  # query heads per kv head
    base = float(cfg.get("rope_base", 10000))
    qk_scale = cfg.get("qk_scale", 1.0)
    bf16 = cfg.get("rope_bf16", False)
    windows = ref_windows(cfg)
    if positions is None:
        positions = torch.arange(T).expand(B, T)
    if doc_ids is None:
        doc_ids = torch.zeros(B, T, dtype=torch.long)

    x = weights["transformer.wte.weight"][idx]
    x = rms_norm(x)
    if cfg.get("smear"):
        smeared = x.clone()
        for b in range(B):
            for t in range(1, T):
                if doc_ids[b, t] != doc_ids[b, t - 1]:
                    continue
                g = torch.sigmoid(x[b, t, :24] @ weights["smear_gate.weight"][0]) * weights["smear_lambda"][0]
                smeared[b, t] = x[b, t] + g * x[b, t - 1]
        x = smeared
    x0 = x
    x_mid = None
    for layer in range(L):
        p = f"transformer.h.{layer}."
        if cfg.get("layer_lambdas"):
            x = weights["resid_lambdas"][layer] * x + weights["x0_lambdas"][layer] * x0
        h = rms_norm(x)
        q = (h @ weights[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ weights[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ weights[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if f"value_embeds.{layer}.weight" in weights:
            ve = weights[f"value_embeds.{layer}.weight"][idx].view(B, T, Hkv, D)
            gate = 3 * torch.sigmoid(h[..., :12] @ weights[p + "attn.ve_gate.weight"].T)  # [B, T, Hkv]
            v = v + gate[..., None] * ve
        q = rms_norm(rotate_half_split(q, positions, base, bf16)) * qk_scale
        k = rms_norm(rotate_half_split(k, positions, base, bf16)) * qk_scale
        out = torch.zeros(B, T, H, D, dtype=x.dtype)
        w = windows[layer]
        for b in range(B):
            allowed = torch.zeros(T, T, dtype=torch.bool)
            for i in range(T):
                for j in range(i + 1):
                    allowed[i, j] = bool(doc_ids[b, i] == doc_ids[b, j]) and (w is None or i - j <= w)
            for hq in range(H):
                hk = hq // group
                scores = (q[b, :, hq] @ k[b, :, hk].T) / math.sqrt(D)
                scores = scores.masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                out[b, :, hq] = probs @ v[b, :, hk]
        x = x + out.reshape(B, T, C) @ weights[p + "attn.c_proj.weight"].T
        h = rms_norm(x)
        a = torch.relu(h @ weights[p + "mlp.c_fc.weight"].T) ** 2
        x = x + a @ weights[p + "mlp.c_proj.weight"].T
        if cfg.get("backout") and layer == L // 2:
            x_mid = x
    if x_mid is not None:
        x = x - weights["backout_lambda"][0] * x_mid
    x = rms_norm(x)
    logits = x @ weights["lm_head.weight"][:V].T
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def ref_loss(logits, targets, reduction="mean", ignore_index=-1):
    """Cross entropy by hand: -log softmax at the target, ignored positions give 0 / are skipped."""
    logits = logits.reshape(-1, logits.size(-1))
    t = targets.reshape(-1)
    keep = t != ignore_index
    logz = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
    per = torch.where(keep, logz - picked, torch.zeros_like(logz))
    if reduction == "none":
        return per.view(targets.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / keep.sum()
