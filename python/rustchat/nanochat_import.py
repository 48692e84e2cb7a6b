"""`rustchat import-nanochat`: a nanochat checkpoint (model_<step>.pt + meta_<step>.json) and its
tokenizer.pkl become a rustchat checkpoint and tokenizer, so mid/SFT continue from them.

Our module names are nanochat's, so the mapping is: strip torch.compile's `_orig_mod.`
prefix, pad embedding/head rows to our padded vocab, cast to fp32. Files are read without
executing code (torch.load(weights_only=True), json).
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import save_checkpoint, stage_dir
from .common import RustchatError, get_base_dir
from .config import ImportNanochatConfig
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

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


# ----------------------------------------------------------------------------- tokenizer.pkl
class _EncodingState:
    """Stands in for tiktoken.Encoding during unpickling; holds its state dict."""

    def __setstate__(self, state):
        self.state = state


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a tokenizer pickle")


def load_nanochat_tokenizer(path: str | Path) -> Tokenizer:
    """nanochat's `tokenizer.pkl` as our Tokenizer, read WITHOUT running code from it.

    A normal `pickle.load` would import and call whatever the file names. Here the unpickler
    resolves exactly one global, `tiktoken.core.Encoding`, to an inert stand-in that only
    records the state tiktoken pickles (name, pat_str, mergeable_ranks, special_tokens); every
    other global is refused."""
    p = Path(path)
    if not p.is_file():
        raise RustchatError(f"{p}: nanochat tokenizer.pkl not found")
    try:
        obj = _SafeUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise RustchatError(f"{p}: not a pickled tiktoken Encoding ({e})") from None
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise RustchatError(f"{p}: pickles the registered tiktoken encoding {state!r} by name; "
                            "load it with Tokenizer.from_tiktoken(tiktoken.get_encoding(name))")
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise RustchatError(f"{p}: unexpected tokenizer pickle contents")
    return Tokenizer.from_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])


# ----------------------------------------------------------------------------- the command
def import_nanochat(cfg: ImportNanochatConfig) -> Path:
    """Write the imported model as a checkpoint of `cfg.stage` and its tokenizer into the base dir."""
    src = Path(cfg.checkpoint_dir)
    step = cfg.step if cfg.step is not None else find_nanochat_step(src)
    model, meta = import_nanochat_model(src, step)
    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
    else:
        near = [src / "tokenizer.pkl", src.parent / "tokenizer" / "tokenizer.pkl",
                src.parent.parent / "tokenizer" / "tokenizer.pkl"]
        tok_path = next((p for p in near if p.is_file()), None)
        if tok_path is None:
            raise RustchatError(f"no tokenizer.pkl near {src}; pass --tokenizer PATH")
    tok = load_nanochat_tokenizer(tok_path)
    if tok.vocab_size != model.config.vocab_size:
        raise RustchatError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model expects {model.config.vocab_size}")
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir()
    tok.save(base / "tokenizer")
    depth = model.config.n_layer
    out = stage_dir(cfg.stage, depth, base)
    save_checkpoint(out, step, model, None, {"imported_from": str(src.resolve()), "nanochat_meta": meta,
                                              "stage": cfg.stage})
    print(f"imported nanochat step {step} (depth {depth}, {model.num_params() / 1e6:.1f}M params) -> {out}; "
          f"tokenizer -> {base / 'tokenizer'}")
    return out
