"""The training stages: base pretraining, mid-training and SFT, built on `trainer.run_stage`.

Each stage reads the previous stage's latest checkpoint (base starts from scratch), or its own
with --resume, and writes step-numbered checkpoints under
<base dir>/<stage>_checkpoints/d<depth>/ plus its section of <base dir>/report.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import RustchatError, print0
from .trainer import SFTStepData, StageConfig, StreamStepData, data_state_for_rank, run_stage

# ----------------------------------------------------------------------------- task mixtures
# name -> (task name, kwargs) lists, per stage and split. "default" is SPEC's recipe on the hub
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
        "mid": {
            "train": [("arithmetic", {"size": 2000, "split": "train"}), ("identity", {}),
                      ("simplespelling", {"size": 1000, "split": "train"}), ("spellingbee", {"size": 1000, "split": "train"})],
            "val": [("arithmetic", {"size": 100, "split": "test"}), ("spellingbee", {"size": 100, "split": "test"})],
        },
        "sft": {
            "train": [("arithmetic", {"size": 400, "split": "train"}), ("identity", {}),
                      ("simplespelling", {"size": 200, "split": "train"}), ("spellingbee", {"size": 400, "split": "train"})],
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
    from .tasks import TaskMixture, get_task

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
def _setup(cfg: StageConfig):
    import torch

    from .cli import _load_tokenizer
    from .common import init_distributed

    info, device = init_distributed(cfg.device, seed=cfg.seed)
    tok = _load_tokenizer(str(Path(cfg.base_dir) / "tokenizer") if cfg.base_dir else None)
    torch.manual_seed(cfg.seed + info.rank)
    return info, device, tok


def _ckpt_dir(stage: str, cfg: StageConfig) -> Path:
    from .checkpoint import stage_dir

    return stage_dir(stage, cfg.depth, cfg.base_dir)


def _load_start(cfg: StageConfig, device, tok):
    """(model, optimizer states or None, meta or None, start_step) for a stage."""
    from .checkpoint import find_last_step, load_model, previous_stage, restore_rng_state
    from .model import GPT, GPTConfig

    own = _ckpt_dir(cfg.stage, cfg)
    if cfg.resume:
        if find_last_step(own) is None:
            raise RustchatError(f"--resume: no {cfg.stage} checkpoint in {own}; run without --resume to start")
        model, optim_states, meta = load_model(cfg.stage, cfg.depth, device=device, base_dir=cfg.base_dir,
                                               load_optimizer=True)
        restore_rng_state(meta.get("rng", {}))
        return model, optim_states, meta, int(meta["step"])
    prev = previous_stage(cfg.stage)
    if prev is None:
        mcfg = GPTConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, sequence_len=cfg.seq_len)
        with_device = GPT(mcfg).to(device)
        return with_device, None, None, 0
    model, _, meta = load_model(prev, cfg.depth, device=device, base_dir=cfg.base_dir, load_optimizer=False)
    if model.config.vocab_size != tok.vocab_size:
        raise RustchatError(
            f"the {prev} checkpoint has vocab {model.config.vocab_size} but the tokenizer has {tok.vocab_size}: "
            "use the tokenizer the model was trained with")
    return model, None, meta, 0


def _optimizers(model, cfg: StageConfig, optim_states):
    from .checkpoint import load_optimizer_states

    opts = model.setup_optimizers(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr)
    if optim_states is not None:
        load_optimizer_states(opts, optim_states)
    return opts


def _banner(cfg: StageConfig, model, device, tok, tokens_per_step: str, num_steps: int, extra: str = "") -> None:
    import torch

    from .common import compute_dtype

    device = torch.device(device)
    kernels = "triton (fused linear CE, rotary)" if device.type == "cuda" and model.use_kernels else "torch reference"
    print0(
        f"== rustchat {cfg.stage} | depth {cfg.depth} | {model.num_params() / 1e6:.2f}M params | device {device} "
        f"({compute_dtype(device)}) | kernels: {kernels} | vocab {tok.vocab_size} | seq {cfg.seq_len} | "
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
    import torch

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
            x, y, _ = next(it)
            x, y = torch.as_tensor(x, device=dev).long(), torch.as_tensor(y, device=dev).long()
            from .common import autocast_ctx

            with autocast_ctx(dev):
                loss = model(x, y, loss_reduction="none").float()
            b = token_bytes[y.clamp(min=0)] * (y >= 0)
            nats += (loss * (b > 0)).sum().double()
            nbytes += b.sum().double()
        from .trainer import _all_reduce_sum

        return {"val_bpb": _all_reduce_sum(float(nats), dev) / (math.log(2) * max(_all_reduce_sum(float(nbytes), dev), 1.0))}

    return evaluate


def _conv_loss_evaluator(tok, conversations, cfg: StageConfig, rank: int, world: int):
    """Validation loss per trained token on held-out conversations (mask applied)."""
    import torch

    from .conversation import collate_sft, render_batch
    from .trainer import _all_reduce_sum

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
            from .common import autocast_ctx

            with autocast_ctx(dev):
                total += float(model(x, y, loss_reduction="sum"))
            count += int((y >= 0).sum())
        return {"val_loss": _all_reduce_sum(total, dev) / max(_all_reduce_sum(count, dev), 1.0)}

    return evaluate


# ----------------------------------------------------------------------------- stages
def train_base(cfg: StageConfig) -> dict:
    from .common import get_base_dir
    from .pretrain_data import FINEWEB_SHARDS, DocumentSource, PretrainLoader, download_shards

    info, device, tok = _setup(cfg)
    if cfg.data_dir:
        files = DocumentSource.from_paths([cfg.data_dir]).files
        if len(files) < 2:
            raise RustchatError(f"--data-dir {cfg.data_dir} needs at least 2 files: the last one is used for validation")
        train_files, val_files = files[:-1], files[-1:]
    else:
        from .common import barrier

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
    start_state = data_state_for_rank(meta, info.rank) if cfg.resume else None

    def make_iter(state):
        return PretrainLoader(tok, train_src, cfg.device_batch_size, cfg.seq_len, device=device, rank=info.rank,
                              world_size=info.world_size, cursor=state)

    data = StreamStepData(make_iter, accum, start_state)
    evaluate = _bpb_evaluator(
        tok, lambda: iter(PretrainLoader(tok, val_src, cfg.device_batch_size, cfg.seq_len, device=device,
                                         rank=info.rank, world_size=info.world_size)), cfg.eval_batches)
    from .schedules import base_lr_multiplier, muon_momentum

    _banner(cfg, model, device, tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps)
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data,
                       num_steps=num_steps, lr_multiplier=lambda s: base_lr_multiplier(s, num_steps),
                       start_step=start, evaluate=evaluate, ckpt_dir=_ckpt_dir("base", cfg),
                       momentum_fn=muon_momentum)
    _report(cfg, model, result)
    return result


def train_mid(cfg: StageConfig) -> dict:
    from .conversation import MidTrainStream, render_batch
    from .schedules import mid_lr_multiplier

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
    start_state = data_state_for_rank(meta, info.rank) if cfg.resume else None

    def make_iter(state):
        cursor = None if not state else (state["conversation"], state["offset"], state["epoch"])
        return MidTrainStream(tok, train, cfg.device_batch_size, cfg.seq_len, start_cursor=cursor,
                              max_tokens=cfg.seq_len, rank=info.rank, world_size=info.world_size)

    data = StreamStepData(make_iter, accum, start_state)
    evaluate = _conv_loss_evaluator(tok, val, cfg, info.rank, info.world_size)
    _banner(cfg, model, device, tok, f"{cfg.total_batch_size:,} tokens (grad accum {accum})", num_steps,
            f" | {len(train):,} conversations, {n_tokens:,} tokens")
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data, num_steps=num_steps,
                       lr_multiplier=lambda s: mid_lr_multiplier(s / num_steps), start_step=start,
                       evaluate=evaluate, ckpt_dir=_ckpt_dir("mid", cfg))
    _report(cfg, model, result)
    return result


def train_sft(cfg: StageConfig) -> dict:
    from .schedules import sft_lr_multiplier

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
    start_state = data_state_for_rank(meta, info.rank) if cfg.resume else None
    data = SFTStepData(tok, train, E, cfg.device_batch_size, cfg.seq_len, info.rank, info.world_size, cfg.seed,
                       start_state, pack=cfg.pack)
    evaluate = _conv_loss_evaluator(tok, val, cfg, info.rank, info.world_size)
    accum = E // (cfg.device_batch_size * info.world_size)
    _banner(cfg, model, device, tok, f"{E} examples (grad accum {accum})", num_steps,
            f" | {len(train):,} conversations")
    result = run_stage(cfg, tok=tok, model=model, optimizers=opts, data=data, num_steps=num_steps,
                       lr_multiplier=lambda s: sft_lr_multiplier(s, num_steps, init_lr_frac=cfg.init_lr_frac),
                       start_step=start, evaluate=evaluate, ckpt_dir=_ckpt_dir("sft", cfg))
    _report(cfg, model, result)
    return result


STAGE_FUNCS = {"base": train_base, "mid": train_mid, "sft": train_sft}


def _report(cfg: StageConfig, model, result: dict) -> None:
    from .common import get_rank
    from .report import write_section

    if get_rank() != 0:
        return
    hist = result["history"]
    rows = {
        "depth": cfg.depth,
        "parameters": f"{model.num_params():,}",
        "steps": result["steps"],
        "first loss": f"{hist[0]['loss']:.4f}" if hist else "-",
        "last loss": f"{hist[-1]['loss']:.4f}" if hist else "-",
        "tokens/s (median)": f"{np.median([h['tok_per_s'] for h in hist]):,.0f}" if hist else "-",
        "wall time": f"{result['seconds']:.1f} s",
    }
    if result.get("last_eval"):
        rows.update({k: f"{v:.4f}" for k, v in result["last_eval"].items() if k != "step"})
    if hist and "mfu" in hist[-1]:
        rows["MFU (median)"] = f"{100 * np.median([h['mfu'] for h in hist]):.1f}%"
    write_section(cfg.stage, rows, base_dir=cfg.base_dir)


def config_from_args(stage: str, args) -> StageConfig:
    d = {k: v for k, v in vars(args).items() if k in StageConfig.__dataclass_fields__ and v is not None}
    d["stage"] = stage
    return StageConfig(**d)


def defaults_for(stage: str) -> dict:
    """SPEC's per-stage defaults (override with flags)."""
    if stage == "sft":
        return {"device_batch_size": 4, "total_batch_size": 32, "eval_every": 100}
    if stage == "mid":
        return {"device_batch_size": 32, "total_batch_size": 524_288, "eval_every": 150}
    return {"device_batch_size": 32, "total_batch_size": 524_288, "eval_every": 250}


__all__ = ["StageConfig", "train_base", "train_mid", "train_sft", "STAGE_FUNCS", "build_mixture"]
