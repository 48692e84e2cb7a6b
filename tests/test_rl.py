"""`rustchat rl` (simplified GRPO) on the CPU with tiny models: the advantage and loss math
against a float64 reference, the token masks of on-policy rows (only the model's own sampled
tokens; calculator outputs are not trained), reward rising on a toy task with a known optimum,
resume == uninterrupted, 2 gloo processes == 1, and the custom JSON task's answer check."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import find_last_step, load_checkpoint, save_checkpoint, stage_dir
from rustchat.common import RustchatError
from rustchat.config import RLConfig
from rustchat.conversation import render_for_completion
from rustchat.engine import Engine
from rustchat.model import GPT, GPTConfig
from rustchat import rl, stages
from rustchat.tasks import CustomJSON, Task
from test_stages import _assert_same_weights  # equal up to summation order, Adam's sign flips aside

GOOD = frozenset(chr(i) for i in range(33, 127) if i % 3 == 0)  # 31 of the 94 visible ASCII characters


class ToyTask(Task):
    """Reply with one character of GOOD: the optimum (every reply right) is reachable by
    moving probability onto those 31 tokens; a random byte-level model starts near 12%."""

    name = "Toy"

    def __init__(self, size=4000, **kw):
        super().__init__(**kw)
        self.size = size

    def num_examples(self):
        return self.size

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"pick {i % 97}"}, {"role": "assistant", "content": "x"}]}

    def evaluate(self, conversation, completion):
        return completion[:1] in GOOD


def toy_tasks(cfg):
    return [ToyTask()], [ToyTask(size=64, start=0)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with a byte-level tokenizer and a random-init SFT checkpoint of depth 1."""
    d = tmp_path_factory.mktemp("rlbase")
    tok = Tokenizer.train(["the cat sat on the mat 0123456789"] * 20, vocab_size=265)
    tok.save(d / "tokenizer")
    torch.manual_seed(random.randrange(1 << 30))
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    with torch.no_grad():  # every layer has a say, and the start is near uniform over tokens
        for p in model.transformer.h.parameters():
            p.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.02)
    save_checkpoint(stage_dir("sft", 1, d), 0, model, None, {"stage": "sft"})
    return d


TOY = dict(
    depth=1,
    device="cpu",
    quiet=True,
    eval_every=0,
    save_every=None,
    max_new_tokens=1,
    temperature=1.0,
    top_k=0,
    examples_per_step=4,
    num_samples=8,
    device_batch_size=8,
    init_lr_frac=1.0,
)


def _copy(base_dir, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(base_dir, dst)
    return dst


# ----------------------------------------------------------------------------- the math
def test_advantages_and_loss_match_a_float64_reference(base_dir):
    """rl_train_step's loss and gradient on fixed rewards == -sum(adv * log p) / (sampled
    tokens), computed in float64 from the model's logits with plain-Python advantages."""
    rng = random.Random()
    state, _, meta = load_checkpoint(stage_dir("sft", 1, base_dir), load_optimizer=False)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(state)
    V = model.config.vocab_size
    groups = []
    for _ in range(3):
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 9))]
        g = rl.Group(None, {}, prompt)
        for _ in range(4):
            n = rng.randint(1, 12)
            g.replies.append([rng.randrange(V) for _ in range(n)])
            g.forced.append([rng.random() < 0.3 for _ in range(n)])
            g.rewards.append(float(rng.random() < 0.5))
        groups.append(g)
    groups[0].rewards = [1.0, 1.0, 1.0, 1.0]  # no signal: adds nothing, but its tokens count
    micro, sampled = rl.build_batch(groups, pad=0, device_batch_size=rng.choice((1, 3, 16)))
    grads = {}

    class Capture:
        def step(self):
            grads.update({k: p.grad.double().clone() for k, p in model.named_parameters() if p.grad is not None})

    batch = rl.RolloutBatch(
        micro,
        sampled,
        {
            "reward_sum": 0,
            "replies": 1,
            "groups": 1,
            "all_right": 0,
            "all_wrong": 0,
            "sampled": 1,
            "rollout_seconds": 0.0,
            "sample_seconds": 1.0,
        },
    )
    loss, ntok, _ = rl.rl_train_step(
        model, [Capture()], batch, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False)
    )
    # reference: plain Python advantages, float64 log-softmax of the logits
    ref = model.double()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for g in groups:
        mean = sum(g.rewards) / len(g.rewards)
        for reply, forced, r in zip(g.replies, g.forced, g.rewards):
            seq = torch.tensor([g.prompt + reply])
            logp = torch.log_softmax(ref(seq[:, :-1]).double(), dim=-1)[0]
            for k, (t, f) in enumerate(zip(reply, forced)):
                if not f:
                    total = total - (r - mean) * logp[len(g.prompt) - 1 + k, t]
                    count += 1
    ref_loss = total / count
    ref_loss.backward()
    assert ntok == count == sampled
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-4, abs=1e-6)
    for k, p in ref.named_parameters():
        if p.grad is not None and k in grads:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)
    assert set(grads) == {k for k, p in ref.named_parameters() if p.grad is not None}


