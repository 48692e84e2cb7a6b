"""Bounded resources on every public call (issue 23, item 3): every count a caller can name, as
a flag or as an argument of the Python API, has a finite upper bound (the machine's CPUs and
GPUs for processes, a documented fixed maximum elsewhere: rustchat.common), and a value out of
range is one line naming the flag or argument and the range: `rustchat: error: ...` on the
command line, a ValueError from Python. The boundary value itself is accepted."""

import dataclasses
import os
import typing

import pytest
import torch

import rustchat
from rustchat import _core, common, config
from rustchat.cli import COMMANDS, TOK_COMMANDS, build_parser, main
from rustchat.common import OutOfRangeError, RustchatError

M = 1 << 20
# (the bound of every count flag, written out: a bound that moves must move here too)
EXPECTED = {
    "vocab_size": (265, 1 << 24),
    "depth": (1, 256),
    "device_batch_size": (1, 4096),
    "nproc": (1, 1024),
    "nnodes": (1, 1024),
    "node_rank": (0, 1023),
    "master_port": (1, 65535),
    "total_batch_size": (1, 1 << 26),
    "seq_len": (1, 1 << 17),
    "num_shards": (1, 1822),
    "bpb_tokens": (1, 1 << 30),
    "aspect_ratio": (2, 1024),
    "head_dim": (2, 1024),
    "core_max_per_task": (1, M),
    "total_batch_conversations": (1, 1 << 16),
    "examples_per_step": (1, 4096),
    "num_samples": (1, 256),
    "max_new_tokens": (1, 1 << 16),
    "top_k": (1, 1 << 24),
    "train_size": (1, M),
    "eval_examples": (1, 4096),
    "max_problems": (1, M),
    "batch_size": (1, 4096),
    "max_per_task": (1, M),
    "max_tokens": (1, 1 << 16),
    "port": (0, 65535),
    "max_batch": (1, 4096),
    "max_queue": (0, 1 << 16),
    "max_connections": (1, 1 << 16),
}
PER_COMMAND = {("rl", "top_k"): (0, 1 << 24), ("serve", "top_k"): (1, 200), ("serve", "max_tokens"): (1, 4096)}
# int fields that are no resource count: positions and intervals in time, seeds, and caps on how
# much of the caller's own files is read (their upper end is the files)
EXEMPT = {
    "seed": "any int seeds the generators",
    "step": "a checkpoint's step: found or not",
    "max_steps": "time, not memory: steps run one after another",
    "stop_at_step": "time",
    "num_epochs": "time",
    "eval_every": "an interval",
    "save_every": "an interval",
    "core_every": "an interval",
    "warmup_steps": "a schedule position",
    "keep_last": "a retention count: a larger one keeps no more than the run wrote",
    "eval_batches": "time: validation batches run one after another, capped by the data",
    "doc_cap": "a cap on each of the caller's documents",
    "max_chars": "a cap on the caller's files",
    "max_bytes": "a cap on each of the caller's files",
}
# what a command needs besides the flag under test, as flags and as fields
NEEDS = {"tok train": (["--input", "x.txt"], {"input": ["x.txt"]}), "export": (["--out", "d"], {"out": "d"})}
NEEDS_FOR = {("eval", "nproc"): (["-i", "base", "--core"], {"source": "base", "core": True})}

ALL = [(name, cls) for name, _, cls, _ in COMMANDS] + [(f"tok {name}", cls) for name, _, cls, _ in TOK_COMMANDS]


def _int_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if (t is int or args == [int]) and not f.metadata.get("retired"):
            yield f


BOUNDED = [(name, cls, f.name) for name, cls in ALL for f in _int_fields(cls) if f.name not in EXEMPT]


