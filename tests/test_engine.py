"""Inference engine: KV-cache generation equals full recomputation (also after fan-out), seeded
sampling, top-k, stop tokens, max_tokens, the calculator tool and the completion parser."""

import pytest
import torch

from scripted_model import ScriptedModel

import rustchat
from rustchat.conversation import render_for_completion
from rustchat.engine import Engine, stream_reply
from rustchat.replies import CompletionParser, format_tool_call
from rustchat.sampling import sample_next
from rustchat.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def tok(corpus):
    text = corpus["code"][:200_000]
    return rustchat.Tokenizer.train([text[i : i + 5000] for i in range(0, len(text), 5000)], vocab_size=512)


def random_gpt(tok, seed=0, dtype=torch.float64):
    """A tiny GPT with all weights random (the default init zeroes the residual outputs),
    in float64 so cached and uncached forwards agree to ~1e-12."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def prompt_of(tok, text="Tell me about import statements."):
    conv = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}
    return [int(t) for t in render_for_completion(tok, conv)]


def reference_generate(model, prompt, num_samples, max_tokens, stop, temperature=0.0, top_k=None, seed=42):
    """No cache: the whole sequence goes through the model at every step."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.tensor([prompt] * num_samples)
    outs, done = [[] for _ in range(num_samples)], [False] * num_samples
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(seqs)[:, -1, :]
            nxt = sample_next(logits, gen, temperature, top_k)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        outs[i].append(t)
            if all(done):
                break
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
    return outs


def stops(tok):
    return {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}


def test_kv_cache_greedy_equals_full_forward(tok):
    model = random_gpt(tok)
    engine = Engine(model, tok, tools=False)
    prompt = prompt_of(tok)
    ref = reference_generate(model, prompt, 1, 30, stops(tok))[0]
    assert len(ref) > 5  # the check means something only if it generates a while
    assert engine.generate_batch(prompt, 1, max_tokens=30, temperature=0.0) == [ref]
    # fan-out: one prefill copied into 3 rows, every row still equals the uncached result
    assert engine.generate_batch(prompt, 3, max_tokens=30, temperature=0.0) == [ref] * 3


def test_kv_cache_sampling_after_fanout_equals_full_forward(tok):
    model = random_gpt(tok, seed=1)
    engine = Engine(model, tok, tools=False)
    prompt = prompt_of(tok, "What is a module?")
    for temperature, top_k in ((1.0, None), (0.8, 20)):
        ref = reference_generate(model, prompt, 4, 25, stops(tok), temperature, top_k, seed=7)
        got = engine.generate_batch(prompt, 4, max_tokens=25, temperature=temperature, top_k=top_k, seed=7)
        assert got == ref
        assert len({tuple(r) for r in got}) > 1  # the rows really were sampled independently


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tok):
    model = random_gpt(tok, seed=2, dtype=torch.float32)
    engine = Engine(model, tok)
    prompt = prompt_of(tok)
    a = engine.generate_batch(prompt, 3, max_tokens=20, temperature=1.0, seed=123)
    b = engine.generate_batch(prompt, 3, max_tokens=20, temperature=1.0, seed=123)
    c = engine.generate_batch(prompt, 3, max_tokens=20, temperature=1.0, seed=124)
    assert a == b
    assert a != c
    greedy = engine.generate_batch(prompt, 2, max_tokens=20, temperature=0.0)
    assert engine.generate_batch(prompt, 2, max_tokens=20, temperature=1.3, top_k=1, seed=5) == greedy


def test_top_k_samples_only_the_k_best():
    logits = torch.full((64, 50), -1.0)
    logits[:, 7], logits[:, 3] = 2.0, 1.9
    gen = torch.Generator().manual_seed(0)
    picks = set()
    for _ in range(10):
        picks |= set(sample_next(logits, gen, temperature=5.0, top_k=2).tolist())
    assert picks == {3, 7}
    assert set(sample_next(logits, gen, temperature=0.0).tolist()) == {7}


