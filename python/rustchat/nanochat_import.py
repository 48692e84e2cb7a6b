"""Import a nanochat model checkpoint (model_<step>.pt + meta_<step>.json) as our GPT.

Our module names are nanochat's, so the mapping is: strip torch.compile's `_orig_mod.`
prefix, pad embedding/head rows to our padded vocab, cast to fp32. Files are read without
executing code (torch.load(weights_only=True), json).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .common import RustchatError
from .model import GPT, GPTConfig

_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def find_nanochat_step(ckpt_dir) -> int:
    ckpt_dir = Path(ckpt_dir)
    steps = [int(m.group(1)) for f in ckpt_dir.iterdir() if (m := _MODEL_RE.match(f.name))] if ckpt_dir.is_dir() else []
    if not steps:
        raise RustchatError(f"no nanochat model_<step>.pt in {ckpt_dir}")
    return max(steps)


def _file_for_step(ckpt_dir: Path, prefix: str, step: int, suffix: str) -> Path:
    for name in (f"{prefix}_{step:06d}{suffix}", f"{prefix}_{step}{suffix}"):
        if (ckpt_dir / name).exists():
            return ckpt_dir / name
    raise RustchatError(f"nanochat checkpoint {ckpt_dir} has no {prefix}_{step:06d}{suffix}")


def convert_state_dict(sd: dict, config: GPTConfig) -> dict:
    """nanochat state dict -> ours (fp32, padded vocab rows, no compile prefix)."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    with torch.device("meta"):
        expected = GPT(config, init=False).state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise RustchatError(f"unsupported nanochat model: missing {missing[:4]}, unexpected {extra[:4]} "
                            f"({len(missing)} missing, {len(extra)} unexpected)")
    out = {}
    for name, ref in expected.items():
        t = sd[name].to(torch.float32)
        if name in _VOCAB_ROWS:
            rows = min(t.size(0), ref.size(0))
            if t.size(0) < config.vocab_size or t.size(1) != ref.size(1):
                raise RustchatError(f"nanochat {name} has shape {tuple(t.shape)}, expected at least "
                                    f"({config.vocab_size}, {ref.size(1)})")
            padded = torch.zeros(ref.shape, dtype=torch.float32)
            padded[:rows] = t[:rows]
            padded[config.vocab_size:] = 0  # rows past the real vocab are never used
            t = padded
        elif t.shape != ref.shape:
            raise RustchatError(f"nanochat {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        out[name] = t.contiguous()
    return out


def import_nanochat_model(ckpt_dir, step: int | None = None, device="cpu"):
    """-> (GPT on `device`, nanochat meta dict)."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = find_nanochat_step(ckpt_dir)
    meta = json.loads(_file_for_step(ckpt_dir, "meta", step, ".json").read_text())
    mc = meta.get("model_config")
    if not isinstance(mc, dict) or any(k not in mc for k in _CONFIG_KEYS):
        raise RustchatError(f"nanochat meta in {ckpt_dir} lacks model_config with {', '.join(_CONFIG_KEYS)}")
    config = GPTConfig(**{k: int(mc[k]) for k in _CONFIG_KEYS})
    try:
        sd = torch.load(_file_for_step(ckpt_dir, "model", step, ".pt"), map_location="cpu", weights_only=True)
    except RustchatError:
        raise
    except Exception as e:
        raise RustchatError(f"cannot read nanochat weights in {ckpt_dir}: {type(e).__name__}: {e}") from None
    state = convert_state_dict(sd, config)
    with torch.device("meta"):
        model = GPT(config, init=False)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model, meta