def test_every_count_flag_is_bounded_or_exempt_with_a_reason():
    """A new int flag must get a maximum (and a row in EXPECTED), or a reason in EXEMPT."""
    missing = [f"{name} --{f}" for name, _, f in BOUNDED if f not in EXPECTED]
    assert not missing, f"count flags without an expected bound: {missing}"
    unbounded = [f"{name} --{f}" for name, cls, f in BOUNDED if cls.__dataclass_fields__[f].metadata["maximum"] is None]
    assert not unbounded, f"count flags without a maximum: {unbounded}"
    assert len(BOUNDED) >= 40


def _flag(field):
    return config.flag_name(field)


@pytest.mark.parametrize("name,cls,field", BOUNDED, ids=[f"{n}--{f}" for n, _, f in BOUNDED])
def test_count_flag_is_bounded(name, cls, field, capsys):
    lo, hi = PER_COMMAND.get((name, field), EXPECTED[field])
    argv_extra, kw_extra = NEEDS.get(name, ([], {}))
    a2, k2 = NEEDS_FOR.get((name.split()[0], field), ([], {}))
    argv_extra, kw_extra = argv_extra + a2, {**kw_extra, **k2}
    flag = _flag(field)
    # the boundary is accepted, from Python and from the command line
    assert getattr(cls(**kw_extra, **{field: hi}), field) == hi
    assert getattr(cls(**kw_extra, **{field: lo}), field) == lo
    args = build_parser().parse_args([*name.split(), *argv_extra, flag, str(hi)])
    assert getattr(config.from_args(args.config_class, args), field) == hi
    # above it and below the minimum (<= 0 for every count starting at 1): one line each
    for bad in sorted({hi + 1, hi * 10, lo - 1, min(lo - 1, 0), -1}):
        want = f"{flag} must be in [{lo}, {hi}], got {bad}"
        with pytest.raises(OutOfRangeError) as e:
            cls(**kw_extra, **{field: bad})
        assert str(e.value) == want and isinstance(e.value, ValueError)
        assert main([*name.split(), *argv_extra, f"{flag}={bad}"]) == 2
        assert capsys.readouterr().err == f"rustchat: error: {want}\n"


def test_the_vocabulary_bound_is_the_cores():
    assert common.MAX_VOCAB_SIZE == _core.MAX_VOCAB
    assert common.MAX_QUEUE >= common.MAX_QUESTIONS * common.MAX_SAMPLES  # an RL step's rollouts fit


def test_help_shows_the_bound(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024, at most 65536)" in out and "(default: 32, at most 4096)" in out


def test_presets_and_defaults_are_in_range(tmp_path):
    from rustchat.speedrun import stage_configs

    for _, cls in ALL:
        if not any(f.metadata.get("required") for f in dataclasses.fields(cls)):
            cls()
    for preset in ("tiny", "d10", "d20"):
        assert stage_configs(config.SpeedrunConfig(preset=preset), tmp_path)


# ----------------------------------------------------------------------------- processes per machine
def _cpus(monkeypatch, n):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: n)


def test_nproc_is_bounded_by_the_cpus(monkeypatch, capsys):
    from rustchat.runtime import check_local_processes

    real = common.available_cpus()
    assert 1 <= real <= (os.cpu_count() or 1)
    _cpus(monkeypatch, 3)
    assert common.available_cpus() == 3
    assert check_local_processes(3, "cpu") == 3
    for bad in (4, 1000, 0, -2):
        with pytest.raises(
            ValueError, match=rf"^--nproc must be in \[1, 3\] \(the 3 CPU\(s\) this process may use\), got {bad}$"
        ):
            check_local_processes(bad, "cpu")
    # the commands check before re-launching under torchrun: one line, nothing started
    for argv in (["base", "--device", "cpu"], ["eval", "-i", "base", "--core", "--device", "cpu"]):
        assert main([*argv, "--nproc", "4"]) == 2
        err = capsys.readouterr().err
        assert err == "rustchat: error: --nproc must be in [1, 3] (the 3 CPU(s) this process may use), got 4\n"