def test_stop_token_and_max_tokens(tok):
    end = tok.encode_special("<|assistant_end|>")
    prompt = prompt_of(tok)
    x = tok.encode_ordinary("x")[0]
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), [x, x, end], end), tok)
    steps = list(engine.generate(prompt, 2, max_tokens=10, temperature=0.0))
    assert [col for col, _ in steps] == [[x, x], [x, x], [end, end]]  # ends with every row stopped
    assert engine.generate_batch(prompt, 2, max_tokens=10, temperature=0.0) == [[x, x], [x, x]]
    assert len(list(engine.generate(prompt, 1, max_tokens=2))) == 2  # the cap
    bos = tok.encode_special("<|bos|>")
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), [x, bos, x], end), tok)
    assert engine.generate_batch(prompt, 1, max_tokens=10, temperature=0.0) == [[x]]  # <|bos|> stops too


def _calc_script(tok, expr):
    sp = tok.encode_special
    body = [tid for ch in expr for tid in tok.encode_ordinary(ch)]  # one token per character
    filler = tok.encode_ordinary("?")[0]  # what the model "wants" while the output is forced
    return sp, [sp("<|python_start|>"), *body, sp("<|python_end|>")], filler


def test_calculator_output_is_forced(tok):
    prompt = prompt_of(tok, "What is 2+3?")
    sp, call, filler = _calc_script(tok, "2+3")
    five, hashes = tok.encode_ordinary("5"), tok.encode_ordinary("#")
    forced_expected = [sp("<|output_start|>"), *five, sp("<|output_end|>")]
    script = call + [filler] * len(forced_expected) + hashes + [sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), script, sp("<|assistant_end|>")), tok)
    toks, forced = engine.generate_batch(prompt, 2, max_tokens=40, temperature=0.0, return_forced=True)
    expected = call + forced_expected + hashes
    assert toks == [expected, expected]
    assert forced[0] == [False] * len(call) + [True] * len(forced_expected) + [False] * len(hashes)
    # the forced tokens were fed back to the model (the filler it scripted never shows)
    assert filler not in toks[0]
    # parsed back into conversation parts, and shown by the chat stream
    parser = CompletionParser(tok)
    for t in toks[0]:
        parser.feed(t)
    parser.flush()
    assert parser.content() == [
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "#"},
    ]
    events = list(stream_reply(engine, prompt, max_tokens=40, temperature=0.0))
    assert events == [("tool", format_tool_call("2+3", "5")), ("text", "#")]
    assert format_tool_call("2+3", "5") == "[calculator: 2+3 -> 5]"


def test_calculator_refuses_code_outside_its_grammar(tok):
    prompt = prompt_of(tok)
    expr = "__import__('os').system('true')"
    sp, call, filler = _calc_script(tok, expr)
    end = sp("<|assistant_end|>")
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), call + [filler, end], end), tok)
    toks, forced = engine.generate_batch(prompt, 1, max_tokens=80, temperature=0.0, return_forced=True)
    assert toks == [call + [filler]] and not any(forced[0])  # nothing forced: refused
    assert sp("<|output_start|>") not in toks[0]
    events = list(stream_reply(engine, prompt, max_tokens=80, temperature=0.0))
    assert events == [("tool", f"[calculator: {expr} -> refused]"), ("text", "?")]
    # a reply cut by its token limit right after the call: the call was never run, not refused
    ok_expr = "'serd'.count('e')"
    sp, call, filler = _calc_script(tok, ok_expr)
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), call + [filler, end], end), tok)
    events = list(stream_reply(engine, prompt, max_tokens=len(call), temperature=0.0))
    assert events == [("tool", f"[calculator: {ok_expr} -> not run: the reply reached its token limit]")]
    events = list(stream_reply(engine, prompt, max_tokens=len(call) + 3, temperature=0.0))
    assert events[0] == ("tool", f"[calculator: {ok_expr} -> 1]")
    # the calculator itself: arithmetic and str.count only
    from rustchat.tools import calculate

    assert calculate("'strawberry'.count('r')") == "3"
    assert calculate(expr) is None and calculate("open('/etc/passwd').read()") is None


