"""`rustchat export` writes a directory that the installed `transformers` loads as its built-in
NanoChat architecture, and `rustchat import-hf` reads it back. Checked against transformers
itself: logits, tokenizer ids and decoding, the chat template, greedy generation; then the
round trip into a fresh base dir and an SFT step from it."""

import contextlib
import io
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import rustchat  # noqa: E402
from rustchat import Tokenizer  # noqa: E402
from rustchat.checkpoint import load_stage_model, save_checkpoint, stage_dir  # noqa: E402
from rustchat.cli import main  # noqa: E402
from rustchat.config import STAGE_CONFIGS  # noqa: E402
from rustchat.conversation import render_conversation, render_for_completion  # noqa: E402
from rustchat.engine import Engine  # noqa: E402
from rustchat.model import ARCHS, GPT, GPTConfig  # noqa: E402
from rustchat.stages import train_sft  # noqa: E402

SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we've got 1234567890 reasons!",
    "机器学习是人工智能的一个分支。我们今天学习了很多新东西，明天继续。",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "emoji 🎉🎉 👩‍👩‍👧 🇫🇷 ok ✨",
    "runs    of     spaces\n\n\n   and tabs\t\t\t and 000111222333444555 digits 3.14159",
    "  leading and trailing spaces   ",
    "mixed: café naïve Ünïcödé — “quotes” … ½ ∑ αβγ Привет мир",
]
STEP = 7


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = list("abcdefgh XYZ 0123456789 \n\t.,;'\"-_()[]{}") + [
        "的",
        "是",
        "🎉",
        "é",
        "ß",
        "  ",
        "\r\n",
        "'s",
        "'LL",
    ]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module", params=["classic", "2026"])
def exported(tmp_path_factory, corpus, request):
    """(base dir, export dir, rustchat model, tokenizer): a small trained tokenizer and a depth-2
    GQA model with random non-zero weights, saved as an SFT checkpoint and exported by the CLI.
    Classic: transformers' built-in NanoChat; 2026: our remote code, with a context of 192 so
    its short window (128) is crossed."""
    base = tmp_path_factory.mktemp("export_base")
    texts = [corpus[k][:150_000] for k in corpus] + SAMPLES * 20
    tok = Tokenizer.train(texts, vocab_size=900)
    tok.save(base / "tokenizer")
    seq = 64 if request.param == "classic" else 192
    cfg = GPTConfig(
        sequence_len=seq, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **ARCHS[request.param]
    )
    model = GPT(cfg)
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # padded vocab rows get values too: the export must cut them, never show them
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lm_head" in name or "wte" in name else 0.2))
    save_checkpoint(stage_dir("sft", 2, base), STEP, model, None, {"stage": "sft"})
    out = tmp_path_factory.mktemp("export_hf") / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "-i", "sft", "--base-dir", str(base), "--out", str(out)]) == 0
    EXPORT_LINES[out] = printed.getvalue()
    return base, out, model.eval(), tok


EXPORT_LINES = {}  # export dir -> what the command printed


def test_the_printed_load_call_loads_the_export(exported):
    """The command ends with the transformers call that loads what it wrote; run that call as printed."""
    _, out, ref, _ = exported
    call = EXPORT_LINES[out].strip().rsplit("load it with ", 1)[1]
    hf = eval(call, {"transformers": transformers})  # noqa: S307 - the text our own command printed
    ids = torch.randint(0, ref.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ref(ids), atol=1e-3, rtol=1e-3)


def test_exported_files_are_all_readable_by_others(exported):
    import stat

    _, out, _, _ = exported
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044 == 0o044, modes


def test_load_model_returns_fp32_logits(exported):
    base, _, ref, tok = exported
    model, tok2, meta = rustchat.load_model("sft", base_dir=base)
    assert meta["step"] == STEP and tok2.vocab_size == tok.vocab_size and not model.training
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == torch.float32 and logits.shape == (2, 12, tok.vocab_size)
        torch.testing.assert_close(logits, ref(ids))
        # under bf16 autocast the matmuls run in bf16, the logits still come back fp32
        for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            m = model.to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16):
                out = m(ids.to(dev))
            assert out.dtype == torch.float32
            # (the 2026 model's value embeddings and lambdas carry more bf16 rounding)
            torch.testing.assert_close(
                out.cpu(), logits, atol=0.3 if model.config.arch == "classic" else 0.6, rtol=0.05
            )
        model.to("cpu")


