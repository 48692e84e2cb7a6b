"""`rustchat export` and `rustchat import-hf`: a checkpoint as a Hugging Face `transformers`
directory of its built-in NanoChat architecture (`model_type: nanochat`, no remote code) for
the classic architecture, or with our own modeling code (`model_type: rustchat`, loaded with
trust_remote_code=True) for the 2026 one; and either kind back into a checkpoint and tokenizer
(docs/design.md, "Export to transformers").

transformers' NanoChat is the same network as ours: embedding, RMSNorm without weights
before the blocks, pre-norm blocks with rotary (nanochat's sign convention, 48abd7d and 92d63d4) then QK RMSNorm,
ReLU^2 MLP, a final RMSNorm, an untied head and a tanh softcap of 15 on the logits. So the
export renames weights (`transformer.h.{i}.attn.c_q` -> `model.layers.{i}.self_attn.q_proj`,
...), cuts the embedding and head to the real vocabulary (our padded rows are never used, and
would be logits of 0 that greedy decoding could pick), and sets the norm epsilon to ours:
`F.rms_norm` with no eps uses the dtype's machine epsilon.

The tokenizer becomes a byte-level BPE `tokenizer.json` for the `tokenizers` library: the same
split pattern, each token's bytes spelled with GPT-2's byte-to-unicode alphabet, merges derived
from the ranks (every way a token splits into two tokens, in rank order) and `ignore_merges`,
since, like tiktoken, we take a chunk that is itself a token whole. The chat template renders
conversations exactly as `rustchat.conversation` does (docs/design.md, "Conversation
rendering").
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (
    CONFIG_LIMITS,
    MAX_STEP,
    build_model_from_meta,
    check_model_config,
    find_last_step,
    inside_dir,
    load_model,
    read_json_object,
    safetensors_header,
    save_checkpoint,
    stage_dir,
)
from .common import MAX_VOCAB_SIZE, RustchatError, check_count, check_writable, get_base_dir
from .config import ExportConfig, ImportHFConfig
from .model import GPT, ROPE_BASE, SOFTCAP, GPTConfig
from .nanochat_import import convert_state_dict
from .tokenizer import SPECIAL_TOKENS, Tokenizer

# F.rms_norm(x, shape) with eps=None uses torch.finfo(x.dtype).eps; the weights are fp32
RMS_EPS = float(torch.finfo(torch.float32).eps)
_MODEL_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# caps on what an import reads, refused before the file is read: far above real files, far below memory
_MAX_CONFIG_BYTES = 4 << 20
_MAX_INDEX_BYTES = 16 << 20
_MAX_TOKENIZER_BYTES = 256 << 20  # a 200k vocabulary with its merges is ~20 MB
_MAX_SHARDS = 4096
_WEIGHT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# the modeling code a non-classic export carries (run by transformers, not imported by rustchat)
_REMOTE_CODE = Path(__file__).parent / "hf_remote"
_REMOTE_TYPE = "rustchat"
_GPT_FIELDS = {f.name for f in fields(GPTConfig)}

# ours -> transformers, per block (the rest: wte -> embed_tokens, lm_head -> lm_head)
_BLOCK_NAMES = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_VOCAB_ROWS = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}

# The rendering of docs/design.md section 3 as a Jinja template: <|bos|>, a leading system
# message joined to the first user message with a blank line, user turns, assistant turns
# (a string, or parts: text, python calls, python outputs) and, for generation, the opening
# <|assistant_start|>. The text between special tokens is tokenized on its own, as ours is.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- if not messages or messages[0]['role'] != 'user' -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{%- else -%}{%- set system = none -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}{%- set content = system + '\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{- '<|user_start|>' + content + '<|user_end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown assistant part type ' + part['type']) -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


# ----------------------------------------------------------------------------- weights and config
def to_hf_state_dict(state: dict, config: GPTConfig) -> dict:
    """Our state dict -> transformers NanoChat names, vocab rows cut to the real vocabulary."""
    out = {}
    for name, t in state.items():
        name = name.replace("_orig_mod.", "")
        if name in _VOCAB_ROWS:
            out[_VOCAB_ROWS[name]] = t[: config.vocab_size]
            continue
        m = re.fullmatch(
            r"transformer\.h\.(\d+)\.(attn\.c_q|attn\.c_k|attn\.c_v|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", name
        )
        if m is None:
            raise RustchatError(f"cannot export weight {name!r}: no transformers NanoChat counterpart")
        out[f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"] = t
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict, config: GPTConfig) -> dict:
    """transformers NanoChat weights -> our state dict (fp32, vocab rows padded with zeros)."""
    ours_of = _hf_to_ours(config)
    # with our names it is a nanochat state dict: same checks, fp32 and padding as that import
    return convert_state_dict({ours_of.get(k, k): v for k, v in hf.items()}, config)


def hf_config(config: GPTConfig, tok: Tokenizer) -> dict:
    """config.json of a transformers NanoChatForCausalLM equal to our GPT."""
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROPE_BASE)},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.encode_special("<|assistant_end|>"),
        "pad_token_id": tok.encode_special("<|assistant_end|>"),
        "use_cache": True,
        "dtype": "float32",
    }


def _hf_size(cfg: dict, key: str, limit: int, where, default=None) -> int:
    """config.json's `key` as a positive int up to `limit` (absent or null: `default`, when given).
    A bool, a float (128.9, and 128.0 too) or a string is refused, never rounded."""
    v = cfg.get(key)
    if v is None and default is not None:
        return default
    if key not in cfg:
        raise RustchatError(f"{where}: lacks {key!r}")
    if type(v) is not int or not 1 <= v <= limit:
        shown = repr(v) if len(repr(v)) <= 40 else f"{repr(v)[:20]}... ({len(repr(v))} chars)"
        raise RustchatError(f"{where}: {key}={shown} must be an integer in 1..{limit}")
    return v


def gpt_config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    """Our GPTConfig from a NanoChat config.json; refuses anything our model does not compute,
    and every size that is not a positive integer within CONFIG_LIMITS, before anything is
    allocated."""
    if not isinstance(cfg, dict):
        raise RustchatError(f"{where}: is a JSON {type(cfg).__name__}, expected an object")
    if cfg.get("model_type") != "nanochat":
        raise RustchatError(f"{where}: model_type is {cfg.get('model_type')!r}, expected 'nanochat'")
    lim = CONFIG_LIMITS
    C = _hf_size(cfg, "hidden_size", lim["n_embd"], where)
    L = _hf_size(cfg, "num_hidden_layers", lim["n_layer"], where)
    H = _hf_size(cfg, "num_attention_heads", lim["n_head"], where)
    H_kv = _hf_size(cfg, "num_key_value_heads", lim["n_kv_head"], where, default=H)
    vocab = _hf_size(cfg, "vocab_size", lim["vocab_size"], where)
    seq = _hf_size(cfg, "max_position_embeddings", lim["sequence_len"], where, default=2048)
    ffn = _hf_size(cfg, "intermediate_size", 4 * lim["n_embd"], where, default=4 * C)
    head_dim = _hf_size(cfg, "head_dim", lim["n_embd"], where, default=C // H)
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise RustchatError(f"{where}: rope_parameters is a JSON {type(rope).__name__}, expected an object")
    theta = rope.get("rope_theta", cfg.get("rope_theta", ROPE_BASE))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise RustchatError(f"{where}: rope_theta={theta!r} must be a number")
    checks = [
        ("hidden_act", cfg.get("hidden_act", "relu2"), "relu2"),
        ("intermediate_size", ffn, 4 * C),
        ("head_dim", head_dim, C // H),
        ("final_logit_softcapping", cfg.get("final_logit_softcapping", SOFTCAP), SOFTCAP),
        ("rope_parameters.rope_theta", float(theta), float(ROPE_BASE)),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
        ("attention_bias", bool(cfg.get("attention_bias", False)), False),
        ("tie_word_embeddings", bool(cfg.get("tie_word_embeddings", False)), False),
    ]
    for name, got, want in checks:
        if got != want:
            raise RustchatError(f"{where}: {name} is {got!r}; rustchat's GPT needs {want!r}")
    try:
        return GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=L, n_head=H, n_kv_head=H_kv, n_embd=C)
    except RustchatError as e:
        raise RustchatError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- tokenizer
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: what byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab (spelled token -> id) and merges in priority order from tiktoken ranks.

    Encoding merges the adjacent pair whose concatenation has the lowest rank, so each token
    contributes one merge per way it splits into two tokens, all at its rank's priority."""
    b2u = byte_to_unicode()
    spell = {t: "".join(b2u[b] for b in t) for t in ranks}
    merges = []
    for t, r in ranks.items():
        for i in range(1, len(t)):
            left, right = t[:i], t[i:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], ranks[right], spell[left], spell[right]))
    merges.sort()
    return {spell[t]: r for t, r in ranks.items()}, [(a, b) for *_, a, b in merges]


