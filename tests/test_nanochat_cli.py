"""`rustchat import-nanochat`: a nanochat checkpoint dir + tokenizer.pkl (a pickled tiktoken
Encoding) become a rustchat checkpoint and tokenizer; the pickle is read without running code."""

import json
import os
import shutil
import pickle
import subprocess
import sys

import pytest
import tiktoken
import torch

from rustchat import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from rustchat.checkpoint import load_stage_model
from rustchat.common import RustchatError
from rustchat.nanochat_import import load_nanochat_tokenizer
from ref_gpt import ref_forward
from helpers import fake_nanochat_dir


def _nanochat_tokenizer_pickle(path, n_merges=35):
    """A 300-id tiktoken Encoding like nanochat's (256 bytes + merges + 9 specials), pickled."""
    ranks = {bytes([b]): b for b in range(256)}
    letters = "etaoinshrdlucmfw"
    pairs = [(a + b).encode() for a in letters for b in letters][:n_merges]
    for i, t in enumerate(pairs):
        ranks[t] = 256 + i
    specials = {name: 256 + n_merges + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    path.write_bytes(pickle.dumps(enc))
    return Tokenizer.from_ranks(ranks, SPLIT_PATTERN, specials), enc


def test_tokenizer_pickle_loads_without_code(tmp_path):
    tok, enc = _nanochat_tokenizer_pickle(tmp_path / "tokenizer.pkl")
    ours = load_nanochat_tokenizer(tmp_path / "tokenizer.pkl")
    assert ours.mergeable_ranks() == tok.mergeable_ranks() and ours.special_tokens == tok.special_tokens
    text = "hello lorem, the cat sat on a mat!"
    assert ours.encode_ordinary(text) == enc.encode_ordinary(text)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_tokenizer_pickle_refuses_other_globals(tmp_path):
    p = tmp_path / "tokenizer.pkl"
    marker = tmp_path / "pwned"
    p.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(RustchatError, match="refusing to load global"):
        load_nanochat_tokenizer(p)
    assert not marker.exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_import_nanochat_cli_then_logits_match_reference(tmp_path):
    ck = tmp_path / "base_checkpoints" / "d2"
    ck.mkdir(parents=True)
    sd, cfg = fake_nanochat_dir(ck, 300, "_orig_mod.")
    (tmp_path / "tokenizer").mkdir()
    _nanochat_tokenizer_pickle(tmp_path / "tokenizer" / "tokenizer.pkl")
    base = tmp_path / "rc"
    r = subprocess.run(
        [sys.executable, "-m", "rustchat.cli", "import-nanochat", str(ck), "--stage", "mid"],
        capture_output=True,
        text=True,
        env={**os.environ, "RUSTCHAT_BASE_DIR": str(base)},
    )
    assert r.returncode == 0, r.stderr
    model, _, meta = load_stage_model("mid", 2, base_dir=base)
    assert meta["step"] == 650 and "imported_from" in meta
    assert Tokenizer.load(base / "tokenizer").vocab_size == 300
    idx = torch.randint(0, 300, (2, 10))
    assert model.config.rope_bf16  # January's nanochat (48abd7d) keeps its rotary tables in bf16
    ref = ref_forward({k: v.double() for k, v in sd.items()}, {**cfg, "rope_bf16": True}, idx)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(idx), ref, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- fixtures
# checkpoints and logits written by nanochat's own code (scripts/make_nanochat_fixtures.py), one
# directory per commit: nanochat_48abd7d (January 2026, classic) and nanochat_92d63d4 (July 2026);
# tests/fixtures/README.md says how each was made
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture_dir(tmp_path, version):
    ck = tmp_path / "base_checkpoints" / "d3"
    shutil.copytree(os.path.join(FIXTURES, f"nanochat_{version}"), ck)
    (tmp_path / "tokenizer").mkdir()
    _nanochat_tokenizer_pickle(tmp_path / "tokenizer" / "tokenizer.pkl")
    return ck


def _import(ck, base):
    return subprocess.run(
        [sys.executable, "-m", "rustchat.cli", "import-nanochat", str(ck)],
        capture_output=True,
        text=True,
        env={**os.environ, "RUSTCHAT_BASE_DIR": str(base)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("version,arch", [("92d63d4", "2026"), ("48abd7d", "classic")])
def test_nanochat_checkpoints_import_with_nanochats_logits(tmp_path, version, arch):
    """Both nanochat commits (92d63d4: the 2026 model, 48abd7d: classic): the CLI import, then fp32
    CPU logits within 1e-3 of nanochat's own forward on ids longer than the short window, and equal
    to our float64 reference."""
    ck = _fixture_dir(tmp_path, version)
    r = _import(ck, tmp_path / "rc")
    assert r.returncode == 0, r.stderr
    model, _, meta = load_stage_model("base", 3, base_dir=tmp_path / "rc")
    assert model.config.arch == arch and meta["step"] == 100
    expected = torch.load(ck / "expected.pt", weights_only=True)
    ids = expected["ids"]
    assert ids.size(1) > 128  # past the 2026 model's short window
    with torch.no_grad():
        logits = model.float().eval()(ids)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-3)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    ref = ref_forward(weights, model.config.to_dict(), ids)
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_nanochat_refusals_name_the_field_or_tensor(tmp_path):
    ck = _fixture_dir(tmp_path, "92d63d4")
    meta_path = ck / "meta_000100.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["attn_softcap"] = 30
    meta_path.write_text(json.dumps(meta))
    r = _import(ck, tmp_path / "rc")
    assert r.returncode == 2 and "'attn_softcap'" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    del meta["model_config"]["attn_softcap"]
    meta["model_config"]["window_pattern"] = "SXL"
    meta_path.write_text(json.dumps(meta))
    r = _import(ck, tmp_path / "rc")
    assert r.returncode == 2 and "window_pattern" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    meta["model_config"]["window_pattern"] = "SSSL"
    meta_path.write_text(json.dumps(meta))
    sd = torch.load(ck / "model_000100.pt", weights_only=True)
    sd["_orig_mod.transformer.h.0.attn.gate.weight"] = torch.zeros(2, 12)
    del sd["_orig_mod.smear_lambda"]
    torch.save(sd, ck / "model_000100.pt")
    r = _import(ck, tmp_path / "rc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "smear_lambda" in r.stderr and "transformer.h.0.attn.gate.weight" in r.stderr