def test_nproc_is_bounded_by_the_gpus_on_cuda(monkeypatch):
    from rustchat import runtime

    _cpus(monkeypatch, 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.local_process_limit("auto") == (2, "the 2 GPU(s) visible")
    assert runtime.check_local_processes(2, "cuda") == 2
    with pytest.raises(ValueError, match=r"^--nproc must be in \[1, 2\] \(the 2 GPU\(s\) visible\), got 3$"):
        runtime.check_local_processes(3, "cuda")
    assert runtime.local_process_limit("cpu") == (16, "the 16 CPU(s) this process may use")
    # started by torchrun itself with more processes than GPUs: one line, before touching a GPU
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RustchatError, match=r"^process 2 of this node has no GPU: 2 visible; start at most 2"):
        runtime.init_distributed("cuda")


# ----------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def tok():
    return rustchat.Tokenizer.train(["hello world, a tiny corpus"], 265)  # bytes + specials


@pytest.fixture(scope="module")
def engine(tok):
    from rustchat.engine import Engine
    from rustchat.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    return Engine(GPT(cfg).eval(), tok, tools=False)


def _refused(name, lo, hi, call, values=None):
    """`call(v)` raises one ValueError line naming `name` and [lo, hi] for each value out of range."""
    for bad in values or (hi + 1, lo - 1, min(lo - 1, 0), -1, 1.5):
        with pytest.raises(ValueError) as e:
            call(bad)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{name} must be ") and f"in [{lo}, {hi}]" in msg, msg
        assert msg.endswith(f"got {bad!r}"), msg


def test_batch_scheduler_bounds_its_batch_and_queue(engine):
    from rustchat.batching import BatchScheduler

    _refused("max_batch", 1, 4096, lambda v: BatchScheduler(engine, max_batch=v))
    _refused("max_queue", 0, 1 << 20, lambda v: BatchScheduler(engine, max_queue=v))
    BatchScheduler(engine, max_batch=4096, max_queue=1 << 20).close()
    BatchScheduler(engine, max_batch=1, max_queue=0).close()


def test_gen_request_bounds_its_tokens_and_logprobs():
    from rustchat.batching import GenRequest

    _refused("max_tokens", 1, 1 << 16, lambda v: GenRequest([1], print, max_tokens=v))
    _refused("logprobs", 0, 1 << 24, lambda v: GenRequest([1], print, max_tokens=1, logprobs=v))
    _refused("top_k", 1, 1 << 24, lambda v: GenRequest([1], print, max_tokens=1, top_k=v))
    assert GenRequest([1], print, max_tokens=1 << 16, logprobs=1 << 24, top_k=1 << 24).max_tokens == 1 << 16


def test_engine_generate_bounds_its_rows_tokens_and_top_k(engine, tok):
    prompt = [tok.bos_token_id, 104, 105]
    # raised at the call, not at the first step
    _refused("num_samples", 1, 4096, lambda v: engine.generate(prompt, v, 1))
    _refused("max_tokens", 1, 1 << 16, lambda v: engine.generate(prompt, 1, v), ((1 << 16) + 1, 0, -1, 1.5))
    _refused("top_k", 1, 1 << 24, lambda v: engine.generate(prompt, 1, 1, 1.0, v), ((1 << 24) + 1, 0, -1))
    _refused("len(prompts)", 1, 4096, lambda v: engine.generate_prompts([prompt] * v, 1), (4097,))
    _refused("max_tokens", 1, 1 << 16, lambda v: engine.generate_prompts([prompt], v), ((1 << 16) + 1, 0))
    # the bounds themselves: 4096 rows, a reply limit of MAX_NEW_TOKENS (the context caps it), any k
    outs = engine.generate_batch(prompt, 4096, 1, 1.0, 1 << 24, seed=1)
    assert len(outs) == 4096
    assert len(engine.generate_batch(prompt, 1, 1 << 16, 0.0)[0]) <= 16
    assert len(engine.complete_prompts([prompt] * 4096, 1, 0.0)) == 4096