def test_tools_off_forces_nothing(tok):
    prompt = prompt_of(tok)
    sp, call, filler = _calc_script(tok, "1+1")
    end = sp("<|assistant_end|>")
    engine = Engine(ScriptedModel(tok.vocab_size, len(prompt), call + [filler, end], end), tok, tools=False)
    assert engine.generate_batch(prompt, 1, max_tokens=20, temperature=0.0) == [call + [filler]]


def test_parser_holds_back_split_utf8(tok):
    parser = CompletionParser(tok)
    e_acute = "é".encode()  # two bytes: two byte-level tokens
    assert parser.feed(e_acute[0]) == []
    assert parser.feed(e_acute[1]) == [("text", "é")]
    assert parser.feed(tok.encode_special("<|assistant_end|>")) == [] and parser.finished
    assert parser.content() == "é"


def test_generate_rejects_bad_arguments(tok):
    from rustchat.common import RustchatError

    engine = Engine(random_gpt(tok, dtype=torch.float32), tok)
    with pytest.raises(RustchatError):
        list(engine.generate([], 1, 5))
    with pytest.raises(RustchatError):
        list(engine.generate(prompt_of(tok), 0, 5))
    with pytest.raises(RustchatError):
        list(engine.generate(prompt_of(tok), 1, 5, temperature=-1.0))


def _reference_parts(tok, tokens):
    """A reply's parts by the protocol itself, in plain Python: text is the UTF-8 of the text
    tokens' bytes between tool calls (errors replaced), a call's expression and output are
    decoded whole, other special tokens are dropped, a stop token ends the reply."""
    sp = {
        name: tok.encode_special(name)
        for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
    }
    stops = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    specials = set(tok.special_tokens.values())
    parts, mode, text, buf = [], "text", b"", []

    def add(kind, s):
        if kind == "text" and parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += s
        elif s or kind != "text":
            parts.append({"type": kind, "text": s})

    for t in tokens:
        if t in stops:
            break
        if t in specials:
            if t in (sp["<|python_start|>"], sp["<|output_start|>"]):
                add("text", text.decode("utf-8", errors="replace"))
                text, buf = b"", []
                mode = "python" if t == sp["<|python_start|>"] else "output"
            elif t == sp["<|python_end|>"] and mode == "python":
                add("python", tok.decode(buf))
                mode = "text"
            elif t == sp["<|output_end|>"] and mode == "output":
                add("python_output", tok.decode(buf))
                mode = "text"
            continue
        if mode == "text":
            text += tok.decode_bytes([t])
        else:
            buf.append(t)
    add("text", text.decode("utf-8", errors="replace"))
    return parts


def test_parser_feed_all_equals_feeding_one_by_one_and_the_protocol(tok):
    """Scoring decodes whole replies with `feed_all` (runs of text tokens at once): the parts
    must be those of feeding token by token, and those the protocol defines, on random replies
    with tool calls, stray specials, split multi-byte characters and stop tokens. (Token by
    token once kept a character left incomplete before a tool call twice.)"""
    import random

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    specials = sorted(tok.special_tokens.values())
    pieces = [tok.encode_ordinary(s) for s in ("é", "中文", "x = 1", " count", "🙂", "\n")]
    for _ in range(200):
        reply = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.15:
                reply.append(rng.choice(specials))
            elif r < 0.25:
                reply.append(rng.choice(list("é中🙂".encode()) + [0xFF]))  # a lone byte of a character
            elif r < 0.6:
                reply += rng.choice(pieces)
            else:
                reply.append(rng.randrange(tok.vocab_size - len(specials)))
        one = CompletionParser(tok)
        for t in reply:
            one.feed(t)
        one.flush()
        whole = CompletionParser(tok)
        whole.feed_all(reply)
        whole.flush()
        assert whole.parts == one.parts, (seed, reply)
        assert whole.finished == one.finished, (seed, reply)
        assert whole.parts == _reference_parts(tok, reply), (seed, reply)
