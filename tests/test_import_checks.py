"""`rustchat import-hf` and `rustchat import-nanochat` on hostile directories (issue 25, items 3-5):
they read only files inside the directory they are given, check every size and every
safetensors header before allocating anything, and refuse split patterns the engine cannot run
in bounded time; every refusal is one line "rustchat: error: <file>: <problem>" and exit 2."""

import json
import os
import pickle
import shutil
import struct

import pytest
import tiktoken

from rustchat import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from rustchat.checkpoint import MAX_STEP, load_stage_model
from rustchat.cli import main
from rustchat.export import export_model
from rustchat.model import GPT, GPTConfig
from helpers import fake_nanochat_dir

TEXT = "The quick brown fox jumps over the lazy dog, again and again; it's 2024 and 1234 foxes agree.\n" * 40


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid export (classic: transformers' built-in NanoChat config), step 7."""
    tok = Tokenizer.train([TEXT], vocab_size=300)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    out = tmp_path_factory.mktemp("good") / "model"
    export_model(model.eval(), tok, out, source="sft", step=7)
    return out


@pytest.fixture
def hf(good, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(good, d)
    return d


def _refused(argv, capsys, *expected) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rustchat: error: ") and err.count("\n") == 1, err
    for e in expected:
        assert e in err, err
    return err


def _import(d, tmp_path, capsys, *expected, extra=()):
    return _refused(["import-hf", str(d), "--base-dir", str(tmp_path / "base"), *extra], capsys, *expected)


def _config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_the_valid_export_imports(hf, tmp_path):
    assert main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base")]) == 0
    assert load_stage_model("base", 2, base_dir=tmp_path / "base")[2]["step"] == 7


# ----------------------------------------------------------------------------- item 3: containment
def test_the_sharded_form_imports(hf, tmp_path):
    (hf / "model.safetensors").rename(hf / "part-1.safetensors")
    from rustchat.checkpoint import safetensors_header

    names = list(safetensors_header(hf / "part-1.safetensors")[0])
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "part-1.safetensors")})
    )
    assert main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base")]) == 0


@pytest.mark.parametrize("target", ["../" * 4 + "etc/shadow", "/etc/shadow", "../outside.safetensors"])
def test_an_index_naming_a_file_outside_is_refused(hf, tmp_path, capsys, target):
    (tmp_path / "outside.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    (hf / "model.safetensors").rename(hf / "part-1.safetensors")
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": target, "lm_head.weight": "part-1.safetensors"}})
    )
    _import(
        hf, tmp_path, capsys, f"{hf / 'model.safetensors.index.json'}: weight_map entry {target!r} resolves", "outside"
    )


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "model.safetensors.index.json"])
def test_a_symlink_out_of_the_directory_is_refused(hf, tmp_path, capsys, name):
    outside = tmp_path / f"elsewhere-{name}"
    if name == "model.safetensors.index.json":
        (hf / "model.safetensors").rename(hf / "part-1.safetensors")
        outside.write_text(json.dumps({"weight_map": {"lm_head.weight": "part-1.safetensors"}}))
    else:
        shutil.move(hf / name, outside)
    (hf / name).symlink_to(outside)
    err = _import(hf, tmp_path, capsys, f"{hf / name}: ", "(a symlink) resolves to", "outside")
    assert str(outside) in err


def test_symlinks_to_etc_shadow_are_refused_and_links_inside_followed(hf, tmp_path, capsys):
    (hf / "model.safetensors").rename(hf / "weights.bin")
    (hf / "model.safetensors").symlink_to("/etc/shadow")
    _import(hf, tmp_path, capsys, "model.safetensors: weights file (a symlink) resolves to /etc/shadow")
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").symlink_to("weights.bin")  # a link that stays inside is fine
    (hf / "config.json").rename(hf / "c.json")
    (hf / "config.json").symlink_to(hf / "c.json")
    assert main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base")]) == 0


# ----------------------------------------------------------------------------- item 4: config.json
@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("num_hidden_layers", 10**9, "num_hidden_layers=1000000000 must be an integer in 1..1024"),
        ("hidden_size", 2**40, "hidden_size=1099511627776 must be an integer in 1..65536"),
        ("hidden_size", -32, "hidden_size=-32 must be an integer in 1..65536"),
        ("num_attention_heads", 0, "num_attention_heads=0 must be an integer in 1..1024"),
        ("hidden_size", 128.9, "hidden_size=128.9 must be an integer"),
        ("hidden_size", 32.0, "hidden_size=32.0 must be an integer"),
        ("num_hidden_layers", True, "num_hidden_layers=True must be an integer"),
        ("vocab_size", "300", "vocab_size='300' must be an integer"),
        ("num_key_value_heads", 1.5, "num_key_value_heads=1.5 must be an integer"),
        ("max_position_embeddings", 10**30, "max_position_embeddings=1000000000000000000000000000000 must be"),
        ("rope_parameters", [1], "rope_parameters is a JSON list"),
        ("num_attention_heads", 3, "head_dim is 16; rustchat's GPT needs 10"),
    ],
)
def test_config_sizes_are_checked_before_anything_is_allocated(hf, tmp_path, capsys, field, value, expected):
    _config(hf, **{field: value})
    _import(hf, tmp_path, capsys, f"{hf / 'config.json'}: ", expected)


