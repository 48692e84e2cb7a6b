"""The training stages: base pretraining, mid-training and SFT, each one readable function
(`train_base`, `train_mid`, `train_sft`) that sets up data, model and schedule and hands them
to `trainer.run_stage`.

Each stage reads the previous stage's latest checkpoint (base starts from scratch), or its own
with --resume, and writes step-numbered checkpoints under
<base dir>/<stage>_checkpoints/d<depth>/ plus its section of <base dir>/report.md.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    StageLock,
    check_fresh_run,
    find_last_step,
    latest_meta,
    load_optimizer_states,
    load_stage_model,
    pick_depth,
    previous_stage,
    restore_rng_state,
    stage_dir,
)
from .common import RustchatError, get_base_dir, print0
from .config import BaseConfig, MidConfig, SFTConfig, StageConfig
from .bpb import bits_per_byte, val_token_stream
from .conversation import collate_sft, render_batch
from .data.midtrain import MidTrainStream
from .data.pretrain import FINEWEB_SHARDS, DocumentSource, PretrainLoader, download_shards
from .data.steps import SFTSteps, StreamSteps
from .model import GPT, GPTConfig
from .report import write_section
from .runtime import autocast_ctx, barrier, compute_dtype, get_rank, init_distributed
from .schedules import base_lr_multiplier, mid_lr_multiplier, muon_momentum, sft_lr_multiplier
from .tasks import TaskMixture, task_from
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


def build_mixture(stage: str, preset: str, split: str, task_dir: str | None = None, seed: int = 42):
    """A stage's task mixture; hub datasets come from their local copies in task_dir when it has
    them (`tasks.task_from`)."""
    if preset not in MIXTURES:
        raise RustchatError(f"unknown task preset {preset!r}; known: {', '.join(MIXTURES)}")
    return TaskMixture([task_from(name, kwargs, task_dir) for name, kwargs in MIXTURES[preset][stage][split]],
                       seed=seed)


# ----------------------------------------------------------------------------- the run
def resolve_run(cfg: StageConfig) -> StageConfig:
    """The run a stage command means: its depth when --depth is not given (the one depth with
    the checkpoint it starts from, `pick_depth`; a new base model: 10), and with --resume the
    run's own settings from its latest checkpoint (a differing flag is applied, saying so, or
    refused in one line: `StageConfig.resumed`)."""
    if cfg.resume and cfg.force:
        raise RustchatError("--resume continues the run in the stage's directory and --force replaces it: pick one")
    needs = cfg.stage if cfg.resume else previous_stage(cfg.stage)
    if cfg.depth is None:
        cfg = cfg.replace(depth=NEW_MODEL_DEPTH if needs is None else pick_depth(needs, cfg.base_dir))
    if not cfg.resume:
        return cfg
    own = _ckpt_dir(cfg.stage, cfg)
    meta = latest_meta(own)
    if meta is None:
        raise RustchatError(f"--resume: no {cfg.stage} checkpoint in {own}; run without --resume to start")
    saved = meta.get("config")
    cfg, applied = cfg.resumed(saved if isinstance(saved, dict) else {})
    for note in applied:
        print0(f"--resume: {note}")
    return cfg


def one_run(train):
    """A stage's run owns its checkpoint directory: `resolve_run` first, then one writer at a
    time (`StageLock`), and a new run never hides behind an old one's checkpoints
    (`check_fresh_run`: refused, or archived with --force when the run saves its first step)."""

    @functools.wraps(train)
    def run(cfg: StageConfig) -> dict:
        cfg = resolve_run(cfg)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
            return train(cfg)
        own = _ckpt_dir(cfg.stage, cfg)
        with StageLock(own):
            if not cfg.resume:
                check_fresh_run(own, force=cfg.force)
            return train(cfg)

    return run


# ----------------------------------------------------------------------------- shared setup
NEW_MODEL_DEPTH = 10  # a base run without --depth and nothing to continue: nanochat's d10


@dataclass
class StageStart:
    """What every stage starts with: the processes, the tokenizer, the model (new, the previous
    stage's, or its own with --resume) and its optimizers. `meta` is the checkpoint resumed
    from (None for a new run), `start_step` where the loop begins."""

    info: object
    device: object
    tok: object
    model: object
    optimizers: list
    meta: dict | None
    start_step: int

    def data_state(self):
        """This rank's data cursor to continue from (None for a new run)."""
        return data_state_for_rank(self.meta, self.info.rank)


@dataclass
class ConversationStart(StageStart):
    """mid and SFT also start with their task mixtures and the held-out loss evaluator."""

    train: object = None
    val: object = None
    evaluate: object = None


def _start(cfg: StageConfig) -> StageStart:
    info, device = init_distributed(cfg.device, seed=cfg.seed)
    tok = load_tokenizer(cfg.base_dir)
    torch.manual_seed(cfg.seed + info.rank)
    model, optim_states, meta, start = _load_start(cfg, device, tok)  # fails fast if the previous stage is missing
    return StageStart(info, device, tok, model, _optimizers(model, cfg, optim_states), meta, start)


def _conversation_start(cfg: MidConfig | SFTConfig) -> ConversationStart:
    """The shared start of mid and SFT: model, then the stage's task mixtures, then optimizers."""
    s = _start(cfg)
    train = build_mixture(cfg.stage, cfg.tasks, "train", cfg.task_dir, cfg.seed)
    val = build_mixture(cfg.stage, cfg.tasks, "val", cfg.task_dir, cfg.seed)
    return ConversationStart(**vars(s), train=train, val=val,
                             evaluate=_conv_loss_evaluator(s.tok, val, cfg, s.info.rank, s.info.world_size))


def _ckpt_dir(stage: str, cfg: StageConfig) -> Path:
    return stage_dir(stage, cfg.depth, cfg.base_dir)


def _load_start(cfg: StageConfig, device, tok):
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
    return model, None, None, 0


def _optimizers(model, cfg: StageConfig, optim_states):
    opts = model.setup_optimizers(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr)
    if optim_states is not None:
        load_optimizer_states(opts, optim_states)
    return opts


def _num_steps(cfg: StageConfig, s: StageStart, horizon: int) -> int:
    """--max-steps, else the stage's horizon; a resumed run keeps the horizon it was started
    with (its schedule) unless --max-steps changes it."""
    if cfg.max_steps:
        return cfg.max_steps
    if s.meta is not None and s.meta.get("num_steps"):
        return int(s.meta["num_steps"])
    return horizon


def _banner(cfg: StageConfig, model, device, tok, tokens_per_step: str, num_steps: int, extra: str = "") -> None:
    device = torch.device(device)
    kernels = "triton (fused linear CE, rotary)" if device.type == "cuda" and model.use_kernels else "torch reference"
    print0(
        f"== rustchat {cfg.stage} | depth {cfg.depth} (dim {model.config.n_embd}, {model.config.n_head} heads) | "
        f"{model.num_params() / 1e6:.2f}M params | device {device} "
        f"({compute_dtype(device)}) | kernels: {kernels} | vocab {tok.vocab_size} | seq {cfg.seq_len} | "
        f"{tokens_per_step} per step | {num_steps} steps{extra}")


def _grad_accum(cfg: StageConfig, world: int) -> int:
    per = cfg.device_batch_size * cfg.seq_len * world
    if cfg.total_batch_size % per:
        raise RustchatError(
            f"--total-batch-size {cfg.total_batch_size} is not a multiple of device batch x seq len x ranks = {per}")
    return cfg.total_batch_size // per


# ----------------------------------------------------------------------------- evaluation
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
@one_run
def train_base(cfg: BaseConfig) -> dict:
    if cfg.data_dir:
        files = DocumentSource.from_paths([cfg.data_dir]).files
        if len(files) < 2:
            raise RustchatError(f"--data-dir {cfg.data_dir} needs at least 2 files: the last one is used for validation")
        train_files, val_files = files[:-1], files[-1:]
    else:
        train_files, val_files = None, None
    s = _start(cfg)
    if train_files is None:
        data = Path(cfg.base_dir or get_base_dir()) / "base_data"
        if s.info.rank == 0:  # one downloader; the others wait at the barrier
            download_shards([*range(cfg.num_shards), FINEWEB_SHARDS - 1], data)
        barrier()
        train_files = [data / f"shard_{i:05d}.parquet" for i in range(cfg.num_shards)]
        val_files = [data / f"shard_{FINEWEB_SHARDS - 1:05d}.parquet"]
    train_src = DocumentSource(train_files)
    accum = _grad_accum(cfg, s.info.world_size)
    num_steps = _num_steps(cfg, s, max(1, math.ceil(cfg.tokens_per_param * s.model.num_params()
                                                    / cfg.total_batch_size)))
    loader = PretrainLoader(s.tok, train_src, cfg.device_batch_size, cfg.seq_len, device=s.device, rank=s.info.rank,
                            world_size=s.info.world_size, state=s.data_state())
    data = StreamSteps(loader, accum)
    val = val_token_stream(s.tok, val_files, cfg.bpb_tokens)  # the tokens `eval -i base` scores
    evaluate = lambda model: {"val_bpb": bits_per_byte(model, s.tok, val)[0]}  # noqa: E731

    _banner(cfg, s.model, s.device, s.tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps)
    result = run_stage(cfg, tok=s.tok, model=s.model, optimizers=s.optimizers, data=data,
                       num_steps=num_steps, lr_multiplier=lambda step: base_lr_multiplier(step, num_steps),
                       start_step=s.start_step, evaluate=evaluate, ckpt_dir=_ckpt_dir("base", cfg),
                       momentum_fn=muon_momentum, resumed_meta=s.meta)
    _report(cfg, s.model, result)
    return result


@one_run
def train_mid(cfg: MidConfig) -> dict:
    s = _conversation_start(cfg)
    accum = _grad_accum(cfg, s.info.world_size)
    # Size the run by the data: one pass over the rendered mixture (Rust renders fast).
    n_tokens = 0
    for i in range(0, len(s.train), 4096):
        rows = render_batch(s.tok, [s.train[j] for j in range(i, min(i + 4096, len(s.train)))], cfg.seq_len)
        n_tokens += int(rows.lengths.sum())
    num_steps = _num_steps(cfg, s, max(1, (n_tokens * cfg.num_epochs) // cfg.total_batch_size))
    stream = MidTrainStream(s.tok, s.train, cfg.device_batch_size, cfg.seq_len, state=s.data_state(),
                            max_tokens=cfg.seq_len, rank=s.info.rank, world_size=s.info.world_size)
    data = StreamSteps(stream, accum)
    _banner(cfg, s.model, s.device, s.tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps,
            f" | {len(s.train):,} conversations, {n_tokens:,} tokens")
    start_eval = _start_eval(cfg, s.model, s.evaluate, s.start_step)
    result = run_stage(cfg, tok=s.tok, model=s.model, optimizers=s.optimizers, data=data, num_steps=num_steps,
                       lr_multiplier=lambda step: mid_lr_multiplier(step / num_steps), start_step=s.start_step,
                       evaluate=s.evaluate, ckpt_dir=_ckpt_dir("mid", cfg), resumed_meta=s.meta)
    result["start_eval"] = start_eval
    _report(cfg, s.model, result)
    return result


@one_run
def train_sft(cfg: SFTConfig) -> dict:
    s = _conversation_start(cfg)
    E = cfg.total_batch_conversations
    per = cfg.device_batch_size * s.info.world_size
    if E % per:
        raise RustchatError(f"--total-batch-conversations {E} is not a multiple of device batch x ranks = {per}")
    num_steps = _num_steps(cfg, s, max(1, (len(s.train) * cfg.num_epochs) // E))
    data = SFTSteps(s.tok, s.train, E, cfg.device_batch_size, cfg.seq_len, s.info.rank, s.info.world_size, cfg.seed,
                    state=s.data_state(), pack=cfg.pack)
    _banner(cfg, s.model, s.device, s.tok, f"{E} conversations (grad accum {E // per})", num_steps,
            f" | {len(s.train):,} conversations")
    start_eval = _start_eval(cfg, s.model, s.evaluate, s.start_step)
    result = run_stage(cfg, tok=s.tok, model=s.model, optimizers=s.optimizers, data=data, num_steps=num_steps,
                       lr_multiplier=lambda step: sft_lr_multiplier(step, num_steps, init_lr_frac=cfg.init_lr_frac),
                       start_step=s.start_step, evaluate=s.evaluate, ckpt_dir=_ckpt_dir("sft", cfg),
                       resumed_meta=s.meta)
    result["start_eval"] = start_eval
    _report(cfg, s.model, result)
    return result


STAGE_FUNCS = {"base": train_base, "mid": train_mid, "sft": train_sft}


def _report(cfg: StageConfig, model, result: dict) -> None:
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
    write_section(cfg.stage, rows, base_dir=cfg.base_dir)


__all__ = ["train_base", "train_mid", "train_sft", "STAGE_FUNCS", "build_mixture"]