def test_create_app_takes_what_serve_takes(engine):
    from rustchat.serve import create_app

    _refused("max_batch", 1, 4096, lambda v: create_app(engine, max_batch=v))
    _refused("max_queue", 0, 1 << 16, lambda v: create_app(engine, max_queue=v))
    _refused("top_k", 1, 200, lambda v: create_app(engine, top_k=v))
    _refused("max_tokens", 1, 4096, lambda v: create_app(engine, max_tokens=v))
    with pytest.raises(ValueError, match=r"^temperature must be in \[0.0, 2.0\], got 2.5$"):
        create_app(engine, temperature=2.5)
    app = create_app(engine, max_batch=4096, max_queue=1 << 16, top_k=200, max_tokens=4096, temperature=2.0)
    app.app.state.scheduler.close()


def test_data_loaders_bound_their_rows_and_queues(tok):
    from rustchat.data.midtrain import MidTrainStream
    from rustchat.data.pretrain import PretrainLoader
    from rustchat.data.steps import SFTSteps

    _refused("batch_size", 1, 4096, lambda v: PretrainLoader(tok, None, v, 8))
    _refused("seq_len", 1, 1 << 17, lambda v: PretrainLoader(tok, None, 1, v))
    _refused("prefetch_groups", 1, 64, lambda v: PretrainLoader(tok, None, 1, 8, prefetch_groups=v))
    assert PretrainLoader(tok, None, 4096, 1 << 17, prefetch_groups=64).prefetch == 64
    convs = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    _refused("batch_size", 1, 4096, lambda v: MidTrainStream(tok, convs, v, 8))
    _refused("seq_len", 1, 1 << 17, lambda v: MidTrainStream(tok, convs, 1, v))
    _refused("render_chunk", 1, 1 << 16, lambda v: MidTrainStream(tok, convs, 1, 8, render_chunk=v))
    MidTrainStream(tok, convs, 4096, 1 << 17, render_chunk=1 << 16)
    _refused("examples_per_step", 1, 1 << 16, lambda v: SFTSteps(tok, convs, v, 1, 8, 0, 1, 0))
    _refused("device_batch_size", 1, 4096, lambda v: SFTSteps(tok, convs, 1, v, 8, 0, 1, 0))
    _refused("seq_len", 1, 1 << 17, lambda v: SFTSteps(tok, convs, 1, 1, v, 0, 1, 0))
    SFTSteps(tok, convs, 1 << 16, 4096, 1 << 17, 0, 1, 0)


def test_evaluation_bounds_its_batches_samples_and_caps(engine, tok, tmp_path):
    from rustchat.bpb import val_token_stream
    from rustchat.core_eval import evaluate_core
    from rustchat.evaluate import categorical_accuracy, generative_accuracy, greedy_accuracies

    model = engine.model
    _refused("batch_size", 1, 4096, lambda v: categorical_accuracy(model, tok, [], v))
    assert categorical_accuracy(model, tok, [], 4096) == (0, 0)
    _refused("num_samples", 1, 256, lambda v: generative_accuracy(engine, [], num_samples=v, temperature=1.0))
    _refused("batch_size", 1, 4096, lambda v: generative_accuracy(engine, [], batch_size=v))
    _refused("max_new_tokens", 1, 1 << 16, lambda v: generative_accuracy(engine, [], max_new_tokens=v))
    assert generative_accuracy(
        engine, [], num_samples=256, batch_size=4096, max_new_tokens=1 << 16, temperature=1.0
    ) == (0, 0)
    _refused("batch_size", 1, 4096, lambda v: greedy_accuracies(engine, [], v))
    _refused("max_new_tokens", 1, 1 << 16, lambda v: greedy_accuracies(engine, [], 1, v))
    assert greedy_accuracies(engine, [], 4096, 1 << 16) == []
    _refused("max_per_task", 1, M, lambda v: evaluate_core(model, tok, [], max_per_task=v), (M + 1, 0, -1))
    budget = 4096 << 17
    _refused("token_budget", 1, budget, lambda v: evaluate_core(model, tok, [], token_budget=v), (budget + 1, 0))
    assert evaluate_core(model, tok, [], max_per_task=M, token_budget=budget).tasks == []
    text = tmp_path / "val.txt"
    text.write_text("some validation text\n\nand another document\n")
    _refused("max_tokens", 1, 1 << 30, lambda v: val_token_stream(tok, [text], v), ((1 << 30) + 1, 0, -1))
    assert len(val_token_stream(tok, [text], 1 << 30)) > 2


