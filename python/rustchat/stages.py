"""The training stages: base pretraining, mid-training and SFT, each one readable function
(`train_base`, `train_mid`, `train_sft`) that sets up data, model and schedule and hands them
to `trainer.run_stage`.

Each stage reads the previous stage's latest checkpoint (base starts from scratch), or its own
with --resume, and writes step-numbered checkpoints under
<base dir>/<stage>_checkpoints/d<depth>/ plus its section of <base dir>/report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import attention
from .checkpoint import (
    StageLock,
    build_model_from_meta,
    check_fresh_run,
    find_last_step,
    latest_meta,
    load_checkpoint,
    load_optimizer_states,
    load_stage_model,
    pick_depth,
    previous_stage,
    restore_rng_state,
    stage_dir,
)
from .common import FINEWEB_SHARDS, MAX_ROWS, RustchatError, get_base_dir, print0
from .config import BaseConfig, MidConfig, RLConfig, SFTConfig, StageConfig, TrainConfig
from .bpb import bits_per_byte, val_token_stream
from .conversation import collate_sft, render_batch
from .data.bestfit import PACKING, BestFitLoader
from .core_bundle import resolve_bundle
from .core_eval import evaluate_core
from .data.midtrain import MidTrainStream
from .data.pretrain import DocumentSource, PretrainLoader, download_shards
from .data.steps import SFTSteps, StreamSteps
from .model import ARCHS, GPT, GPTConfig
from .engine import Engine
from .report import write_section
from .fp8 import enable_fp8, fp8_refusal
from .optim import optimizer_state_bytes, saved_recipe
from .rl import RolloutSteps, Sampler, pass_at_k_evaluator, rl_train_step
from .rules import DEFAULTS, REFERENCE_DEPTH, Plan, plan_2026, plan_classic, scaling_params
from .runtime import autocast_ctx, barrier, compute_dtype, get_rank, get_world_size, init_distributed
from .schedules import (
    base_lr_multiplier,
    mid_lr_multiplier,
    muon_momentum,
    muon_momentum_2026,
    muon_weight_decay,
    sft_lr_multiplier,
)
from .tasks import CustomJSON, Task, TaskMixture, get_task, task_from
from .tokenizer import load_tokenizer
from .trainer import all_reduce_sum, data_state_for_rank, run_stage

# ----------------------------------------------------------------------------- task mixtures
# name -> (task name, kwargs) lists, per stage and split. "default" is nanochat's recipe on the hub
# datasets (48abd7d's mid and SFT mixtures; 92d63d4's SFT from base); "tiny" is the offline
# recipe (synthetic tasks and bundled identity chats).
MIXTURES = {
    "default": {
        "mid": {
            "train": [
                ("smoltalk", {"split": "train"}),
                ("mmlu", {"subset": "auxiliary_train", "split": "train"}),
                ("gsm8k", {"split": "train"}),
                ("identity", {}),
                ("identity", {}),
                ("simplespelling", {"size": 200_000, "split": "train"}),
                ("spellingbee", {"size": 80_000, "split": "train"}),
            ],
            "val": [
                ("smoltalk", {"split": "test"}),
                ("mmlu", {"subset": "all", "split": "test", "stop": 5200}),
                ("gsm8k", {"split": "test", "stop": 420}),
            ],
        },
        "sft": {
            "train": [
                ("arc", {"subset": "ARC-Easy", "split": "train"}),
                ("arc", {"subset": "ARC-Challenge", "split": "train"}),
                ("gsm8k", {"split": "train"}),
                ("smoltalk", {"split": "train", "stop": 10_000}),
                ("identity", {}),
                ("simplespelling", {"size": 300, "split": "train"}),
                ("spellingbee", {"size": 300, "split": "train"}),
            ],
            "val": [("smoltalk", {"split": "test"})],
        },
        # SFT straight from base (nanochat's 2026 recipe, 92d63d4): mid-training's conversations folded in,
        # MMLU 3 epochs (multiple choice), GSM8K 4 epochs (math and tool use); validation as mid's
        "sft-from-base": {
            "train": [
                ("smoltalk", {"split": "train"}),
                *[("mmlu", {"subset": "auxiliary_train", "split": "train"})] * 3,
                *[("gsm8k", {"split": "train"})] * 4,
            ],
            "val": [
                ("smoltalk", {"split": "test"}),
                ("mmlu", {"subset": "all", "split": "test", "stop": 5200}),
                ("gsm8k", {"split": "test", "stop": 420}),
            ],
        },
    },
    "tiny": {
        # mid teaches the tasks and SFT the persona: identity is SFT's alone (sliced, as its 1,000
        # conversations would crowd out the measured tasks). Measured on three seeds each, mid without
        # identity learned every arithmetic template on all six seeds tried, where mid with it left one
        # template unlearned on one seed in three (docs/benchmarks.md, "Identity in SFT only")
        "mid": {
            "train": [
                ("arithmetic", {"size": 3000, "split": "train"}),
                ("simplespelling", {"size": 1000, "split": "train"}),
                ("spellingbee", {"size": 2000, "split": "train"}),
            ],
            "val": [("arithmetic", {"size": 100, "split": "test"}), ("spellingbee", {"size": 100, "split": "test"})],
        },
        # identity listed twice, so each of its 150 conversations is seen twice per epoch: once, SFT's
        # Identity score beat mid's by less than it varied across seeds (10 to 53.5 on six seeds); twice
        # (with 30 more steps for the added rows) it beat mid by more on every seed measured
        # (docs/benchmarks.md, "Identity seen twice in SFT"). SpellingBee 2,000 (was 1,200; all of
        # mid's words, the same generator): its errors are words miscopied into the check, and more
        # words, not more passes over the same ones, lifted it on every seed measured, most where mid
        # had half-learned to copy (docs/benchmarks.md, "More words in tiny SFT")
        "sft": {
            "train": [
                ("arithmetic", {"size": 800, "split": "train"}),
                ("identity", {"stop": 150}),
                ("identity", {"stop": 150}),
                ("simplespelling", {"size": 300, "split": "train"}),
                ("spellingbee", {"size": 2000, "split": "train"}),
            ],
            # held-out identity conversations too (the bundled set's last 100, which no stage trains
            # on), so the val loss also sees what SFT teaches and mid does not
            "val": [
                ("arithmetic", {"size": 64, "split": "test"}),
                ("spellingbee", {"size": 64, "split": "test"}),
                ("identity", {"start": 900}),
            ],
        },
    },
}
# the offline recipe from base: the tiny mid and SFT training sets together, SFT's validation
MIXTURES["tiny"]["sft-from-base"] = {
    "train": MIXTURES["tiny"]["mid"]["train"] + MIXTURES["tiny"]["sft"]["train"],
    "val": MIXTURES["tiny"]["sft"]["val"],
}
SFT_FROM_BASE = dict(init_lr_frac=0.8, warmdown_ratio=0.5)  # nanochat's 2026 SFT schedule (92d63d4)
SFT_FROM_MID = dict(init_lr_frac=0.02, warmdown_ratio=1.0)  # nanochat's SFT after mid-training (48abd7d)
SFT_LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr")  # SFT's lr flags, inherited from base


def build_mixture(stage: str, preset: str, split: str, task_dir: str | None = None, seed: int = 42):
    """A stage's task mixture; hub datasets come from their local copies in task_dir when it has
    them (`tasks.task_from`)."""
    if preset not in MIXTURES:
        raise RustchatError(f"unknown task preset {preset!r}; known: {', '.join(MIXTURES)}")
    return TaskMixture(
        [task_from(name, kwargs, task_dir) for name, kwargs in MIXTURES[preset][stage][split]], seed=seed
    )


# ----------------------------------------------------------------------------- the run
def resolve_run(cfg: StageConfig) -> StageConfig:
    """The run a stage command means: its depth when --depth is not given (the one depth with
    the checkpoint it starts from, `pick_depth`; a new base model: 10), and with --resume the
    run's own settings from its latest checkpoint (a differing flag is applied, saying so, or
    refused in one line: `StageConfig.resumed`)."""
    if cfg.resume and cfg.force:
        raise RustchatError("--resume continues the run in the stage's directory and --force replaces it: pick one")
    needs = cfg.stage if cfg.resume else getattr(cfg, "from_stage", None) or previous_stage(cfg.stage)
    if cfg.depth is None and getattr(cfg, "from_path", None) and not cfg.resume:  # RL's --from PATH: its depth
        meta = latest_meta(cfg.from_path)
        if meta is None:
            raise RustchatError(f"--from {cfg.from_path}: no checkpoint there")
        cfg = cfg.replace(depth=int((meta.get("model_config") or {}).get("n_layer", 0)) or None)
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
NEW_MODEL_DEPTH = 10  # a base run without --depth and nothing to continue: the d10 preset's depth


@dataclass
class StageStart:
    """What every stage starts with: the processes, the tokenizer, the model (new, the previous
    stage's, or its own with --resume) and its optimizers. `meta` is the checkpoint resumed
    from (None for a new run), `start_step` where the loop begins; `plan` is base's training
    plan (the rules' derivation), None for the others."""

    info: object
    device: object
    tok: object
    model: object
    optimizers: list
    meta: dict | None
    start_step: int
    plan: Plan | None = None

    def data_state(self, reshard=None):
        """This rank's data cursor to continue from (None for a new run); `reshard` maps a
        per-rank cursor of a run on another number of processes (`data_state_for_rank`)."""
        return data_state_for_rank(self.meta, self.info.rank, self.info.world_size, reshard)


@dataclass
class ConversationStart(StageStart):
    """mid and SFT also start with their task mixtures and the held-out loss evaluator."""

    train: object = None
    val: object = None
    evaluate: object = None


def _start(cfg: TrainConfig) -> StageStart:
    """Processes, tokenizer, model (FP8 matmuls with base --fp8), base's plan, optimizers."""
    info, device = init_distributed(cfg.device, seed=cfg.seed)
    fp8 = getattr(cfg, "fp8", False)
    if fp8 and (why := fp8_refusal(device)):  # before any download
        raise RustchatError(why)
    tok = load_tokenizer(cfg.base_dir)
    torch.manual_seed(cfg.seed + info.rank)
    # fails fast if the previous stage is missing
    model, optim_states, meta, start, from_meta = _load_start(cfg, device, tok)
    if fp8:  # before the optimizer: it holds the same parameters, FP8 only changes the matmuls
        print0(enable_fp8(model, device))
    plan = base_plan(cfg, model) if isinstance(cfg, BaseConfig) else None
    opt_cfg = cfg.replace(**_sft_lrs(cfg, from_meta)) if isinstance(cfg, SFTConfig) else cfg
    return StageStart(info, device, tok, model, _optimizers(model, opt_cfg, optim_states, plan), meta, start, plan)


def _mixture(cfg: MidConfig | SFTConfig) -> str:
    """The name of the stage's task mixture in MIXTURES (SFT from base has its own)."""
    return "sft-from-base" if getattr(cfg, "from_stage", None) == "base" else cfg.stage


def _conversation_start(cfg: MidConfig | SFTConfig) -> ConversationStart:
    """The shared start of mid and SFT: model and optimizers, then the stage's task mixtures."""
    s = _start(cfg)
    train = build_mixture(_mixture(cfg), cfg.tasks, "train", cfg.task_dir, cfg.seed)
    val = build_mixture(_mixture(cfg), cfg.tasks, "val", cfg.task_dir, cfg.seed)
    return ConversationStart(
        **vars(s), train=train, val=val, evaluate=_conv_loss_evaluator(s.tok, val, cfg, s.info.rank, s.info.world_size)
    )


def _ckpt_dir(stage: str, cfg: TrainConfig) -> Path:
    return stage_dir(stage, cfg.depth, cfg.base_dir)


def _load_start(cfg: TrainConfig, device, tok):
    """(model, optimizer states or None, resumed meta or None, start_step, meta of the checkpoint
    a new run starts from or None) for a stage: its own latest with --resume, else the previous
    stage's (or RL's --from PATH), else (base) a new model."""

    own = _ckpt_dir(cfg.stage, cfg)
    if cfg.resume:
        if find_last_step(own) is None:
            raise RustchatError(f"--resume: no {cfg.stage} checkpoint in {own}; run without --resume to start")
        model, optim_states, meta = load_stage_model(
            cfg.stage, cfg.depth, device=device, base_dir=cfg.base_dir, load_optimizer=True
        )
        restore_rng_state(meta.get("rng", {}))
        return model, optim_states, meta, int(meta["step"]), None
    if getattr(cfg, "from_path", None):  # RL's --from PATH: any checkpoint directory
        state, _, meta = load_checkpoint(cfg.from_path, device=device, load_optimizer=False)
        model = build_model_from_meta(meta, device, state)
        if model.config.vocab_size != tok.vocab_size:
            raise RustchatError(
                f"--from {cfg.from_path}: the checkpoint has vocab {model.config.vocab_size} but the "
                f"tokenizer has {tok.vocab_size}"
            )
        if model.config.n_layer != cfg.depth:
            raise RustchatError(
                f"--from {cfg.from_path}: the checkpoint has depth {model.config.n_layer}, not --depth {cfg.depth}"
            )
        return model, None, None, 0, meta
    prev = getattr(cfg, "from_stage", None) or previous_stage(cfg.stage)
    if prev is None:
        mcfg = GPTConfig.from_depth(
            cfg.depth,
            vocab_size=tok.vocab_size,
            sequence_len=cfg.seq_len,
            aspect_ratio=cfg.aspect_ratio,
            head_dim=cfg.head_dim,
            arch=cfg.arch,
            window_pattern=cfg.window_pattern,
        )
        return GPT(mcfg).to(device), None, None, 0, None
    model, _, meta = load_stage_model(prev, cfg.depth, device=device, base_dir=cfg.base_dir, load_optimizer=False)
    if model.config.vocab_size != tok.vocab_size:
        raise RustchatError(
            f"the {prev} checkpoint has vocab {model.config.vocab_size} but the tokenizer has {tok.vocab_size}: "
            "use the tokenizer the model was trained with"
        )
    return model, None, None, 0, meta


def _recipe(model, cfg: TrainConfig, optim_states) -> str:
    """The optimizer recipe: a resumed run keeps its checkpoint's; else --optimizer, where auto
    follows the architecture (a classic model keeps the classic optimizer)."""
    saved = saved_recipe(optim_states)
    if saved is not None:
        return saved
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "2026" if getattr(model.config, "arch", "classic") == "2026" else "classic"


def _optimizers(model, cfg: TrainConfig, optim_states, plan: Plan | None = None):
    """The stage's optimizers: base takes its learning rates and weight decay from the rules'
    plan, mid and SFT their learning rates from their flags (no weight decay)."""
    recipe = _recipe(model, cfg, optim_states)
    if plan is None:
        lrs = dict(matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr)
        weight_decay = 0.0
    else:
        lrs = dict(
            matrix_lr=plan.matrix_lr,
            embedding_lr=plan.embedding_lr,
            unembedding_lr=plan.unembedding_lr,
            scalar_lr=plan.scalar_lr,
        )
        # The 2026 rules' decay is the matrices' (Muon's, cautious), set each step by its
        # schedule; the classic optimizer's Muon has none, and the classic rules' decay is
        # AdamW's, as in January. A 2026 decay never lands on AdamW.
        weight_decay = plan.weight_decay if recipe == "2026" or plan.rules == "classic" else 0.0
    opts = model.setup_optimizers(recipe=recipe, weight_decay=weight_decay, **lrs)
    if optim_states is not None:
        load_optimizer_states(opts, optim_states)
    world = get_world_size()
    mine, whole = optimizer_state_bytes(opts, world, get_rank()), optimizer_state_bytes(opts, 1, 0)
    print0(
        f"== optimizer: MuonAdamW, {recipe} recipe | state {mine / 2**20:.2f} MiB on rank 0 of {world} "
        f"({whole / 2**20:.2f} MiB unsharded; ZeRO-2: gradients reduce-scattered, parameters all-gathered)"
    )
    return opts


def _num_steps(cfg: TrainConfig, s: StageStart, horizon: int) -> int:
    """--max-steps, else the stage's horizon; a resumed run keeps the horizon it was started
    with (its schedule) unless --max-steps changes it."""
    if cfg.max_steps:
        return cfg.max_steps
    if s.meta is not None and s.meta.get("num_steps"):
        return int(s.meta["num_steps"])
    return horizon


def _banner(cfg: TrainConfig, model, device, tok, tokens_per_step: str, num_steps: int, extra: str = "") -> None:
    device = torch.device(device)
    kernels = "triton (fused linear CE, rotary)" if device.type == "cuda" and model.use_kernels else "torch reference"
    print0(
        f"== rustchat {cfg.stage} | depth {cfg.depth} (dim {model.config.n_embd}, {model.config.n_head} heads, "
        f"{model.config.arch} arch) | attention: {attention.backend_name(device)} | "
        f"{model.num_params() / 1e6:.2f}M params | device {device} "
        f"({compute_dtype(device)}) | kernels: {kernels} | vocab {tok.vocab_size} | "
        f"{f'seq {cfg.seq_len} | ' if hasattr(cfg, 'seq_len') else ''}"
        f"{tokens_per_step} per step | {num_steps} steps{extra}"
    )


def _grad_accum(cfg: StageConfig, world: int, plan: Plan | None = None) -> int:
    total = cfg.total_batch_size if plan is None else plan.total_batch_size
    per = cfg.device_batch_size * cfg.seq_len * world
    if total % per:
        what = (
            f"the batch the {plan.rules} rules derive ({total:,} tokens)"
            if plan is not None and plan.batch_auto
            else f"--total-batch-size {total}"
        )
        raise RustchatError(
            f"{what} is not a multiple of device batch x seq len x ranks = {per}"
            + ("; set --total-batch-size or a smaller --device-batch-size" if "derive" in what else "")
        )
    return total // per


def scaling_param_counts(model) -> int:
    """The parameters the 2026 horizon counts: every block parameter plus the (padded) head."""
    return scaling_params(sum(p.numel() for p in model.transformer.h.parameters()), model.lm_head.weight.numel())


def base_plan(cfg: BaseConfig, model) -> Plan:
    """What the rules derive for this base run from the model's size and the flags given."""
    given = dict(
        matrix_lr=cfg.matrix_lr,
        embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr,
        scalar_lr=cfg.scalar_lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        warmdown_ratio=cfg.warmdown_ratio,
        final_lr_frac=cfg.final_lr_frac,
    )
    common = dict(
        tokens_per_param=cfg.target_param_data_ratio,
        total_batch_size=cfg.total_batch_size,
        num_steps=cfg.max_steps,
        **given,
    )
    if cfg.rules == "classic":
        return plan_classic(model.num_params(), **common)
    # the d12 sibling the 2026 hyperparameters were tuned on: same width rule, vocab, context and
    # features; built on the meta device (shapes only, no memory)
    c = model.config
    ref_cfg = dataclasses.replace(
        GPTConfig.from_depth(
            REFERENCE_DEPTH,
            vocab_size=c.vocab_size,
            sequence_len=c.sequence_len,
            aspect_ratio=cfg.aspect_ratio,
            head_dim=cfg.head_dim,
        ),
        **{k: getattr(c, k) for k in ARCHS["classic"]},
    )  # the model's architecture features
    with torch.device("meta"):
        ref = GPT(ref_cfg)
    return plan_2026(scaling_param_counts(model), scaling_param_counts(ref), **common)


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
            x, y = collate_sft(
                [rows[j] for j in range(s, min(s + cfg.device_batch_size, len(rows)))], pad, max_len=cfg.seq_len + 1
            )
            x, y = torch.tensor(x, device=dev).long(), torch.tensor(y, device=dev).long()

            with autocast_ctx(dev):
                total += float(model(x, y, loss_reduction="sum"))
            count += int((y >= 0).sum())
        return {"val_loss": all_reduce_sum(total, dev) / max(all_reduce_sum(count, dev), 1.0)}

    return evaluate


def _core_evaluator(cfg: BaseConfig, tok):
    """CORE during base training, as nanochat's --core-metric-every (48abd7d, 92d63d4): the first
    --core-max-per-task examples of each task, every rank scoring its share."""
    tasks = resolve_bundle(cfg.bundle, cfg.base_dir or get_base_dir(), quiet=cfg.quiet)

    def evaluate(model):
        res = evaluate_core(
            model, tok, tasks, max_per_task=cfg.core_max_per_task, token_budget=cfg.device_batch_size * cfg.seq_len
        )
        return {"core_metric": res.core, **{f"centered/{t.label}": t.centered for t in res.tasks}}

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
            raise RustchatError(
                f"--data-dir {cfg.data_dir} needs at least 2 files: the last one is used for validation"
            )
        train_files, val_files = files[:-1], files[-1:]
    else:
        train_files, val_files = None, None
    s = _start(cfg)
    if train_files is None:
        data = Path(cfg.base_dir or get_base_dir()) / "base_data"
        if s.info.local_rank == 0:  # one downloader per machine; the others wait at the barrier
            download_shards([*range(cfg.num_shards), FINEWEB_SHARDS - 1], data)
        barrier()
        train_files = [data / f"shard_{i:05d}.parquet" for i in range(cfg.num_shards)]
        val_files = [data / f"shard_{FINEWEB_SHARDS - 1:05d}.parquet"]
    train_src = DocumentSource(train_files)
    plan = s.plan
    accum = _grad_accum(cfg, s.info.world_size, plan)
    num_steps = _num_steps(cfg, s, plan.num_steps)
    # validation stays on the plain stream (every token scored, nothing cropped): one bpb for
    # training, `rustchat eval -i base` and the speedrun
    loader_cls = BestFitLoader if plan.packing == PACKING else PretrainLoader
    loader = loader_cls(
        s.tok,
        train_src,
        cfg.device_batch_size,
        cfg.seq_len,
        device=s.device,
        rank=s.info.rank,
        world_size=s.info.world_size,
        state=s.data_state(loader_cls.reshard),
    )
    data = StreamSteps(loader, accum)
    val = val_token_stream(s.tok, val_files, cfg.bpb_tokens)  # the tokens `eval -i base` scores
    evaluate = lambda model: {"val_bpb": bits_per_byte(model, s.tok, val)[0]}  # noqa: E731

    core = (cfg.core_every, _core_evaluator(cfg, s.tok)) if cfg.core_every else None  # the bundle fails fast
    _banner(
        cfg,
        s.model,
        s.device,
        s.tok,
        f"{plan.total_batch_size:,} tokens (grad accum {accum})",
        num_steps,
        f"\n   {plan.describe()}",
    )
    if plan.rules == "2026":
        momentum = lambda step: muon_momentum_2026(step, num_steps, warmdown_ratio=plan.warmdown_ratio)  # noqa: E731
        weight_decay = lambda step: muon_weight_decay(step, num_steps, plan.weight_decay)  # noqa: E731
    else:
        momentum, weight_decay = muon_momentum, None

    def lr_multiplier(step):
        return base_lr_multiplier(
            step,
            num_steps,
            warmup_steps=plan.warmup_steps,
            warmdown_ratio=plan.warmdown_ratio,
            final_lr_frac=plan.final_lr_frac,
        )

    result = run_stage(
        cfg,
        tok=s.tok,
        model=s.model,
        optimizers=s.optimizers,
        data=data,
        num_steps=num_steps,
        lr_multiplier=lr_multiplier,
        start_step=s.start_step,
        evaluate=evaluate,
        ckpt_dir=_ckpt_dir("base", cfg),
        momentum_fn=momentum,
        weight_decay_fn=weight_decay,
        resumed_meta=s.meta,
        core_eval=core,
    )
    result["plan"] = plan.to_dict()
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
    stream = MidTrainStream(
        s.tok,
        s.train,
        cfg.device_batch_size,
        cfg.seq_len,
        state=s.data_state(),
        max_tokens=cfg.seq_len,
        rank=s.info.rank,
        world_size=s.info.world_size,
    )
    data = StreamSteps(stream, accum)
    _banner(
        cfg,
        s.model,
        s.device,
        s.tok,
        f"{cfg.total_batch_size:,} tokens (grad accum {accum})",
        num_steps,
        f" | {len(s.train):,} conversations, {n_tokens:,} tokens",
    )
    start_eval = _start_eval(cfg, s.model, s.evaluate, s.start_step)
    result = run_stage(
        cfg,
        tok=s.tok,
        model=s.model,
        optimizers=s.optimizers,
        data=data,
        num_steps=num_steps,
        lr_multiplier=lambda step: mid_lr_multiplier(step / num_steps),
        start_step=s.start_step,
        evaluate=s.evaluate,
        ckpt_dir=_ckpt_dir("mid", cfg),
        resumed_meta=s.meta,
    )
    result["start_eval"] = start_eval
    _report(cfg, s.model, result)
    return result


def _sft_lrs(cfg: SFTConfig, start_meta: dict | None) -> dict:
    """SFT's base learning rates: the flags given, else from base the base run's (its flags or
    its rules' defaults; a checkpoint without rules is classic), else the classic ones."""
    source = DEFAULTS["classic"]
    inherited = {}
    if cfg.from_stage == "base" and start_meta is not None:
        base_cfg = start_meta.get("config") or {}
        source = DEFAULTS.get(base_cfg.get("rules"), DEFAULTS["classic"])
        inherited = {k: base_cfg[k] for k in SFT_LR_KEYS if base_cfg.get(k) is not None}
    return {
        k: getattr(cfg, k) if getattr(cfg, k) is not None else inherited.get(k, getattr(source, k)) for k in SFT_LR_KEYS
    }


@one_run
def train_sft(cfg: SFTConfig) -> dict:
    s = _conversation_start(cfg)
    path = SFT_FROM_BASE if cfg.from_stage == "base" else SFT_FROM_MID
    init_lr_frac = path["init_lr_frac"] if cfg.init_lr_frac is None else cfg.init_lr_frac
    E = cfg.total_batch_conversations
    per = cfg.device_batch_size * s.info.world_size
    if E % per:
        raise RustchatError(f"--total-batch-conversations {E} is not a multiple of device batch x ranks = {per}")
    num_steps = _num_steps(cfg, s, max(1, (len(s.train) * cfg.num_epochs) // E))
    data = SFTSteps(
        s.tok,
        s.train,
        E,
        cfg.device_batch_size,
        cfg.seq_len,
        s.info.rank,
        s.info.world_size,
        cfg.seed,
        state=s.data_state(),
        pack=cfg.pack,
    )
    _banner(
        cfg,
        s.model,
        s.device,
        s.tok,
        f"{E} conversations (grad accum {E // per})",
        num_steps,
        f" | from {cfg.from_stage} | {len(s.train):,} conversations ({_mixture(cfg)} mixture) | lr from "
        f"{init_lr_frac:g} of the base lrs, warmdown over the last {path['warmdown_ratio']:g}",
    )
    start_eval = _start_eval(cfg, s.model, s.evaluate, s.start_step)

    def lr_multiplier(step):
        return sft_lr_multiplier(step, num_steps, init_lr_frac=init_lr_frac, warmdown_ratio=path["warmdown_ratio"])

    result = run_stage(
        cfg,
        tok=s.tok,
        model=s.model,
        optimizers=s.optimizers,
        data=data,
        num_steps=num_steps,
        lr_multiplier=lr_multiplier,
        start_step=s.start_step,
        evaluate=s.evaluate,
        ckpt_dir=_ckpt_dir("sft", cfg),
        # from base, momentum warms up 0.85 -> 0.95 as in pretraining (nanochat's 2026 SFT, 92d63d4)
        momentum_fn=muon_momentum if cfg.from_stage == "base" else None,
        resumed_meta=s.meta,
    )
    result["start_eval"] = start_eval
    _report(cfg, s.model, result)
    return result


# ----------------------------------------------------------------------------- RL
RL_TASKS = ("gsm8k", "arithmetic", "spellingbee", "simplespelling")  # generative, with a checkable answer
SYNTHETIC_RL_TASKS = ("arithmetic", "spellingbee", "simplespelling")  # generated: sized, with a test split


def _rl_task(name: str, split: str, cfg: RLConfig) -> Task:
    """One split of a named RL task (GSM8K's from its local copy in --task-dir when there)."""
    key = "".join(c for c in name.lower() if c.isalnum())
    if key in SYNTHETIC_RL_TASKS:
        return get_task(
            key,
            split=split,
            size=cfg.train_size if split == "train" else cfg.eval_examples,
            seed=cfg.seed if split == "train" else 0,
        )
    return task_from(key, {"split": split}, cfg.task_dir)


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
            raise RustchatError(
                f"--tasks {part!r}: not a task with a checkable answer; use "
                f"{', '.join(RL_TASKS)} or a JSONL file of conversations"
            )
    if not train:
        raise RustchatError(f"--tasks {cfg.tasks!r} names no task")
    return train, held_out


def _held_out_problems(tasks: list[Task], n: int) -> list[tuple[Task, dict]]:
    """About n problems, an equal share from each held-out task."""
    share = max(1, n // len(tasks))
    return [(t, t[i]) for t in tasks for i in range(min(share, len(t)))]


@one_run
def train_rl(cfg: RLConfig) -> dict:
    train_tasks, held_out = rl_tasks(cfg)  # a bad --tasks fails before anything loads
    s = _start(cfg)
    world = s.info.world_size
    if cfg.examples_per_step % world:
        raise RustchatError(f"--examples-per-step {cfg.examples_per_step} is not a multiple of the {world} ranks")
    order = TaskMixture(train_tasks, seed=cfg.seed)

    def stream(pos: int):
        ti, local = order.source(pos % len(order))
        return order.tasks[ti], order.tasks[ti][local]

    num_steps = _num_steps(cfg, s, max(1, (len(order) * cfg.num_epochs) // cfg.examples_per_step))
    per_rank = cfg.examples_per_step // world
    engine = Engine(s.model, s.tok)  # the calculator tool is active in the rollouts
    # every reply of a step (this rank's share) decodes in one continuous batch
    sampler = Sampler(
        engine,
        max_batch=min(max(1, per_rank * cfg.num_samples), MAX_ROWS),  # more: they wait in its queue
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
    )
    data = RolloutSteps(
        s.tok,
        sampler,
        stream,
        examples_per_step=cfg.examples_per_step,
        num_samples=cfg.num_samples,
        device_batch_size=cfg.device_batch_size,
        seed=cfg.seed,
        rank=s.info.rank,
        world_size=world,
        state=s.data_state(),
    )
    evaluate = pass_at_k_evaluator(
        s.tok,
        sampler,
        _held_out_problems(held_out, cfg.eval_examples),
        num_samples=cfg.num_samples,
        seed=cfg.seed,
        rank=s.info.rank,
        world_size=world,
    )
    _banner(
        cfg,
        s.model,
        s.device,
        s.tok,
        f"{cfg.examples_per_step} questions x {cfg.num_samples} replies",
        num_steps,
        f" | tasks {', '.join(t.name for t in train_tasks)} ({len(order):,} problems)",
    )
    try:
        result = run_stage(
            cfg,
            tok=s.tok,
            model=s.model,
            optimizers=s.optimizers,
            data=data,
            num_steps=num_steps,
            lr_multiplier=lambda step: sft_lr_multiplier(step, num_steps, init_lr_frac=cfg.init_lr_frac),
            start_step=s.start_step,
            evaluate=evaluate,
            ckpt_dir=_ckpt_dir("rl", cfg),
            resumed_meta=s.meta,
            step_fn=rl_train_step,
        )
    finally:
        sampler.close()
    hist = result["history"]
    extra = {}
    if hist:
        share = float(np.mean([h["rollout_share"] for h in hist]))
        tps = float(np.median([h["sample_tok_per_s"] for h in hist]))
        print0(
            f"rl: reward {hist[0]['reward']:.3f} -> {hist[-1]['reward']:.3f}; rollouts {100 * share:.0f}% of step "
            f"time, {tps:,.0f} sampled tokens/s (median)"
        )
        k = max(1, len(hist) // 10)
        extra = {
            "reward first -> last": f"{np.mean([h['reward'] for h in hist[:k]]):.3f} -> "
            f"{np.mean([h['reward'] for h in hist[-k:]]):.3f} (means of {k} steps)",
            "groups all right / all wrong (last)": f"{100 * hist[-1]['all_right']:.0f}% / "
            f"{100 * hist[-1]['all_wrong']:.0f}%",
            "rollout share of step time": f"{100 * share:.0f}%",
            "sampled tokens/s (median)": f"{tps:,.0f}",
        }
    _report(cfg, s.model, result, extra)
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
    if result.get("cores"):
        last = result["cores"][-1]
        rows[f"CORE (step {last['step']}, {cfg.core_max_per_task} per task at most)"] = f"{last['core_metric']:.4f}"
    if hist and "mfu" in hist[-1]:
        rows["MFU (median)"] = f"{100 * np.median([h['mfu'] for h in hist]):.1f}%"
    rows.update(extra or {})
    write_section(cfg.stage, rows, base_dir=cfg.base_dir)


__all__ = ["train_base", "train_mid", "train_sft", "train_rl", "STAGE_FUNCS", "build_mixture"]
