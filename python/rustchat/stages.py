"""The training stages: base pretraining, mid-training and SFT, each one readable function
(`train_base`, `train_mid`, `train_sft`) that sets up data, model and schedule and hands them
to `trainer.run_stage`.

Each stage reads the previous stage's latest checkpoint (base starts from scratch), or its own
with --resume, and writes step-numbered checkpoints under
<base dir>/<stage>_checkpoints/d<depth>/ plus its section of <base dir>/report.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    build_model_from_meta,
    find_last_step,
    load_checkpoint,
    load_optimizer_states,
    load_stage_model,
    previous_stage,
    restore_rng_state,
    stage_dir,
)
from .common import RustchatError, get_base_dir, print0
from .config import BaseConfig, MidConfig, RLConfig, SFTConfig, StageConfig, TrainConfig
from .conversation import collate_sft, render_batch
from .data.midtrain import MidTrainStream
from .data.pretrain import FINEWEB_SHARDS, DocumentSource, PretrainLoader, download_shards
from .data.steps import SFTSteps, StreamSteps
from .model import GPT, GPTConfig
from .engine import Engine
from .report import write_section
from .rl import RolloutSteps, Sampler, pass_at_k_evaluator, rl_train_step
from .runtime import autocast_ctx, barrier, compute_dtype, get_rank, init_distributed
from .schedules import base_lr_multiplier, mid_lr_multiplier, muon_momentum, sft_lr_multiplier
from .tasks import CustomJSON, Task, TaskMixture, get_task
from .tokenizer import load_tokenizer
from .trainer import all_reduce_sum, data_state_for_rank, run_stage

# ----------------------------------------------------------------------------- task mixtures
# name -> (task name, kwargs) lists, per stage and split. "default" is nanochat's recipe on the hub
# datasets; "tiny" is the offline recipe (synthetic tasks and bundled identity chats).
MIXTURES = {
    "default": {
        "mid": {
            "train": [("smoltalk", {"split": "train"}), ("mmlu", {"subset": "auxiliary_train", "split": "train"}),
                      ("gsm8k", {"split": "train"}), ("identity", {}), ("identity", {}),
                      ("simplespelling", {"size": 200_000, "split": "train"}), ("spellingbee", {"size": 80_000, "split": "train"})],
            "val": [("smoltalk", {"split": "test"}), ("mmlu", {"subset": "all", "split": "test", "stop": 5200}),
                    ("gsm8k", {"split": "test", "stop": 420})],
        },
        "sft": {
            "train": [("arc", {"subset": "ARC-Easy", "split": "train"}), ("arc", {"subset": "ARC-Challenge", "split": "train"}),
                      ("gsm8k", {"split": "train"}), ("smoltalk", {"split": "train", "stop": 10_000}), ("identity", {}),
                      ("simplespelling", {"size": 300, "split": "train"}), ("spellingbee", {"size": 300, "split": "train"})],
            "val": [("smoltalk", {"split": "test"})],
        },
    },
    "tiny": {
        # identity is sliced: its 1,000 conversations would crowd out the measured tasks
        "mid": {
            "train": [("arithmetic", {"size": 3000, "split": "train"}), ("identity", {"stop": 200}),
                      ("simplespelling", {"size": 1000, "split": "train"}), ("spellingbee", {"size": 2000, "split": "train"})],
            "val": [("arithmetic", {"size": 100, "split": "test"}), ("spellingbee", {"size": 100, "split": "test"})],
        },
        "sft": {
            "train": [("arithmetic", {"size": 800, "split": "train"}), ("identity", {"stop": 150}),
                      ("simplespelling", {"size": 300, "split": "train"}), ("spellingbee", {"size": 1200, "split": "train"})],
            "val": [("arithmetic", {"size": 64, "split": "test"}), ("spellingbee", {"size": 64, "split": "test"})],
        },
    },
}


HUB_TASKS = {"arc", "mmlu", "gsm8k", "smoltalk", "humaneval"}
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def local_task_file(task_dir: str | Path, name: str, kwargs: dict) -> Path | None:
    """A local copy of a hub dataset in task_dir, named <task>[-<subset>]-<split><suffix>,
    e.g. arc-ARC-Easy-train.jsonl, smoltalk-test.parquet, mmlu-auxiliary_train-train.jsonl."""
    stem = "-".join(str(x) for x in (name, kwargs.get("subset"), kwargs.get("split")) if x)
    for suffix in LOCAL_SUFFIXES:
        p = Path(task_dir) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def build_mixture(stage: str, preset: str, split: str, task_dir: str | None = None, seed: int = 42):
    if preset not in MIXTURES:
        raise RustchatError(f"unknown task preset {preset!r}; known: {', '.join(MIXTURES)}")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise RustchatError(f"--task-dir {task_dir}: no such directory")
    tasks = []
    for name, kwargs in MIXTURES[preset][stage][split]:
        kw = dict(kwargs)
        if task_dir is not None and name in HUB_TASKS:
            local = local_task_file(task_dir, name, kw)
            if local is not None:
                kw["path"] = str(local)
        tasks.append(get_task(name, **kw))
    return TaskMixture(tasks, seed=seed)


# ----------------------------------------------------------------------------- shared setup
def _setup(cfg: TrainConfig):
    info, device = init_distributed(cfg.device, seed=cfg.seed)
    tok = load_tokenizer(cfg.base_dir)
    torch.manual_seed(cfg.seed + info.rank)
    return info, device, tok


def _ckpt_dir(stage: str, cfg: TrainConfig) -> Path:
    return stage_dir(stage, cfg.depth, cfg.base_dir)


def _load_start(cfg: TrainConfig, device, tok):
    """(model, optimizer states or None, meta or None, start_step) for a stage."""

    own = _ckpt_dir(cfg.stage, cfg)
    if cfg.resume:
        if find_last_step(own) is None:
            raise RustchatError(f"--resume: no {cfg.stage} checkpoint in {own}; run without --resume to start")
        model, optim_states, meta = load_stage_model(cfg.stage, cfg.depth, device=device, base_dir=cfg.base_dir,
                                               load_optimizer=True)
        restore_rng_state(meta.get("rng", {}))
        return model, optim_states, meta, int(meta["step"])
    prev = previous_stage(cfg.stage)
    if prev is None:
        mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, sequence_len=cfg.seq_len,
                                    aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim)
        with_device = GPT(mcfg).to(device)
        return with_device, None, None, 0
    model, _, meta = load_stage_model(prev, cfg.depth, device=device, base_dir=cfg.base_dir, load_optimizer=False)
    if model.config.vocab_size != tok.vocab_size:
        raise RustchatError(
            f"the {prev} checkpoint has vocab {model.config.vocab_size} but the tokenizer has {tok.vocab_size}: "
            "use the tokenizer the model was trained with")
    return model, None, meta, 0


def _optimizers(model, cfg: TrainConfig, optim_states):
    opts = model.setup_optimizers(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr)
    if optim_states is not None:
        load_optimizer_states(opts, optim_states)
    return opts


def _banner(cfg: TrainConfig, model, device, tok, tokens_per_step: str, num_steps: int, extra: str = "") -> None:
    device = torch.device(device)
    kernels = "triton (fused linear CE, rotary)" if device.type == "cuda" and model.use_kernels else "torch reference"
    print0(
        f"== rustchat {cfg.stage} | depth {cfg.depth} (dim {model.config.n_embd}, {model.config.n_head} heads) | "
        f"{model.num_params() / 1e6:.2f}M params | device {device} "
        f"({compute_dtype(device)}) | kernels: {kernels} | vocab {tok.vocab_size} | "
        f"{f'seq {cfg.seq_len} | ' if hasattr(cfg, 'seq_len') else ''}"
        f"{tokens_per_step} per step | {num_steps} steps{extra}")


def _grad_accum(cfg: StageConfig, world: int) -> int:
    per = cfg.device_batch_size * cfg.seq_len * world
    if cfg.total_batch_size % per:
        raise RustchatError(
            f"--total-batch-size {cfg.total_batch_size} is not a multiple of device batch x seq len x ranks = {per}")
    return cfg.total_batch_size // per


# ----------------------------------------------------------------------------- evaluation
def _bpb_evaluator(tok, make_val_iter, n_batches: int):
    """Bits per byte on validation text: summed nats over target bytes (specials have 0 bytes
    and are left out of both), so it is comparable across tokenizers."""

    token_bytes = None

    def evaluate(model):
        nonlocal token_bytes
        dev = model.get_device()
        if token_bytes is None:
            token_bytes = torch.as_tensor(tok.token_bytes(), dtype=torch.int64, device=dev)
        nats = torch.zeros((), dtype=torch.float64, device=dev)
        nbytes = torch.zeros((), dtype=torch.float64, device=dev)
        it = make_val_iter()
        for _ in range(n_batches):
            x, y = next(it)
            x, y = torch.as_tensor(x, device=dev).long(), torch.as_tensor(y, device=dev).long()

            with autocast_ctx(dev):
                loss = model(x, y, loss_reduction="none").float()
            b = token_bytes[y.clamp(min=0)] * (y >= 0)
            nats += (loss * (b > 0)).sum().double()
            nbytes += b.sum().double()

        return {"val_bpb": all_reduce_sum(float(nats), dev) / (math.log(2) * max(all_reduce_sum(float(nbytes), dev), 1.0))}

    return evaluate


def _conv_loss_evaluator(tok, conversations, cfg: StageConfig, rank: int, world: int):
    """Validation loss per trained token on held-out conversations (mask applied)."""


    pad = tok.encode_special("<|assistant_end|>")
    n = min(len(conversations), cfg.eval_batches * cfg.device_batch_size * world)
    idx = list(range(rank, n, world))

    def evaluate(model):
        dev = model.get_device()
        total, count = 0.0, 0
        rows = render_batch(tok, [conversations[i] for i in idx], max_tokens=cfg.seq_len + 1)
        for s in range(0, len(rows), cfg.device_batch_size):
            x, y = collate_sft([rows[j] for j in range(s, min(s + cfg.device_batch_size, len(rows)))], pad,
                               max_len=cfg.seq_len + 1)
            x, y = torch.tensor(x, device=dev).long(), torch.tensor(y, device=dev).long()

            with autocast_ctx(dev):
                total += float(model(x, y, loss_reduction="sum"))
            count += int((y >= 0).sum())
        return {"val_loss": all_reduce_sum(total, dev) / max(all_reduce_sum(count, dev), 1.0)}

    return evaluate


def _start_eval(cfg: StageConfig, model, evaluate, start: int) -> dict | None:
    """The validation metric of the model the stage starts from (the previous stage's), so the
    report shows what the stage changed on its own held-out data; None when resuming."""
    if start or not cfg.eval_every:
        return None
    model.eval()
    with torch.no_grad():
        out = evaluate(model)
    model.train()
    return out


# ----------------------------------------------------------------------------- stages
def train_base(cfg: BaseConfig) -> dict:
    info, device, tok = _setup(cfg)
    if cfg.data_dir:
        files = DocumentSource.from_paths([cfg.data_dir]).files
        if len(files) < 2:
            raise RustchatError(f"--data-dir {cfg.data_dir} needs at least 2 files: the last one is used for validation")
        train_files, val_files = files[:-1], files[-1:]
    else:

        data = Path(cfg.base_dir or get_base_dir()) / "base_data"
        if info.rank == 0:  # one downloader; the others wait at the barrier
            download_shards([*range(cfg.num_shards), FINEWEB_SHARDS - 1], data)
        barrier()
        train_files = [data / f"shard_{i:05d}.parquet" for i in range(cfg.num_shards)]
        val_files = [data / f"shard_{FINEWEB_SHARDS - 1:05d}.parquet"]
    train_src, val_src = DocumentSource(train_files), DocumentSource(val_files)
    model, optim_states, meta, start = _load_start(cfg, device, tok)
    opts = _optimizers(model, cfg, optim_states)
    accum = _grad_accum(cfg, info.world_size)
    if cfg.max_steps:
        num_steps = cfg.max_steps
    else:
        num_steps = max(1, math.ceil(cfg.tokens_per_param * model.num_params() / cfg.total_batch_size))
    if meta is not None and cfg.resume:
        num_steps = int(meta.get("num_steps", num_steps)) if not cfg.max_steps else num_steps
    loader = PretrainLoader(tok, train_src, cfg.device_batch_size, cfg.seq_len, device=device, rank=info.rank,
                            world_size=info.world_size, state=data_state_for_rank(meta, info.rank) if cfg.resume else None)
    data = StreamSteps(loader, accum)
    evaluate = _bpb_evaluator(
        tok, lambda: iter(PretrainLoader(tok, val_src, cfg.device_batch_size, cfg.seq_len, device=device,
                                         rank=info.rank, world_size=info.world_size)), cfg.eval_batches)

    _banner(cfg, model, device, tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps)
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data,
                       num_steps=num_steps, lr_multiplier=lambda s: base_lr_multiplier(s, num_steps),
                       start_step=start, evaluate=evaluate, ckpt_dir=_ckpt_dir("base", cfg),
                       momentum_fn=muon_momentum, resumed_meta=meta if cfg.resume else None)
    _report(cfg, model, result)
    return result


def train_mid(cfg: MidConfig) -> dict:
    info, device, tok = _setup(cfg)
    model, optim_states, meta, start = _load_start(cfg, device, tok)  # fails fast if the previous stage is missing
    train = build_mixture("mid", cfg.tasks, "train", cfg.task_dir, cfg.seed)
    val = build_mixture("mid", cfg.tasks, "val", cfg.task_dir, cfg.seed)
    opts = _optimizers(model, cfg, optim_states)
    accum = _grad_accum(cfg, info.world_size)
    # Size the run by the data: one pass over the rendered mixture (Rust renders fast).
    n_tokens = 0
    for s in range(0, len(train), 4096):
        n_tokens += int(render_batch(tok, [train[i] for i in range(s, min(s + 4096, len(train)))], cfg.seq_len).lengths.sum())
    num_steps = cfg.max_steps or max(1, (n_tokens * cfg.num_epochs) // cfg.total_batch_size)
    stream = MidTrainStream(tok, train, cfg.device_batch_size, cfg.seq_len,
                            state=data_state_for_rank(meta, info.rank) if cfg.resume else None,
                            max_tokens=cfg.seq_len, rank=info.rank, world_size=info.world_size)

    data = StreamSteps(stream, accum)
    evaluate = _conv_loss_evaluator(tok, val, cfg, info.rank, info.world_size)
    _banner(cfg, model, device, tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps,
            f" | {len(train):,} conversations, {n_tokens:,} tokens")
    start_eval = _start_eval(cfg, model, evaluate, start)
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data, num_steps=num_steps,
                       lr_multiplier=lambda s: mid_lr_multiplier(s / num_steps), start_step=start,
                       evaluate=evaluate, ckpt_dir=_ckpt_dir("mid", cfg), resumed_meta=meta if cfg.resume else None)
    result["start_eval"] = start_eval
    _report(cfg, model, result)
    return result


def train_sft(cfg: SFTConfig) -> dict:
    info, device, tok = _setup(cfg)
    model, optim_states, meta, start = _load_start(cfg, device, tok)  # fails fast if the previous stage is missing
    train = build_mixture("sft", cfg.tasks, "train", cfg.task_dir, cfg.seed)
    val = build_mixture("sft", cfg.tasks, "val", cfg.task_dir, cfg.seed)
    opts = _optimizers(model, cfg, optim_states)
    E = cfg.total_batch_size
    if E % (cfg.device_batch_size * info.world_size):
        raise RustchatError(f"--total-batch-size {E} examples is not a multiple of device batch x ranks "
                            f"= {cfg.device_batch_size * info.world_size}")
    num_steps = cfg.max_steps or max(1, (len(train) * cfg.num_epochs) // E)
    data = SFTSteps(tok, train, E, cfg.device_batch_size, cfg.seq_len, info.rank, info.world_size, cfg.seed,
                    state=data_state_for_rank(meta, info.rank) if cfg.resume else None, pack=cfg.pack)
    evaluate = _conv_loss_evaluator(tok, val, cfg, info.rank, info.world_size)
    accum = E // (cfg.device_batch_size * info.world_size)
    _banner(cfg, model, device, tok, f"{E} examples (grad accum {accum})", num_steps,
            f" | {len(train):,} conversations")
    start_eval = _start_eval(cfg, model, evaluate, start)
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data, num_steps=num_steps,
                       lr_multiplier=lambda s: sft_lr_multiplier(s, num_steps, init_lr_frac=cfg.init_lr_frac),
                       start_step=start, evaluate=evaluate, ckpt_dir=_ckpt_dir("sft", cfg),
                       resumed_meta=meta if cfg.resume else None)
    result["start_eval"] = start_eval
    _report(cfg, model, result)
    return result


# ----------------------------------------------------------------------------- RL
RL_TASKS = ("gsm8k", "arithmetic", "spellingbee", "simplespelling")  # generative, with a checkable answer
SYNTHETIC_RL_TASKS = ("arithmetic", "spellingbee", "simplespelling")  # generated: sized, with a test split


def _rl_task(name: str, split: str, cfg: RLConfig) -> Task:
    """One split of a named RL task (GSM8K's from --task-dir when a local copy is there)."""
    key = "".join(c for c in name.lower() if c.isalnum())
    if key in SYNTHETIC_RL_TASKS:
        return get_task(key, split=split, size=cfg.train_size if split == "train" else cfg.eval_examples,
                        seed=cfg.seed if split == "train" else 0)
    kw = {"split": split}
    if cfg.task_dir is not None:
        if not Path(cfg.task_dir).is_dir():
            raise RustchatError(f"--task-dir {cfg.task_dir}: no such directory")
        local = local_task_file(cfg.task_dir, key, kw)
        if local is not None:
            kw["path"] = str(local)
    return get_task(key, **kw)


def rl_tasks(cfg: RLConfig) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks) of --tasks. A custom JSONL file holds out its last
    tenth (at least one conversation) for pass@k; the rest is trained on."""
    train, held_out = [], []
    for part in (p.strip() for p in cfg.tasks.split(",")):
        if not part:
            continue
        key = "".join(c for c in part.lower() if c.isalnum())
        if key in RL_TASKS:
            train.append(_rl_task(key, "train", cfg))
            held_out.append(_rl_task(key, "test", cfg))
        elif part.endswith((".jsonl", ".json")) or Path(part).is_file():
            n = len(CustomJSON(part))
            if n < 2:
                raise RustchatError(f"--tasks {part}: RL needs at least 2 conversations (one is held out), got {n}")
            n_out = max(1, n // 10)
            train.append(CustomJSON(part, stop=n - n_out))
            held_out.append(CustomJSON(part, start=n - n_out))
        else:
            raise RustchatError(f"--tasks {part!r}: not a task with a checkable answer; use "
                                f"{', '.join(RL_TASKS)} or a JSONL file of conversations")
    if not train:
        raise RustchatError(f"--tasks {cfg.tasks!r} names no task")
    return train, held_out


def _held_out_problems(tasks: list[Task], n: int) -> list[tuple[Task, dict]]:
    """About n problems, an equal share from each held-out task."""
    share = max(1, n // len(tasks))
    return [(t, t[i]) for t in tasks for i in range(min(share, len(t)))]


def _load_rl_start(cfg: RLConfig, device, tok):
    """As _load_start, but --from PATH (a checkpoint directory) replaces the SFT checkpoint."""
    if cfg.resume or not cfg.from_path:
        return _load_start(cfg, device, tok)
    state, _, meta = load_checkpoint(cfg.from_path, device=device, load_optimizer=False)
    model = build_model_from_meta(meta, device, state)
    if model.config.vocab_size != tok.vocab_size:
        raise RustchatError(f"--from {cfg.from_path}: the checkpoint has vocab {model.config.vocab_size} but the "
                            f"tokenizer has {tok.vocab_size}")
    if model.config.n_layer != cfg.depth:
        raise RustchatError(f"--from {cfg.from_path}: the checkpoint has depth {model.config.n_layer}, not "
                            f"--depth {cfg.depth}")
    return model, None, meta, 0


def train_rl(cfg: RLConfig) -> dict:
    train_tasks, held_out = rl_tasks(cfg)  # a bad --tasks fails before anything loads
    info, device, tok = _setup(cfg)
    model, optim_states, meta, start = _load_rl_start(cfg, device, tok)
    if cfg.examples_per_step % info.world_size:
        raise RustchatError(f"--examples-per-step {cfg.examples_per_step} is not a multiple of the "
                            f"{info.world_size} ranks")
    order = TaskMixture(train_tasks, seed=cfg.seed)

    def stream(pos: int):
        ti, local = order.source(pos % len(order))
        return order.tasks[ti], order.tasks[ti][local]

    opts = _optimizers(model, cfg, optim_states)
    num_steps = cfg.max_steps or max(1, (len(order) * cfg.num_epochs) // cfg.examples_per_step)
    per_rank = cfg.examples_per_step // info.world_size
    engine = Engine(model, tok)  # the calculator tool is active in the rollouts
    # every reply of a step (this rank's share) decodes in one continuous batch
    sampler = Sampler(engine, max_batch=max(1, per_rank * cfg.num_samples), max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_k=cfg.top_k or None)
    data = RolloutSteps(tok, sampler, stream, examples_per_step=cfg.examples_per_step, num_samples=cfg.num_samples,
                        device_batch_size=cfg.device_batch_size, seed=cfg.seed, rank=info.rank,
                        world_size=info.world_size, state=data_state_for_rank(meta, info.rank) if cfg.resume else None)
    evaluate = pass_at_k_evaluator(tok, sampler, _held_out_problems(held_out, cfg.eval_examples),
                                   num_samples=cfg.num_samples, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size)
    _banner(cfg, model, device, tok, f"{cfg.examples_per_step} questions x {cfg.num_samples} replies", num_steps,
            f" | tasks {', '.join(t.name for t in train_tasks)} ({len(order):,} problems)")
    try:
        result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data, num_steps=num_steps,
                           lr_multiplier=lambda s: sft_lr_multiplier(s, num_steps, init_lr_frac=cfg.init_lr_frac),
                           start_step=start, evaluate=evaluate, ckpt_dir=_ckpt_dir("rl", cfg),
                           resumed_meta=meta if cfg.resume else None, step_fn=rl_train_step)
    finally:
        sampler.close()
    hist = result["history"]
    extra = {}
    if hist:
        share = float(np.mean([h["rollout_share"] for h in hist]))
        tps = float(np.median([h["sample_tok_per_s"] for h in hist]))
        print0(f"rl: reward {hist[0]['reward']:.3f} -> {hist[-1]['reward']:.3f}; rollouts {100 * share:.0f}% of step "
               f"time, {tps:,.0f} sampled tokens/s (median)")
        k = max(1, len(hist) // 10)
        extra = {"reward first -> last": f"{np.mean([h['reward'] for h in hist[:k]]):.3f} -> "
                                         f"{np.mean([h['reward'] for h in hist[-k:]]):.3f} (means of {k} steps)",
                 "groups all right / all wrong (last)": f"{100 * hist[-1]['all_right']:.0f}% / "
                                                        f"{100 * hist[-1]['all_wrong']:.0f}%",
                 "rollout share of step time": f"{100 * share:.0f}%",
                 "sampled tokens/s (median)": f"{tps:,.0f}"}
    _report(cfg, model, result, extra)
    return result


STAGE_FUNCS = {"base": train_base, "mid": train_mid, "sft": train_sft, "rl": train_rl}


def _report(cfg: TrainConfig, model, result: dict, extra: dict | None = None) -> None:
    if get_rank() != 0:
        return
    # the whole run: after --resume, the steps and time before it count too
    hist = result.get("run_history", result["history"])
    rows = {
        "depth": cfg.depth,
        "parameters": f"{model.num_params():,}",
        "steps": result["steps"],
        "first loss": f"{hist[0]['loss']:.4f}" if hist else "-",
        "last loss": f"{hist[-1]['loss']:.4f}" if hist else "-",
        "tokens/s (median)": f"{np.median([h['tok_per_s'] for h in hist]):,.0f}" if hist else "-",
        "wall time": f"{result.get('run_seconds', result['seconds']):.1f} s",
    }
    if result.get("resumed_at") is not None:
        rows["resumed"] = f"at step {result['resumed_at']} (first loss and wall time cover the whole run)"
    if result.get("last_eval"):
        rows.update({k: f"{v:.4f}" for k, v in result["last_eval"].items() if k != "step"})
    if result.get("start_eval"):
        rows.update({f"{k} at start": f"{v:.4f}" for k, v in result["start_eval"].items()})
    if hist and "mfu" in hist[-1]:
        rows["MFU (median)"] = f"{100 * np.median([h['mfu'] for h in hist]):.1f}%"
    rows.update(extra or {})
    write_section(cfg.stage, rows, base_dir=cfg.base_dir)


__all__ = ["train_base", "train_mid", "train_sft", "train_rl", "STAGE_FUNCS", "build_mixture"]
