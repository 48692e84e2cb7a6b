"""Independent reference GPT written from docs/design.md ("Model"), for tests only.

Plain PyTorch, explicit loops, any float dtype (tests use float64). No rustchat imports, so a
bug shared with python/rustchat/model.py would have to be written twice to go unnoticed.

Weights are a dict in nanochat naming:
  transformer.wte.weight [V_any, C], transformer.h.{i}.attn.c_{q,k,v,proj}.weight,
  transformer.h.{i}.mlp.c_{fc,proj}.weight, lm_head.weight [V_any, C]
Only the first vocab_size rows of wte/lm_head are meaningful (padding is ignored here).
"""
import math

import torch

SOFTCAP = 15.0


def rms_norm(x):
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def rotate_half_split(x, positions, base=10000.0):
    """x [B, T, H, D]; positions [B, T]. x1 = first half, x2 = second half of D:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, angle = pos * base^(-2i/D)."""
    D = x.size(-1)
    half = D // 2
    i = torch.arange(half, dtype=torch.float64, device=x.device)
    inv_freq = base ** (-2.0 * i / D)
    ang = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, half]
    cos = ang.cos().to(x.dtype)[:, :, None, :]
    sin = ang.sin().to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def ref_forward(weights, cfg, idx, positions=None, doc_ids=None):
    """Softcapped logits [B, T, vocab_size] in the weights' dtype.

    cfg: dict with vocab_size, n_layer, n_head, n_kv_head, n_embd. positions default to 0..T-1;
    doc_ids (default: one document per row) restrict attention to the same document."""
    B, T = idx.shape
    V, L = cfg["vocab_size"], cfg["n_layer"]
    H, Hkv, C = cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    D = C // H
    group = H // Hkv  # query heads per kv head
    if positions is None:
        positions = torch.arange(T).expand(B, T)
    if doc_ids is None:
        doc_ids = torch.zeros(B, T, dtype=torch.long)

    x = weights["transformer.wte.weight"][idx]
    x = rms_norm(x)
    for layer in range(L):
        p = f"transformer.h.{layer}."
        h = rms_norm(x)
        q = (h @ weights[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ weights[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ weights[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        q = rms_norm(rotate_half_split(q, positions))
        k = rms_norm(rotate_half_split(k, positions))
        out = torch.zeros(B, T, H, D, dtype=x.dtype)
        for b in range(B):
            allowed = torch.zeros(T, T, dtype=torch.bool)
            for i in range(T):
                for j in range(i + 1):
                    allowed[i, j] = bool(doc_ids[b, i] == doc_ids[b, j])
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