def test_group_advantages_and_pass_at_k_against_counting():
    rng = random.Random()
    rewards = [float(rng.random() < 0.4) for _ in range(rng.randint(1, 10))]
    mu = sum(rewards) / len(rewards)
    assert rl.group_advantages(rewards) == pytest.approx([r - mu for r in rewards])
    # pass@k == the share of k-subsets of the n samples that hold a right one
    import itertools

    n, c = 6, rng.randint(0, 6)
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert rl.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


# ----------------------------------------------------------------------------- token masks
class _Scripted(torch.nn.Module):
    """Logits make script[k] the top token at generated step k of each row (by its position)."""

    def __init__(self, prompt_len, script, end, vocab):
        super().__init__()
        self.config = GPTConfig(sequence_len=128, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.lm_head = torch.nn.Linear(8, vocab, bias=False)
        self.prompt_len, self.script, self.end, self.vocab = prompt_len, script, end, vocab

    def get_device(self):
        return self.lm_head.weight.device

    def forward(self, idx, targets=None, *, kv_cache=None, position_ids=None, **kw):
        B, T = idx.shape
        last = position_ids[:, -1].tolist() if position_ids is not None else [kv_cache.pos + T - 1] * B
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            k = last[b] + 1 - self.prompt_len
            logits[b, -1, self.script[k] if 0 <= k < len(self.script) else self.end] = 30.0
        kv_cache.advance(T)
        return logits


def test_rows_train_only_the_models_own_sampled_tokens(base_dir):
    """A reply with a calculator call: the forced <|output_start|> 42 <|output_end|> and the
    prompt are masked; every token the model sampled, the stop token included, is a target."""
    from rustchat.tokenizer import load_tokenizer

    tok = load_tokenizer(base_dir)
    sp, enc = tok.encode_special, tok.encode_ordinary
    conv = {"messages": [{"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": "42"}]}
    prompt = render_for_completion(tok, conv).tolist()
    forced_ids = [sp("<|output_start|>"), *enc("42"), sp("<|output_end|>")]
    n_calc = random.randint(1, 3)
    script, want, own = [], [], []  # the model's output by step; the reply; the model's own tokens
    for _ in range(n_calc):
        call = [*enc("so "), sp("<|python_start|>"), *enc("6*7"), sp("<|python_end|>")]
        script += call + [0] * len(forced_ids)  # the model's choice at forced steps is ignored
        want += call + forced_ids
        own += call
    tail = [*enc(" #### 42"), sp("<|assistant_end|>")]
    script, want, own = script + tail, want + tail, own + tail
    model = _Scripted(len(prompt), script, sp("<|assistant_end|>"), tok.vocab_size)
    sampler = rl.Sampler(Engine(model, tok), max_batch=3, max_new_tokens=60, temperature=1.0, top_k=None)
    groups = [rl.Group(None, conv, prompt) for _ in range(2)]
    try:
        sampler.sample(groups, [[1, 2, 3], [4, 5, 6]])
    finally:
        sampler.close()
    for g in groups:
        for reply, forced in zip(g.replies, g.forced):
            assert reply == want
            assert [t for t, f in zip(reply, forced) if f] == forced_ids * n_calc
            assert reply[-1] == sp("<|assistant_end|>") and not forced[-1]
            x, y = rl.training_row(prompt, reply, forced)
            assert x == (prompt + reply)[:-1] and len(y) == len(x)
            trained = [t for t in y if t >= 0]
            assert trained == own
            assert y[: len(prompt) - 1] == [-1] * (len(prompt) - 1)
            assert all(y[len(prompt) - 1 + k] == -1 for k, f in enumerate(forced) if f)


# ----------------------------------------------------------------------------- training
def _rewards(res):
    return [h["reward"] for h in res["history"]]


def test_reward_rises_on_a_toy_task(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "rl_tasks", toy_tasks)
    d = _copy(base_dir, tmp_path, "toy")
    res = stages.train_rl(RLConfig(**{**TOY, "max_steps": 24, "eval_every": 24, "eval_examples": 32}, base_dir=str(d)))
    r = _rewards(res)
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert last > first + 0.25, r
    assert res["last_eval"]["pass@1"] > 0.4 and res["last_eval"]["pass@8"] >= res["last_eval"]["pass@1"]
    assert all(0.0 <= h["all_right"] + h["all_wrong"] <= 1.0 for h in res["history"])
    assert find_last_step(stage_dir("rl", 1, d)) == 24


def test_resume_matches_uninterrupted(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "rl_tasks", toy_tasks)
    full, part = _copy(base_dir, tmp_path, "full"), _copy(base_dir, tmp_path, "part")
    kw = {**TOY, "max_steps": 4, "init_lr_frac": 0.5}
    r_full = stages.train_rl(RLConfig(**kw, base_dir=str(full)))
    r1 = stages.train_rl(RLConfig(**kw, base_dir=str(part), stop_at_step=2))
    assert find_last_step(stage_dir("rl", 1, part)) == 2
    r2 = stages.train_rl(RLConfig(**kw, base_dir=str(part), resume=True))
    assert _rewards(r1) + _rewards(r2) == _rewards(r_full)
    assert [h["loss"] for h in r1["history"] + r2["history"]] == pytest.approx(
        [h["loss"] for h in r_full["history"]], rel=1e-5, abs=1e-7
    )
    a = load_checkpoint(stage_dir("rl", 1, full), load_optimizer=False)[0]
    b = load_checkpoint(stage_dir("rl", 1, part), load_optimizer=False)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    start = load_checkpoint(stage_dir("sft", 1, full), load_optimizer=False)[0]
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


RANKS_SCRIPT = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, {tests!r})
    from test_rl import toy_tasks, TOY
    from rustchat import stages
    from rustchat.config import RLConfig
    from rustchat.runtime import cleanup_distributed
    stages.rl_tasks = toy_tasks
    try:
        res = stages.train_rl(RLConfig(**{{**TOY, "max_steps": 3, "device_batch_size": {dbs}, "init_lr_frac": 0.1,
                                          "max_new_tokens": 4}},
                                       base_dir={base!r}))
    finally:
        cleanup_distributed()
    json.dump([[h["loss"], h["reward"]] for h in res["history"]], open({out!r}, "w"))