def hf_tokenizer(tok: Tokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer` (byte-level BPE) giving the same ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers  # only the export needs it
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = bpe_vocab_and_merges(tok.mergeable_ranks())
    specials = tok.special_tokens
    clash = sorted(set(vocab) & set(specials))
    if clash:
        raise RustchatError(f"special token names {clash[:3]} are also spelled as ordinary tokens")
    vocab.update(specials)  # specials keep their ids: the added tokens below find them in the vocab
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in sorted(specials, key=specials.get)]
    )
    for name, i in specials.items():
        if hf.token_to_id(name) != i:
            raise RustchatError(f"special token {name!r} got id {hf.token_to_id(name)} in tokenizer.json, not {i}")
    return hf


def tokenizer_from_hf_json(path: Path) -> Tokenizer:
    """Our Tokenizer from a byte-level BPE tokenizer.json whose ids are ranks (as `export` writes);
    its split pattern must run in bounded time (Tokenizer.check_split_bounded)."""
    data = read_json_object(path, "tokenizer.json", _MAX_TOKENIZER_BYTES)
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise RustchatError(f"{path}: model.type is {kind!r}, expected a byte-level 'BPE' vocabulary")
    if len(model["vocab"]) > MAX_VOCAB_SIZE:
        raise RustchatError(f"{path}: {len(model['vocab'])} tokens, more than the {MAX_VOCAB_SIZE} rustchat holds")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    if not isinstance(pattern, str):
        raise RustchatError(f"{path}: no Split pre-tokenizer with a regex pattern (a byte-level BPE needs one)")
    u2b = {u: b for b, u in byte_to_unicode().items()}
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in added
    ):
        raise RustchatError(f"{path}: added_tokens must be a list of objects with a string content and an integer id")
    specials = {t["content"]: t["id"] for t in added if t.get("special")}
    ranks = {}
    for spelled, i in model["vocab"].items():
        if spelled in specials:
            continue
        if type(i) is not int:
            raise RustchatError(f"{path}: token {spelled[:40]!r} has id {i!r}, not an integer")
        try:
            ranks[bytes(u2b[c] for c in spelled)] = i
        except KeyError:
            raise RustchatError(f"{path}: token {spelled[:40]!r} is not spelled in the byte-level alphabet") from None
    missing = [s for s in SPECIAL_TOKENS if s not in specials]
    if missing:
        raise RustchatError(f"{path}: lacks the special tokens {', '.join(missing)} that rustchat's rendering uses")
    try:
        tok = Tokenizer.from_ranks(ranks, pattern, specials)
        tok.check_split_bounded()
    except (ValueError, TypeError) as e:
        raise RustchatError(f"{path}: {e}") from None
    return tok


def _split_pattern(pre, depth: int = 0) -> str | None:
    if not isinstance(pre, dict) or depth > 8:
        return None
    if pre.get("type") == "Split" and isinstance(pre.get("pattern"), dict) and "Regex" in pre["pattern"]:
        return pre["pattern"]["Regex"]
    subs = pre.get("pretokenizers")
    for p in subs if isinstance(subs, list) else []:
        found = _split_pattern(p, depth + 1)
        if found is not None:
            return found
    return None


def tokenizer_files(tok: Tokenizer, context: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as text."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
    }
    return {
        "tokenizer.json": hf_tokenizer(tok).to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "chat_template.jinja": CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------- the commands
def remote_state_dict(state: dict, config: GPTConfig) -> dict:
    """Our state dict for the remote-code model: our names, vocab rows cut to the real vocabulary."""
    out = {}
    for name, t in state.items():
        name = name.replace("_orig_mod.", "")
        if name in _VOCAB_ROWS or name.startswith("value_embeds."):
            t = t[: config.vocab_size]
        out[name] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def remote_config(config: GPTConfig, tok: Tokenizer) -> dict:
    """config.json of the remote-code model: our GPTConfig's fields, and where its code is."""
    eos = tok.encode_special("<|assistant_end|>")
    return {
        "architectures": ["RustchatForCausalLM"],
        "model_type": _REMOTE_TYPE,
        "auto_map": {
            "AutoConfig": "configuration_rustchat.RustchatConfig",
            "AutoModelForCausalLM": "modeling_rustchat.RustchatForCausalLM",
        },
        **config.to_dict(),
        "softcap": SOFTCAP,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "use_cache": True,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def transformers_builtin(cfg: GPTConfig) -> bool:
    """Whether transformers' built-in NanoChat holds this architecture; else the export carries
    rustchat's own modeling code and loads with trust_remote_code=True."""
    return cfg.arch == "classic"


def export_model(model, tok: Tokenizer, out, *, source: str = "", step: int | None = None) -> Path:
    """Write `model` and `tok` as a transformers directory at `out`: the built-in NanoChat for
    the classic architecture, else our own modeling code (rustchat/hf_remote/) beside the
    weights, loaded with trust_remote_code=True."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if cfg.vocab_size != tok.vocab_size:
        raise RustchatError(f"model vocab {cfg.vocab_size} differs from the tokenizer's {tok.vocab_size}")
    builtin = transformers_builtin(cfg)
    # where the weights came from, readable back by import-hf (safetensors metadata is str -> str)
    provenance = {"format": "pt", "rustchat_source": source, "rustchat_step": "" if step is None else str(step)}
    weights = to_hf_state_dict(model.state_dict(), cfg) if builtin else remote_state_dict(model.state_dict(), cfg)
    save_file(weights, str(out / _MODEL_FILE), metadata=provenance)
    eos = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]  # where rustchat's engine stops
    files = {} if builtin else {f.name: f.read_text(encoding="utf-8") for f in sorted(_REMOTE_CODE.glob("*.py"))}
    files |= {
        "config.json": json.dumps(hf_config(cfg, tok) if builtin else remote_config(cfg, tok), indent=2),
        "generation_config.json": json.dumps(
            {"bos_token_id": tok.bos_token_id, "eos_token_id": eos, "pad_token_id": eos[0]}, indent=2
        ),
        **tokenizer_files(tok, cfg.sequence_len),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    # safetensors creates its file 0600; the directory is for others to load: mode of its siblings
    os.chmod(out / _MODEL_FILE, (out / "config.json").stat().st_mode & 0o777)
    return out


def run_export(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RustchatError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise RustchatError(f"--out {out} is not empty; pass --force to write into it")
    check_writable(out, "--out")  # before the model is loaded and converted
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    export_model(model, tok, out, source=cfg.source, step=meta.get("step"))
    c = model.config
    remote = "" if transformers_builtin(c) else ", trust_remote_code=True"
    print(
        f"exported {cfg.source} d{c.n_layer} step {meta.get('step')} ({model.num_params() / 1e6:.1f}M params) -> "
        f"{out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})"
    )
    return out


def _member(d: Path, name: str, what: str) -> Path | None:
    """d/name when it exists (a dangling symlink counts), checked to resolve inside d; else None."""
    p = d / name
    if not os.path.lexists(p):
        return None
    inside_dir(d, p, what)
    return p


def load_hf_dir(hf_dir) -> tuple[object, Tokenizer, dict]:
    """A transformers NanoChat directory -> (our GPT on the CPU, Tokenizer, provenance).

    Reads only files inside the directory (symlinks and index entries resolving elsewhere are
    refused), and checks before it allocates: config.json's sizes, the tokenizer, and every
    safetensors header (offsets, dtypes, shapes against the config) before any tensor is read."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise RustchatError(f"{d}: no such directory")
    cfg_path = _member(d, "config.json", "config.json")
    if cfg_path is None:
        raise RustchatError(f"{d}: no config.json (not a transformers model directory)")
    hf_cfg = read_json_object(cfg_path, "config.json", _MAX_CONFIG_BYTES)
    remote = hf_cfg.get("model_type") == _REMOTE_TYPE
    if remote:
        config = check_model_config({k: v for k, v in hf_cfg.items() if k in _GPT_FIELDS}, cfg_path)
    else:
        config = gpt_config_from_hf(hf_cfg, cfg_path)
    tok_path = _member(d, "tokenizer.json", "tokenizer.json")
    if tok_path is None:
        raise RustchatError(f"{d}: no tokenizer.json")
    tok = tokenizer_from_hf_json(tok_path)
    if tok.vocab_size > config.vocab_size:
        raise RustchatError(f"{tok_path} has {tok.vocab_size} ids but config.json's vocab_size is {config.vocab_size}")
    rows = (tok.vocab_size, config.vocab_size)  # what a vocabulary tensor may hold
    # the model's rows past the tokenizer's ids are padding that no id can reach
    config = GPTConfig(**{**config.to_dict(), "vocab_size": tok.vocab_size})
    hf_state, provenance = _read_safetensors(d, _expected_shapes(config, remote), rows)
    # the remote-code model's weights have our names: they go in as a nanochat state dict does
    state = convert_state_dict(hf_state, config) if remote else from_hf_state_dict(hf_state, config)
    model = build_model_from_meta({"model_config": config.to_dict()}, "cpu", state)
    return model, tok, provenance


def _expected_shapes(config: GPTConfig, remote: bool) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the directory must hold (vocabulary tensors: any row count)."""
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in GPT(config, init=False).state_dict().items()}
    if remote:
        return ours
    theirs = {ours_name: hf for hf, ours_name in _hf_to_ours(config).items()}
    return {theirs[k]: shape for k, shape in ours.items()}


def _hf_to_ours(config: GPTConfig) -> dict[str, str]:
    out = {v: k for k, v in _VOCAB_ROWS.items()}
    for i in range(config.n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = f"transformer.h.{i}.{ours}.weight"
    return out


def _weight_files(d: Path) -> tuple[list[Path], dict | None, Path]:
    """The safetensors files to read (each inside d), the index's weight_map (or None) and the
    file that named them."""
    single = _member(d, _MODEL_FILE, "weights file")
    if single is not None:
        return [single], None, single
    index = _member(d, _INDEX_FILE, "safetensors index")
    if index is None:
        raise RustchatError(f"{d}: no {_MODEL_FILE} or {_INDEX_FILE} (only safetensors weights are read)")
    weight_map = read_json_object(index, "safetensors index", _MAX_INDEX_BYTES).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) and v for v in weight_map.values())):
        raise RustchatError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
    names = sorted(set(weight_map.values()))
    if len(names) > _MAX_SHARDS:
        raise RustchatError(f"{index}: names {len(names)} weight files, more than the {_MAX_SHARDS} an import reads")
    files = []
    for name in names:
        p = d / name
        inside_dir(d, p, f"weight_map entry {name!r}", where=index)
        if not p.is_file():
            raise RustchatError(f"{index}: weight file {name!r} is missing")
        files.append(p)
    return files, weight_map, index


def _read_safetensors(d: Path, expected: dict, rows: tuple[int, int]) -> tuple[dict, dict]:
    """Every tensor of d's safetensors weights, after every header has been checked: its
    offsets, its dtypes (floating point) and its tensors against `expected` (names and
    shapes; vocabulary tensors may have rows[0]..rows[1] rows) and the index."""
    files, weight_map, named_by = _weight_files(d)
    headers, where, provenance = {}, {}, {}
    for f in files:
        tensors, meta = safetensors_header(f)
        headers[f] = tensors
        provenance.update(meta)
        for name, (dtype, shape) in tensors.items():
            if name in where:
                raise RustchatError(f"{f}: tensor {name!r} is also in {where[name].name}")
            where[name] = f
            if weight_map is not None and (weight_map.get(name) is None or d / weight_map[name] != f):
                raise RustchatError(f"{f}: holds tensor {name!r}, which {_INDEX_FILE} puts in {weight_map.get(name)!r}")
            bare = name.replace("_orig_mod.", "")
            want = expected.get(bare)
            if want is None:
                raise RustchatError(f"{f}: unexpected tensor {name!r} (not in the model config.json describes)")
            if dtype not in _WEIGHT_DTYPES:
                raise RustchatError(f"{f}: tensor {name!r} is {dtype}; weights must be one of {sorted(_WEIGHT_DTYPES)}")
            vocab = bare in _VOCAB_ROWS.values() or bare in _VOCAB_ROWS or bare.startswith("value_embeds.")
            ok = (
                len(shape) == len(want) and shape[1:] == want[1:] and rows[0] <= shape[0] <= rows[1]
                if vocab
                else shape == want
            )
            if not ok:
                need = f"({rows[0]}..{rows[1]}, {', '.join(map(str, want[1:]))})" if vocab else str(want)
                raise RustchatError(f"{f}: tensor {name!r} has shape {shape}, but config.json needs {need}")
    missing = sorted(set(expected) - {n.replace("_orig_mod.", "") for n in where})
    if missing:
        raise RustchatError(
            f"{named_by}: lacks {len(missing)} tensor(s) the model in config.json needs (first: {missing[:3]})"
        )
    if weight_map is not None and set(weight_map) != set(where):
        extra = sorted(set(weight_map) - set(where))[:3]
        raise RustchatError(f"{named_by}: weight_map names tensors no weight file holds (first: {extra})")
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for what the checks missed
            raise RustchatError(f"{f}: not a valid safetensors file: {type(e).__name__}: {e}") from None
    return state, provenance


def _recorded_step(provenance: dict, d: Path) -> int:
    """The step `export` recorded in the weights' metadata (none: 0); a recorded value that is
    not a step in 0..MAX_STEP is refused, with the way round it."""
    recorded = provenance.get("rustchat_step", "")
    if recorded == "":
        return 0
    if re.fullmatch(r"[0-9]{1,13}", recorded) and int(recorded) <= MAX_STEP:
        return int(recorded)
    shown = repr(recorded) if len(recorded) <= 40 else f"{recorded[:20]!r}... ({len(recorded)} chars)"
    weights = d / _MODEL_FILE if os.path.lexists(d / _MODEL_FILE) else d / _INDEX_FILE
    raise RustchatError(
        f"{weights}: metadata rustchat_step={shown} is not a step in 0..{MAX_STEP}; pass --step N to record another"
    )


def import_hf(cfg: ImportHFConfig) -> Path:
    """Write a transformers NanoChat directory as a checkpoint of `cfg.stage` plus the base dir's tokenizer."""
    if cfg.step is not None:
        check_count("--step", cfg.step, 0, MAX_STEP)
    base = check_writable(Path(cfg.base_dir) if cfg.base_dir else get_base_dir(create=False), "--base-dir")
    model, tok, provenance = load_hf_dir(cfg.hf_dir)
    step = cfg.step if cfg.step is not None else _recorded_step(provenance, Path(cfg.hf_dir))
    depth = model.config.n_layer
    out = stage_dir(cfg.stage, depth, base)
    tok_dir = base / "tokenizer"
    replaced = []
    if (tok_dir / "tokenizer.json").is_file() and not _same_tokenizer(tok_dir, tok):
        replaced.append(f"the different tokenizer in {tok_dir}")
    if find_last_step(out) is not None:
        replaced.append(f"the {cfg.stage} checkpoints in {out}")
    if replaced and not cfg.force:
        raise RustchatError(f"import-hf would replace {' and '.join(replaced)}; pass --force to replace them")
    if out.is_dir():  # --force (or only incomplete files): the import becomes the stage's only checkpoint
        for f in out.iterdir():
            if re.fullmatch(r"(model|meta|optim)_\d+.*\.(safetensors|json|pt)", f.name):
                f.unlink()
    tok.save(tok_dir)
    save_checkpoint(
        out,
        step,
        model,
        None,
        {"imported_from": str(Path(cfg.hf_dir).resolve()), "stage": cfg.stage, "hf_provenance": provenance},
    )
    print(
        f"imported {cfg.hf_dir} (depth {depth}, {model.num_params() / 1e6:.1f}M params) as {cfg.stage} step {step} "
        f"-> {out}; tokenizer -> {tok_dir}"
    )
    return out


def _same_tokenizer(tok_dir: Path, tok: Tokenizer) -> bool:
    try:
        old = Tokenizer.load(tok_dir)
    except (OSError, ValueError):
        return False
    return (
        old.pattern == tok.pattern
        and old.special_tokens == tok.special_tokens
        and old.mergeable_ranks() == tok.mergeable_ranks()
    )


__all__ = [
    "export_model",
    "run_export",
    "import_hf",
    "load_hf_dir",
    "hf_tokenizer",
    "hf_config",
    "CHAT_TEMPLATE",
    "to_hf_state_dict",
    "from_hf_state_dict",
    "tokenizer_from_hf_json",
]
