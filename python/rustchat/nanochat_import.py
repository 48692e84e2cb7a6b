"""`rustchat import-nanochat`: a nanochat checkpoint (model_<step>.pt + meta_<step>.json) and its
tokenizer.pkl become a rustchat checkpoint and tokenizer, so mid/SFT continue from them.

Both nanochat models import: January 2026's (the classic architecture) and July 2026's (a
`window_pattern` in the meta's model_config: the 2026 architecture). Our module names are
nanochat's, so the mapping is: strip torch.compile's `_orig_mod.` prefix, pad embedding, value
embedding and head rows to our padded vocab, cast to fp32. Files are read without
executing code (torch.load(weights_only=True), json), after checking each is a regular file
(checkpoint.regular_file) that resolves inside the directory it was found in (checkpoint.inside_dir:
no symlink out of it); the meta is capped in size and its model_config checked before the weights
are read; weights must be finite. An import never replaces a different
tokenizer or an existing checkpoint of the same step unless asked to (--force).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import torch

from .checkpoint import (
    MAX_STEP,
    check_model_config,
    inside_dir,
    read_json_object,
    regular_file,
    save_checkpoint,
    stage_dir,
)
from .common import RustchatError, check_count, get_base_dir
from .config import ImportNanochatConfig
from .model import ARCHS, GPT, GPTConfig
from .tokenizer import Tokenizer

_MODEL_RE = re.compile(r"^model_(\d{1,13})\.pt$")  # a longer number is no step (MAX_STEP)
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # and value_embeds.<layer>.weight
_NANOCHAT_SIZES = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}
_MAX_TOKENIZER_PICKLE = 256 << 20
_MAX_NANOCHAT_META = 16 << 20  # a nanochat meta is a few KB: its configs, step and losses


def find_nanochat_step(ckpt_dir) -> int:
    ckpt_dir = Path(ckpt_dir)
    found = (m.group(1) for f in ckpt_dir.iterdir() if (m := _MODEL_RE.match(f.name))) if ckpt_dir.is_dir() else ()
    steps = [int(s) for s in found if int(s) <= MAX_STEP]
    if not steps:
        raise RustchatError(f"no nanochat model_<step>.pt in {ckpt_dir}")
    return max(steps)


def _file_for_step(ckpt_dir: Path, prefix: str, step: int, suffix: str) -> Path:
    """The step's file, which must resolve inside ckpt_dir (a symlink out of it is refused)."""
    for name in (f"{prefix}_{step:06d}{suffix}", f"{prefix}_{step}{suffix}"):
        if os.path.lexists(ckpt_dir / name):
            inside_dir(ckpt_dir, ckpt_dir / name, f"nanochat {prefix} file")
            return ckpt_dir / name
    raise RustchatError(f"nanochat checkpoint {ckpt_dir} has no {prefix}_{step:06d}{suffix}")


def nanochat_config(mc, where) -> GPTConfig:
    """The architecture of a nanochat meta's `model_config`: January 2026's six sizes, or July
    2026's with `window_pattern` (which brings all of that model's features). Any other field
    is refused by name: it would be a model we do not compute."""
    if isinstance(mc, dict):
        unknown = sorted(set(mc) - _NANOCHAT_SIZES - {"window_pattern"})
        if unknown:
            raise RustchatError(
                f"{where}: unsupported nanochat model_config field(s) {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(sorted(_NANOCHAT_SIZES))}, window_pattern)"
            )
    config = check_model_config(mc, where)  # refuses missing, ill-typed and absurd sizes
    # January's model keeps its rotary tables in bf16, July's in the compute dtype (fp32 on a CPU)
    feats = dict(ARCHS["2026"], window_pattern=mc["window_pattern"]) if "window_pattern" in mc else {"rope_bf16": True}
    try:
        return GPTConfig(**{**config.to_dict(), **feats})
    except RustchatError as e:
        raise RustchatError(f"{where}: model_config: {e}") from None