""")


def _run_ranks(d, nproc, dbs):
    script = d / "run_rl.py"
    out = d / "hist.json"
    script.write_text(RANKS_SCRIPT.format(tests=os.path.dirname(__file__), dbs=dbs, base=str(d), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = (
        [sys.executable, str(script)]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    )
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one(base_dir, tmp_path):
    one, two = _copy(base_dir, tmp_path, "one"), _copy(base_dir, tmp_path, "two")
    h1 = _run_ranks(one, 1, 8)
    h2 = _run_ranks(two, 2, 3)  # another micro-batch size too: the update must not depend on it
    assert [r for _, r in h1] == [r for _, r in h2]  # the same replies, sampled on other ranks
    # the loss is a near-cancelling sum (advantages sum to 0 per group): compare it absolutely too.
    # Replies of several tokens: with one-token replies the output head's rows of unsampled
    # tokens get gradients that are 0 but for rounding, which AdamW (eps 1e-10) turns into
    # full-size steps of either sign, so no two summation orders would agree.
    assert [l for l, _ in h1] == pytest.approx([l for l, _ in h2], rel=1e-4, abs=1e-6)
    _assert_same_weights(
        load_checkpoint(stage_dir("rl", 1, one), load_optimizer=False)[0],
        load_checkpoint(stage_dir("rl", 1, two), load_optimizer=False)[0],
        2e-4,
    )
    assert any(l != 0.0 for l, _ in h1)  # some groups carried a signal


# ----------------------------------------------------------------------------- tasks and errors
def test_custom_json_task_checks_reference_answers(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"work\n#### {i * 7}" if i % 2 else f"word{i}"},
            ]
        }
        for i in range(20)
    ]
    p = tmp_path / "custom.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CustomJSON(p)
    for i, conv in enumerate(task):
        if i % 2:
            assert task.evaluate(conv, f"so #### {i * 7}") and not task.evaluate(conv, f"#### {i * 7 + 1}")
        else:
            assert task.evaluate(conv, f"  word{i}\n") and not task.evaluate(conv, f"word{i} ok")
    train, held = stages.rl_tasks(RLConfig(tasks=f"arithmetic,{p}", train_size=50, eval_examples=10))
    assert [len(t) for t in train] == [50, 18] and [len(t) for t in held] == [10, 2]
    assert held[1][0] == rows[18]
    with pytest.raises(RustchatError, match="checkable"):
        stages.rl_tasks(RLConfig(tasks="smoltalk"))


def test_bad_input_is_one_line(base_dir, tmp_path, capsys):
    from rustchat.cli import main

    d = _copy(base_dir, tmp_path, "bad")
    common = [
        "rl",
        "--depth",
        "1",
        "--device",
        "cpu",
        "--base-dir",
        str(d),
        "--quiet",
        "--tasks",
        "arithmetic",
        "--train-size",
        "10",
        "--eval-examples",
        "2",
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    for argv, what in [
        (["--tasks", "smoltalk"], "checkable answer"),
        (["--tasks", str(bad)], "bad.jsonl:1"),
        (["--from", str(tmp_path / "none")], "no checkpoint directory"),
        (["--depth", "3"], "sft"),
        (["--resume"], "no rl checkpoint"),
        (["--examples-per-step", "0"], "--examples-per-step must be in [1, 4096], got 0"),
    ]:
        assert main(common + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("rustchat: error:") and what in err, (argv, err)


def test_tiny_preset_never_trains_on_the_problems_it_is_scored_on():
    from test_speedrun import _words_and_numbers
    from rustchat.evaluate import load_task
    from rustchat.speedrun import PRESETS

    cfg = RLConfig(**{**PRESETS["tiny"]["rl"], "train_size": 3000})
    train, held_out = stages.rl_tasks(cfg)
    for task, probe in zip(train, held_out):
        scored = load_task(type(task).__name__, 200)  # what the speedrun's eval scores
        trained = {_words_and_numbers(c) for c in task}
        assert not trained & {_words_and_numbers(c) for c in scored}
        assert not trained & {_words_and_numbers(c) for c in probe}