class _Task:
    name = "echo"

    def __init__(self, n):
        self.rows = [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "x"}]}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def evaluate(self, conv, text):
        return len(text) % 2 == 0


def test_greedy_evaluation_queues_at_most_max_queue(engine, monkeypatch):
    """More problems than the scheduler's queue may hold: the next is queued as one ends, and
    every problem is scored as with a queue for all."""
    from rustchat import batching, evaluate

    want = evaluate.greedy_accuracies(engine, [_Task(9), _Task(4)], 2, 5)
    seen = []
    real = batching.BatchScheduler

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.max_queue)

        def submit(self, req):
            with self.cond:
                assert len(self.queue) + len(self.running) <= self.max_queue
            super().submit(req)

    monkeypatch.setattr(evaluate, "MAX_QUEUE", 3)
    monkeypatch.setattr(evaluate, "BatchScheduler", Recording)
    assert evaluate.greedy_accuracies(engine, [_Task(9), _Task(4)], 2, 5) == want
    assert seen == [3] and [n for _, n in want] == [9, 4]


def test_rl_bounds_its_questions_samples_and_rows(engine, tok):
    from rustchat.rl import RolloutSteps, Sampler, build_batch, pass_at_k_evaluator

    def sampler(**k):
        return Sampler(engine, **{"max_batch": 1, "max_new_tokens": 1, "temperature": 1.0, "top_k": None, **k})

    _refused("max_batch", 1, 4096, lambda v: sampler(max_batch=v))
    _refused("max_new_tokens", 1, 1 << 16, lambda v: sampler(max_new_tokens=v))
    s = sampler(max_batch=4096, max_new_tokens=1 << 16)
    _refused("device_batch_size", 1, 4096, lambda v: build_batch([], 0, v))
    assert build_batch([], 0, 4096) == ([], 0)

    def steps(**k):
        kw = {"examples_per_step": 1, "num_samples": 1, "device_batch_size": 1, "seed": 0, **k}
        return RolloutSteps(tok, s, None, **kw)

    _refused("examples_per_step", 1, 4096, lambda v: steps(examples_per_step=v))
    _refused("num_samples", 1, 256, lambda v: steps(num_samples=v))
    _refused("device_batch_size", 1, 4096, lambda v: steps(device_batch_size=v))
    steps(examples_per_step=4096, num_samples=256, device_batch_size=4096)
    _refused("num_samples", 1, 256, lambda v: pass_at_k_evaluator(tok, s, [], num_samples=v, seed=0))
    with pytest.raises(ValueError, match=r"^len\(problems\) must be in \[0, 4096\], got 4097$"):
        pass_at_k_evaluator(tok, s, [(None, {})] * 4097, num_samples=1, seed=0)
    pass_at_k_evaluator(tok, s, [(None, {})] * 4096, num_samples=256, seed=0)
    s.close()


def test_tokenizer_threads_stay_capped(tok):
    """(num_threads is capped in the Rust core; tests/test_tokenizer_inputs.py holds its test)"""
    assert tok.encode_batch(["ab", "c"], num_threads=10**6) == [[97, 98], [99]]
    with pytest.raises(ValueError, match="num_threads must be a positive int, got 0"):
        tok.encode_batch(["a"], num_threads=0)