def test_config_json_limits(hf, tmp_path, capsys):
    (hf / "config.json").write_text('{"model_type": "nanochat", "hidden_size": ' + "9" * 5000 + "}")
    _import(hf, tmp_path, capsys, "config.json: cannot read config.json", "4300")
    with open(hf / "config.json", "wb") as f:  # sparse: refused by its size, never read
        f.truncate(64 << 20)
    _import(hf, tmp_path, capsys, "config.json is 67108864 bytes, more than the 4194304")
    (hf / "config.json").write_text("[1, 2]")
    _import(hf, tmp_path, capsys, "config.json is a JSON list, expected an object")
    (hf / "config.json").write_text("{not json")
    _import(hf, tmp_path, capsys, "config.json is not valid JSON")


def test_a_config_that_disagrees_with_the_weights_is_refused_before_loading(hf, tmp_path, capsys):
    _config(hf, num_hidden_layers=3)  # a layer the file does not hold
    _import(hf, tmp_path, capsys, "model.safetensors: lacks 6 tensor(s) the model in config.json needs")
    _config(hf, num_hidden_layers=1)
    _import(hf, tmp_path, capsys, "model.safetensors: unexpected tensor 'model.layers.1.")
    _config(hf, num_hidden_layers=2, hidden_size=64, intermediate_size=256, head_dim=32)
    _import(hf, tmp_path, capsys, "model.safetensors: tensor ", "but config.json needs")


# ----------------------------------------------------------------------------- item 4: safetensors headers
def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path, header, data, n=None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)


def _lie(hf, how):
    header, data = _header(hf / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    how(header, name)
    return header, data


@pytest.mark.parametrize(
    "lie,expected",
    [
        (lambda h, k: h[k].update(data_offsets=[0, 1 << 40]), "spans bytes 0..1099511627776"),
        (lambda h, k: h[k].update(shape=[1 << 40, 1 << 40]), "needs"),
        (lambda h, k: h[k].update(shape=[-1, 32]), "malformed header entry"),
        (lambda h, k: h[k].update(dtype="Q99"), "malformed header entry"),
        (lambda h, k: h[k].update(dtype="I32"), "is I32; weights must be one of"),
        (lambda h, k: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}), "overlaps"),
        (lambda h, k: h.update(__metadata__={"a": 1}), "__metadata__ is not an object of strings"),
    ],
)
def test_safetensors_header_lies_are_refused(hf, tmp_path, capsys, lie, expected):
    header, data = _lie(hf, lie)
    _write(hf / "model.safetensors", header, data)
    _import(hf, tmp_path, capsys, f"{hf / 'model.safetensors'}: ", expected)


def test_safetensors_framing_lies_are_refused(hf, tmp_path, capsys):
    f = hf / "model.safetensors"
    header, data = _header(f)
    _write(f, header, data[:-4])  # truncated
    _import(hf, tmp_path, capsys, "not a valid safetensors file", "truncated")
    _write(f, header, data, n=1 << 62)  # absurd header length
    _import(hf, tmp_path, capsys, "not a valid safetensors file: header length 4611686018427387904 does not fit")
    f.write_bytes(struct.pack("<Q", 5) + b"{oops" + data)
    _import(hf, tmp_path, capsys, "not a valid safetensors file")
    f.write_bytes(b"abc")
    _import(hf, tmp_path, capsys, "too short for a safetensors header")
    _write(f, header, data + b"\0" * 4)  # bytes past the last tensor
    _import(hf, tmp_path, capsys, "the tensors need")


# ----------------------------------------------------------------------------- item 4: the step
def test_a_recorded_step_is_checked(hf, tmp_path, capsys):
    header, data = _header(hf / "model.safetensors")
    header["__metadata__"]["rustchat_step"] = "9" * 5000
    _write(hf / "model.safetensors", header, data)
    _import(
        hf,
        tmp_path,
        capsys,
        "model.safetensors: metadata rustchat_step='99999999999999999999'... (5000 chars) is not a step",
        "--step N",
    )
    assert main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base"), "--step", "5"]) == 0
    with pytest.raises(SystemExit) as e:  # argparse's own one-line refusal
        main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base"), "--step", "9" * 5000])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --step: invalid int value" in err and err.count("\n") <= 2, err