def _load(out, **kw):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kw)


def test_config_is_transformers_builtin_nanochat_or_our_remote_code(exported):
    _, out, ref, _ = exported
    cfg = json.loads((out / "config.json").read_text())
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    }
    if ref.config.arch == "classic":
        assert cfg["model_type"] == "nanochat" and "auto_map" not in cfg
        hf = AutoModelForCausalLM.from_pretrained(out)
        assert type(hf).__name__ == "NanoChatForCausalLM"
        assert type(hf).__module__.startswith("transformers.models.nanochat")
    else:
        assert cfg["model_type"] == "rustchat" and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert (out / "modeling_rustchat.py").is_file() and (out / "configuration_rustchat.py").is_file()
        hf = _load(out)
        assert type(hf).__name__ == "RustchatForCausalLM" and hf.config.window_pattern == "SSSL"
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4
    # the export cuts the padded vocab rows of every vocab-sized tensor
    cut = sum(p.numel() // p.size(0) for n, p in ref.named_parameters() if p.size(0) == ref.config.padded_vocab_size)
    assert hf.num_parameters() == ref.num_params() - (ref.config.padded_vocab_size - ref.config.vocab_size) * cut


def test_logits_match_transformers(exported):
    _, out, ref, tok = exported
    hf = _load(out, dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (3, ref.config.sequence_len))  # past the 2026 short window
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        ours = ref(ids)
    assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
    assert ours.std() > 1.0  # random weights, non-trivial logits
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)


def test_tokenizer_ids_and_decoding_match(exported, corpus):
    _, out, _, tok = exported
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == tok.vocab_size
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    texts = list(SAMPLES) + [_random_text(rng, rng.randint(1, 200)) for _ in range(300)]
    for text in corpus.values():  # real text, cut at random places
        for _ in range(20):
            a = rng.randrange(len(text))
            texts.append(text[a : a + rng.randint(1, 2000)])
    texts += ["".join(chr(rng.randint(32, 0x2FFFF)) for _ in range(rng.randint(1, 40))) for _ in range(100)]
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # no lone surrogates
    for text in texts:
        ours = tok.encode_ordinary(text)
        assert hf_tok(text)["input_ids"] == ours, (seed, text)
        assert hf_tok.decode(ours) == text, (seed, text)
    specials = tok.special_tokens
    assert hf_tok.convert_tokens_to_ids(list(specials)) == list(specials.values())
    assert hf_tok.bos_token_id == tok.bos_token_id and hf_tok.eos_token == "<|assistant_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be kind  "},
        {"role": "user", "content": " 你好 🎉"},
        {"role": "assistant", "content": "Hello!\n\n"},
        {"role": "user", "content": "again  123456"},
    ],
    [
        {"role": "user", "content": "3*7?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "3*7"},
                {"type": "python_output", "text": "21"},
                {"type": "text", "text": " It is 21."},
            ],
        },
        {"role": "user", "content": "thanks"},
    ],
]


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_rendering(exported, messages):
    _, out, _, tok = exported
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert (
        _ids(prompt)
        == render_for_completion(tok, {"messages": messages + [{"role": "assistant", "content": ""}]}).tolist()
    )
    full = messages + [{"role": "assistant", "content": "Sure, 42."}]
    rendered = hf_tok.apply_chat_template(full, tokenize=True)
    assert _ids(rendered) == render_conversation(tok, {"messages": full}, max_tokens=None)[0].tolist()


def test_chat_template_refuses_what_rendering_refuses(exported):
    _, out, _, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(out)
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