def convert_state_dict(sd: dict, config: GPTConfig) -> dict:
    """nanochat state dict -> ours (fp32, padded vocab rows, no compile prefix)."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    with torch.device("meta"):
        expected = GPT(config, init=False).state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise RustchatError(
            f"unsupported nanochat model ({config.arch} architecture by its model_config): "
            f"missing tensors {missing[:4]}, unexpected tensors {extra[:4]} "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    out = {}
    for name, ref in expected.items():
        t = sd[name].to(torch.float32)
        if name in _VOCAB_ROWS or name.startswith("value_embeds."):
            rows = min(t.size(0), ref.size(0))
            if t.size(0) < config.vocab_size or t.size(1) != ref.size(1):
                raise RustchatError(
                    f"nanochat {name} has shape {tuple(t.shape)}, expected at least "
                    f"({config.vocab_size}, {ref.size(1)})"
                )
            padded = torch.zeros(ref.shape, dtype=torch.float32)
            padded[:rows] = t[:rows]
            padded[config.vocab_size :] = 0  # rows past the real vocab are never used
            t = padded
        elif t.shape != ref.shape:
            raise RustchatError(f"nanochat {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise RustchatError(f"nanochat {name} holds NaN or infinite values")
        out[name] = t.contiguous()
    return out


def import_nanochat_model(ckpt_dir, step: int | None = None, device="cpu"):
    """-> (GPT on `device`, nanochat meta dict)."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = find_nanochat_step(ckpt_dir)
    meta_path = _file_for_step(ckpt_dir, "meta", step, ".json")
    meta = read_json_object(meta_path, "nanochat meta", _MAX_NANOCHAT_META)
    config = nanochat_config(meta.get("model_config"), meta_path)
    weights_path = _file_for_step(ckpt_dir, "model", step, ".pt")
    regular_file(weights_path, "nanochat weights")
    try:
        sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses code; truncation and garbage raise many types
        raise RustchatError(f"{weights_path}: cannot read nanochat weights: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise RustchatError(f"{weights_path}: not a state dict of named tensors")
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
    regular_file(p, "nanochat tokenizer.pkl", _MAX_TOKENIZER_PICKLE)
    try:
        obj = _SafeUnpickler(io.BytesIO(p.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - malformed pickles raise many types; none runs code here
        raise RustchatError(f"{p}: not a pickled tiktoken Encoding ({type(e).__name__}: {e})") from None
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise RustchatError(
            f"{p}: pickles the registered tiktoken encoding {state!r} by name; "
            "load it with Tokenizer.from_tiktoken(tiktoken.get_encoding(name))"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise RustchatError(f"{p}: unexpected tokenizer pickle contents")
    try:
        tok = Tokenizer.from_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])
        tok.check_split_bounded()
        return tok
    except Exception as e:  # noqa: BLE001 - the core's refusal, said about the file it came from
        raise RustchatError(f"{p}: not a usable tokenizer ({type(e).__name__}: {e})") from None


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return (
        a.pattern == b.pattern and a.special_tokens == b.special_tokens and a.mergeable_ranks() == b.mergeable_ranks()
    )


def _would_replace(tok: Tokenizer, tok_dir: Path, out: Path, step: int) -> list[str]:
    """What writing `tok` into tok_dir and checkpoint `step` into `out` would overwrite."""
    replaced = []
    if (tok_dir / "tokenizer.json").exists() or (tok_dir / "ranks.tiktoken").exists():
        try:
            same = _same_tokenizer(Tokenizer.load(tok_dir), tok)
        except (ValueError, OSError):
            same = False  # an unreadable tokenizer is still one the user may want to keep
        if not same:
            replaced.append(
                f"the tokenizer in {tok_dir} (a different vocabulary: its checkpoints would no longer match it)"
            )
    existing = [p.name for p in (out / f"meta_{step:06d}.json", out / f"model_{step:06d}.safetensors") if p.exists()]
    if existing:
        replaced.append(f"checkpoint step {step} in {out} ({', '.join(existing)})")
    return replaced


# ----------------------------------------------------------------------------- the command
def import_nanochat(cfg: ImportNanochatConfig) -> Path:
    """Write the imported model as a checkpoint of `cfg.stage` and its tokenizer into the base dir."""
    src = Path(cfg.checkpoint_dir)
    if cfg.step is not None:
        check_count("--step", cfg.step, 0, MAX_STEP)
    step = cfg.step if cfg.step is not None else find_nanochat_step(src)
    model, meta = import_nanochat_model(src, step)
    if cfg.tokenizer:
        tok_path = Path(cfg.tokenizer)
    else:
        near = [
            src / "tokenizer.pkl",
            src.parent / "tokenizer" / "tokenizer.pkl",
            src.parent.parent / "tokenizer" / "tokenizer.pkl",
        ]
        tok_path = next((p for p in near if os.path.lexists(p)), None)
        if tok_path is None:
            raise RustchatError(f"no tokenizer.pkl near {src}; pass --tokenizer PATH")
        # found, not named: it must resolve inside the directory it was found in
        inside_dir(tok_path.parent, tok_path, "nanochat tokenizer.pkl")
    tok = load_nanochat_tokenizer(tok_path)
    if tok.vocab_size != model.config.vocab_size:
        raise RustchatError(
            f"tokenizer {tok_path} has {tok.vocab_size} ids but the model expects {model.config.vocab_size}"
        )
    base = Path(cfg.base_dir) if cfg.base_dir else get_base_dir()
    depth = model.config.n_layer
    out = stage_dir(cfg.stage, depth, base)
    replaced = _would_replace(tok, base / "tokenizer", out, step)
    if replaced and not cfg.force:
        raise RustchatError(
            f"import-nanochat would replace {' and '.join(replaced)}; pass --force to replace, "
            "or import into another --base-dir"
        )
    tok.save(base / "tokenizer")
    save_checkpoint(
        out, step, model, None, {"imported_from": str(src.resolve()), "nanochat_meta": meta, "stage": cfg.stage}
    )
    print(
        f"imported nanochat step {step} (depth {depth}, {model.num_params() / 1e6:.1f}M params) -> {out}; "
        f"tokenizer -> {base / 'tokenizer'}"
    )
    return out