def test_a_step_past_max_step_is_refused_from_python(hf, tmp_path):
    from rustchat.common import OutOfRangeError
    from rustchat.config import ImportHFConfig
    from rustchat.export import import_hf

    with pytest.raises(OutOfRangeError, match="--step"):
        import_hf(ImportHFConfig(hf_dir=str(hf), base_dir=str(tmp_path / "b"), step=MAX_STEP + 1))


# ----------------------------------------------------------------------------- item 5: split patterns
def _set_pattern(d, pattern):
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
    (d / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize(
    "pattern,expected",
    [
        (r"(?:a|aa)+(?=b)|\w+|\s+|.", "Max limit for backtracking"),
        (r"(?:\w+\s?)+(?=\d)|\S|\s", "Max limit for backtracking"),
        (r"a(?=a*!)|.", "takes over 1 s"),
    ],
)
def test_a_backtracking_split_pattern_is_refused_at_import(hf, tmp_path, capsys, pattern, expected):
    _set_pattern(hf, pattern)
    _import(hf, tmp_path, capsys, f"{hf / 'tokenizer.json'}: split pattern", expected)


def test_a_linear_custom_split_pattern_imports(hf, tmp_path):
    _set_pattern(hf, r"\w+|\s+|[^\w\s]+")
    assert main(["import-hf", str(hf), "--base-dir", str(tmp_path / "base")]) == 0


def test_check_split_bounded_accepts_the_shipped_patterns():
    ranks = {bytes([i]): i for i in range(256)}
    for pattern in (SPLIT_PATTERN, r"\w+|\s+|.", r"'s|'t|\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"):
        Tokenizer.from_ranks(ranks, pattern, {"<|bos|>": 256}).check_split_bounded()


# ----------------------------------------------------------------------------- import-nanochat
def _nanochat(tmp_path, pattern=SPLIT_PATTERN):
    ck = tmp_path / "ck"
    ck.mkdir()
    fake_nanochat_dir(ck, 300, "_orig_mod.")
    ranks = {bytes([b]): b for b in range(256)}
    pairs = [(a + b).encode() for a in "etaoinshrdlucmfw" for b in "etaoinshrdlucmfw"][:35]
    ranks.update({t: 256 + i for i, t in enumerate(pairs)})
    specials = {name: 291 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("x", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    (ck / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    return ck


def _nano(ck, tmp_path, capsys, *expected, extra=()):
    return _refused(["import-nanochat", str(ck), "--base-dir", str(tmp_path / "base"), *extra], capsys, *expected)


def test_import_nanochat_refuses_symlinks_out(tmp_path, capsys):
    ck = _nanochat(tmp_path)
    assert main(["import-nanochat", str(ck), "--base-dir", str(tmp_path / "ok")]) == 0
    for name in ("model_000650.pt", "meta_000650.json", "tokenizer.pkl"):
        shutil.move(ck / name, tmp_path / name)
        (ck / name).symlink_to(tmp_path / name)
        _nano(ck, tmp_path, capsys, f"{ck / name}: ", "(a symlink) resolves to", "outside")
        (ck / name).unlink()
        shutil.move(tmp_path / name, ck / name)


def test_import_nanochat_refuses_an_oversized_meta_and_a_huge_step(tmp_path, capsys):
    ck = _nanochat(tmp_path)
    meta = ck / "meta_000650.json"
    with open(meta, "ab") as f:
        f.truncate(64 << 20)
    _nano(ck, tmp_path, capsys, "meta_000650.json: nanochat meta is 67108864 bytes, more than the 16777216")
    meta.write_text('{"model_config": {"n_layer": ' + "9" * 5000 + "}}")
    _nano(ck, tmp_path, capsys, "meta_000650.json: cannot read nanochat meta")
    (ck / "model_000650.pt").rename(ck / ("model_" + "9" * 240 + ".pt"))  # as long as a file name goes
    _nano(ck, tmp_path, capsys, "no nanochat model_<step>.pt")


def test_import_nanochat_refuses_a_backtracking_split_pattern(tmp_path, capsys):
    ck = _nanochat(tmp_path, pattern=r"(?:a|aa)+(?=b)|\w+|\s+|.")
    _nano(ck, tmp_path, capsys, "tokenizer.pkl: not a usable tokenizer", "Max limit for backtracking")


def test_nothing_outside_is_opened(hf, tmp_path, capsys):
    """The refusal comes before any open() of the target: a FIFO outside would hang otherwise."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").symlink_to(fifo)
    _import(hf, tmp_path, capsys, "resolves to", "outside")