def test_greedy_generation_matches_engine(exported):
    _, out, ref, tok = exported
    hf = _load(out, dtype=torch.float32).eval()
    engine = Engine(ref, tok, tools=False)
    stops = {tok.bos_token_id, tok.encode_special("<|assistant_end|>")}
    total = 0
    # the 2026 model also gets a prompt that crosses its short window (128 tokens)
    long = [[{"role": "user", "content": " ".join(SAMPLES + SAMPLES[:1])}]] if ref.config.arch != "classic" else []
    for messages in CONVERSATIONS + long:
        prompt = render_for_completion(tok, {"messages": messages + [{"role": "assistant", "content": ""}]}).tolist()
        assert messages not in long or 128 < len(prompt) < 192 - 20
        ours = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)[0]
        x = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)[
                0, len(prompt) :
            ]
        theirs = theirs.tolist()
        cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
        assert theirs[:cut] == ours, messages
        total += len(ours)
    assert total >= 20  # the comparison covered real generated text, not only stop tokens


def test_import_hf_round_trip_then_sft(exported, tmp_path):
    _, out, ref, tok = exported
    fresh = tmp_path / "fresh"
    assert main(["import-hf", str(out), "--stage", "mid", "--base-dir", str(fresh)]) == 0
    model, _, meta = load_stage_model("mid", 2, base_dir=fresh)
    assert meta["step"] == STEP and meta["stage"] == "mid"
    back = Tokenizer.load(fresh / "tokenizer")
    assert back.mergeable_ranks() == tok.mergeable_ranks() and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern
    ids = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), atol=0, rtol=0)
    # SFT continues from the imported mid checkpoint
    res = train_sft(
        STAGE_CONFIGS["sft"](
            depth=2,
            seq_len=64,
            device="cpu",
            quiet=True,
            eval_every=0,
            eval_batches=1,
            max_steps=1,
            tasks="tiny",
            device_batch_size=2,
            total_batch_conversations=2,
            base_dir=str(fresh),
        )
    )
    assert res["steps"] == 1 and res["history"][0]["loss"] > 0
    assert load_stage_model("sft", 2, base_dir=fresh)[2]["step"] == 1


def test_import_hf_refuses_to_overwrite(exported, tmp_path, capsys):
    _, out, _, _ = exported
    dest = tmp_path / "dest"
    assert main(["import-hf", str(out), "--base-dir", str(dest)]) == 0
    capsys.readouterr()
    assert main(["import-hf", str(out), "--base-dir", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "base checkpoints" in err and str(stage_dir("base", 2, dest)) in err and "--force" in err
    assert "tokenizer" not in err  # the same tokenizer is not in the way
    # a different tokenizer in the way is named too
    Tokenizer.train(["other text entirely"] * 30, vocab_size=280).save(dest / "tokenizer")
    assert main(["import-hf", str(out), "--base-dir", str(dest), "--stage", "sft"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "sft checkpoints" not in err
    assert main(["import-hf", str(out), "--base-dir", str(dest), "--force", "--step", "3"]) == 0
    assert load_stage_model("base", 2, base_dir=dest)[2]["step"] == 3  # the import replaced step 7
    assert Tokenizer.load(dest / "tokenizer").vocab_size == exported[3].vocab_size


def test_export_errors_are_one_line(exported, tmp_path, capsys):
    base, out, _, _ = exported
    for argv, expected in [
        (["export", "-i", "mid", "--base-dir", str(base), "--out", str(tmp_path / "x")], "run the mid stage first"),
        (["export", "-i", "sft", "--base-dir", str(base), "--out", str(out)], "not empty; pass --force"),
        (["import-hf", str(tmp_path), "--base-dir", str(tmp_path / "b")], "no config.json"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("rustchat: error: ") and err.count("\n") == 1 and expected in err, err


def test_unwritable_outputs_fail_up_front_in_one_line(tmp_path, capsys):
    """Root ignores modes, so the unwritable place is a path under a regular file."""
    from rustchat.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    bad = blocker / "x"
    cases = [
        (["export", "-i", "sft", "--out", str(bad), "--base-dir", str(tmp_path / "nothing")], "--out"),
        (["import-hf", str(tmp_path / "no_hf_dir"), "--base-dir", str(bad)], "--base-dir"),
        (["eval", "--tasks", "tiny", "--base-dir", str(bad), "--device", "cpu"], "report dir"),
        (["tok", "train", "--input", str(blocker), "--out", str(bad)], "--out"),
    ]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flag} {bad}: not writable" in err, (argv, err)
