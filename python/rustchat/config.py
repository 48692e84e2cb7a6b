"""One typed configuration per command, with every default in one place.

`cli.py` generates each command's flags from these fields (`add_arguments`), so a flag cannot
drift from its field; the speedrun and Python callers build the same dataclasses directly.
A field's metadata holds its help text and checks; `__post_init__` enforces the checks, so a
config built in code is refused exactly as the command line would refuse it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar

from .common import (
    DEFAULT_BPB_TOKENS,
    MAX_BATCH_CONVERSATIONS,
    MAX_BATCH_TOKENS,
    MAX_CONNECTIONS,
    MAX_DEPTH,
    MAX_EXAMPLES,
    MAX_NEW_TOKENS,
    MAX_NODES,
    MAX_NPROC,
    MAX_PORT,
    MAX_QUESTIONS,
    MAX_ROWS,
    MAX_SAMPLES,
    MAX_SCORED_TOKENS,
    MAX_SEQ_LEN,
    MAX_SERVE_QUEUE,
    MAX_SHARDS,
    MAX_TOP_K,
    MAX_VOCAB_SIZE,
    MAX_WIDTH,
    OutOfRangeError,
    RustchatError,
    check_window_pattern,
)
from .rules import RULES

DEVICES = ("auto", "cuda", "cpu", "mps")
STAGES = ("base", "mid", "sft", "rl")  # the training stages, in pipeline order
TASK_PRESETS = ("default", "tiny")
OPTIMIZERS = ("auto", "2026", "classic")  # "auto" + rustchat.optim.RECIPES
SFT_SOURCES = ("mid", "base")  # the checkpoints SFT can start from
ARCHS = ("2026", "classic")  # the keys of rustchat.model.ARCHS
DEFAULT_TEMPERATURE = 0.6  # chat and serve sample alike unless told otherwise
# what `rustchat serve` takes as a request's settings, and as its flags' defaults for them
TEMPERATURE_RANGE = (0.0, 2.0)  # below sampling.MIN_TEMPERATURE a temperature samples greedily
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)


def opt(
    default,
    help: str,
    *,
    short: str | None = None,
    choices=None,
    minimum=None,
    maximum=None,
    required: bool = False,
    positional: bool = False,
    append: bool = False,
    metavar: str | None = None,
):
    """A config field: its default, its help text and what values it accepts: one of
    `choices`, or a number in [minimum, maximum] (either end may be open). Every count a
    caller can name (rows, tokens, samples, processes, connections, ...) has a finite
    `maximum` (the bounds in rustchat.common); test_bounds holds the list."""
    return field(
        default=default,
        metadata={
            "help": help,
            "short": short,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
            "required": required,
            "positional": positional,
            "append": append,
            "metavar": metavar,
        },
    )


def retired(hint: str):
    """A field a subclass no longer takes (a renamed flag): hidden from --help, and any value
    given is refused in one line with `hint`, from the command line and from Python alike."""
    return field(default=None, metadata={"help": "", "retired": hint})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def range_text(lo, hi) -> str:
    """'in [lo, hi]', '>= lo' or '<= hi': what a bounded field accepts."""
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if hi is None else f"<= {hi}"


@dataclass
class Config:
    """Base of every command's config: checks each field against its metadata."""

    def __post_init__(self):
        for f in fields(self):
            v, m = getattr(self, f.name), f.metadata
            if m.get("retired") and v is not None:
                raise RustchatError(f"{flag_name(f.name)} is not an option here: {m['retired']}")
            if v is None:
                if m.get("required"):
                    raise RustchatError(f"{flag_name(f.name)} is required")
                continue
            if m.get("choices") and v not in m["choices"]:
                raise RustchatError(
                    f"{flag_name(f.name)} must be one of {', '.join(map(str, m['choices']))}, got {v!r}"
                )
            lo, hi = m.get("minimum"), m.get("maximum")
            if (lo is not None and not v >= lo) or (hi is not None and not v <= hi):  # NaN too
                raise OutOfRangeError(f"{flag_name(f.name)} must be {range_text(lo, hi)}, got {v}")

    def replace(self, **changes):
        out = dataclasses.replace(self, **changes)
        if hasattr(self, "given"):
            out.given = self.given | set(changes)
        return out


# ----------------------------------------------------------------------------- tokenizer
@dataclass
class TokTrainConfig(Config):
    input: list[str] | None = opt(None, "text/JSONL/parquet files or directories", required=True)
    vocab_size: int = opt(65536, "vocabulary size, special tokens included", minimum=256 + 9, maximum=MAX_VOCAB_SIZE)
    out: str | None = opt(None, "output directory (default: <base dir>/tokenizer)")
    doc_cap: int = opt(10_000, "max chars per document (0: no cap)", minimum=0)
    max_chars: int | None = opt(None, "max chars in all", minimum=1)
    quiet: bool = opt(False, "no progress bar")


@dataclass
class TokEvalConfig(Config):
    tokenizer: str | None = opt(None, "tokenizer directory (default: the trained one under the base dir)")
    text: list[str] | None = opt(None, "extra rows, e.g. train=train.txt val=val.txt", append=True, metavar="KIND=PATH")
    max_bytes: int = opt(2_000_000, "chars read from each --text file", minimum=1)


# ----------------------------------------------------------------------------- training stages
@dataclass
class TrainConfig(Config):
    """What every training stage shares (base, mid, SFT and RL); each stage's class sets its own
    defaults below."""

    stage: ClassVar[str]
    depth: int | None = opt(
        None,
        "model depth (default: the one depth with the checkpoint this run starts from; "
        "a new base model: 10, i.e. 640 dim, 5 heads)",
        minimum=1,
        maximum=MAX_DEPTH,
    )
    device: str = opt("auto", "where to train", choices=DEVICES)
    device_batch_size: int = opt(32, "rows per micro-batch", minimum=1, maximum=MAX_ROWS)
    max_steps: int | None = opt(None, "stop after this many steps (default: the stage's horizon)", minimum=1)
    num_epochs: int = opt(1, "passes over the data (mid, SFT, RL)", minimum=1)
    eval_every: int = opt(250, "steps between validation evaluations (0: only at the end)", minimum=0)
    save_every: int | None = opt(None, "steps between intermediate checkpoints", minimum=1)
    keep_last: int | None = opt(
        None, "keep only the newest N checkpoints of this stage and depth (default: all)", minimum=1
    )
    run: str | None = opt(None, "wandb run name (off by default; honours WANDB_MODE)")
    resume: bool = opt(
        False, "continue the run in this stage's directory from its latest checkpoint, with its settings"
    )
    force: bool = opt(False, "start a new run where an old one has checkpoints (the old run is archived)")
    stop_at_step: int | None = opt(
        None, "stop at this step with a checkpoint, schedule unchanged; continue later with --resume", minimum=1
    )
    seed: int = opt(42, "seed of weights, data order and sampling")
    matrix_lr: float = opt(0.02, "Muon learning rate of the transformer matrices", minimum=0.0)
    embedding_lr: float = opt(0.2, "AdamW learning rate of the token embedding", minimum=0.0)
    unembedding_lr: float = opt(0.004, "AdamW learning rate of the output head", minimum=0.0)
    optimizer: str = opt(
        "auto",
        "optimizer recipe: 2026 (Polar Express, NorMuon, cautious weight decay), classic "
        "(Newton-Schulz Muon), auto (the model's architecture's; a resume keeps the "
        "checkpoint's)",
        choices=OPTIMIZERS,
    )
    base_dir: str | None = opt(None, "artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")
    nproc: int = opt(
        1,
        "processes on this node (re-launches under torchrun); at most its CPUs, and its GPUs on CUDA",
        minimum=1,
        maximum=MAX_NPROC,
    )
    nnodes: int = opt(
        1,
        "machines training together; run the same command on each with its --node-rank",
        minimum=1,
        maximum=MAX_NODES,
    )
    node_rank: int = opt(
        0, "this machine's index among --nnodes (0 hosts the rendezvous)", minimum=0, maximum=MAX_NODES - 1
    )
    master_addr: str | None = opt(None, "address of node 0, reachable from every node (needed with --nnodes > 1)")
    master_port: int = opt(29500, "port of the rendezvous on node 0", minimum=1, maximum=MAX_PORT)
    quiet: bool = opt(False, "no progress bar")

    # --resume restores the run's settings from its checkpoint: these may differ (how far and how
    # the run goes on), the others define what it trains on and are refused; the ones in
    # RESUME_OWN belong to this invocation and are never taken from the checkpoint
    RESUME_MAY_CHANGE: ClassVar[frozenset] = frozenset(
        {
            "max_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_last",
            "run",
            "device",
            "quiet",
            "matrix_lr",
            "embedding_lr",
            "unembedding_lr",
            "init_lr_frac",
        }
    )
    RESUME_OWN: ClassVar[frozenset] = frozenset(
        {
            "resume",
            "force",
            "base_dir",
            "depth",
            "stop_at_step",
            "nproc",
            "nnodes",
            "node_rank",
            "master_addr",
            "master_port",
        }
    )
    RENAMED: ClassVar[dict] = {}  # old field name in a checkpoint's config -> its name now

    def resumed(self, saved: dict) -> tuple["StageConfig", list[str]]:
        """This config continuing a run saved with `saved` (its meta's config): fields not given
        (not on the command line; from Python: left at their defaults) take the run's values; a
        given field with another value is applied with a note (RESUME_MAY_CHANGE) or refused in
        one line."""
        saved = dict(saved)
        for old, new in self.RENAMED.items():  # a checkpoint written before the rename
            if old in saved and new not in saved:
                saved[new] = saved[old]
        changes, notes = {}, []
        for f in fields(self):
            if f.name in self.RESUME_OWN or f.metadata.get("retired"):
                continue
            mine = getattr(self, f.name)
            given = f.name in self.given if hasattr(self, "given") else mine != f.default
            if f.name not in saved:  # a run saved before this flag existed: the flag cannot reach it
                if given and mine != f.default and f.name not in self.RESUME_MAY_CHANGE:
                    raise RustchatError(
                        f"--resume: the run was saved before {flag_name(f.name)} existed and keeps what it was "
                        "saved with (drop the flag, or start a new run with --force)"
                    )
                continue
            theirs = saved[f.name]
            if mine == theirs:
                continue
            if not given:
                changes[f.name] = theirs
            elif f.name in self.RESUME_MAY_CHANGE:
                notes.append(f"{flag_name(f.name)} {mine} applied (the run had {theirs})")
            else:
                raise RustchatError(
                    f"--resume: {flag_name(f.name)} {mine} differs from the run's {theirs}; a resumed "
                    f"run keeps it (drop the flag, or start a new run with --force)"
                )
        return self.replace(**changes), notes


@dataclass
class StageConfig(TrainConfig):
    """What base, mid and SFT share: rows of a fixed length, a batch counted in tokens."""

    total_batch_size: int = opt(
        524_288,
        "tokens per optimizer step; gradient accumulation makes up the rest",
        minimum=1,
        maximum=MAX_BATCH_TOKENS,
    )
    seq_len: int = opt(2048, "tokens per row (the model's context)", minimum=1, maximum=MAX_SEQ_LEN)
    eval_batches: int = opt(8, "batches per validation evaluation", minimum=1)


@dataclass
class BaseConfig(StageConfig):
    stage: ClassVar[str] = "base"
    data_dir: str | None = opt(None, "local parquet/text files instead of downloading FineWeb-Edu")
    num_shards: int = opt(8, "FineWeb-Edu shards to download", minimum=1, maximum=MAX_SHARDS)
    # the training rules (rustchat.rules): every None below means "the rules' value"
    rules: str = opt(
        "2026",
        "how horizon, batch size, learning rates and schedule follow from the model: 2026 "
        "(nanochat's July-2026 rules, commit 92d63d4) or classic (January 2026, commit 48abd7d)",
        choices=RULES,
    )
    target_param_data_ratio: float | None = opt(
        None,
        "training horizon in tokens per parameter (default: 12 per "
        "scaling parameter under 2026, 20 per parameter under classic)",
        minimum=0.0,
    )
    total_batch_size: int | None = opt(
        None,
        "tokens per optimizer step; gradient accumulation makes up the rest "
        "(default: 2026 derives it from the horizon, classic 524,288)",
        minimum=1,
        maximum=MAX_BATCH_TOKENS,
    )
    matrix_lr: float | None = opt(
        None,
        "Muon learning rate of the transformer matrices at the reference batch (default: the rules', 0.02)",
        minimum=0.0,
    )
    embedding_lr: float | None = opt(
        None,
        "AdamW learning rate of the token embedding at the reference batch (default: 2026 0.3, classic 0.2)",
        minimum=0.0,
    )
    unembedding_lr: float | None = opt(
        None,
        "AdamW learning rate of the output head at the reference batch (default: 2026 0.008, classic 0.004)",
        minimum=0.0,
    )
    scalar_lr: float | None = opt(
        None, "learning rate of the per-layer scalars at the reference batch (default: 0.5)", minimum=0.0
    )
    weight_decay: float | None = opt(
        None,
        "weight decay of the matrices at the reference batch and horizon (default: 2026 0.28, classic 0)",
        minimum=0.0,
    )
    warmup_steps: int | None = opt(None, "steps of linear lr warmup (default: 2026 40, classic 0)", minimum=0)
    warmdown_ratio: float | None = opt(
        None, "share of the run over which the lr falls linearly (default: 2026 0.65, classic 0.2)", minimum=0.0
    )
    final_lr_frac: float | None = opt(
        None, "lr at the end, as a share of the peak (default: 2026 0.05, classic 0)", minimum=0.0
    )
    bpb_tokens: int = opt(
        DEFAULT_BPB_TOKENS,
        "validation tokens scored for val bpb (the set `eval -i base --bpb-tokens` scores)",
        minimum=1,
        maximum=MAX_SCORED_TOKENS,
    )
    # the shape of a new model (a resumed one keeps its checkpoint's): nanochat's knobs (92d63d4)
    aspect_ratio: int = opt(64, "model width per layer: model_dim = depth * aspect_ratio", minimum=2, maximum=MAX_WIDTH)
    head_dim: int = opt(
        128,
        "attention head width (heads = model_dim / head_dim, rounded to divide it)",
        minimum=2,
        maximum=MAX_WIDTH,
    )
    fp8: bool = opt(
        False,
        "train the transformer's matmuls in FP8, tensorwise scaling (GPUs with FP8 tensor "
        "cores: compute capability 8.9+)",
    )
    arch: str = opt(
        "2026",
        "architecture of a new model: 2026 (nanochat's July-2026 model, commit 92d63d4: sliding windows, "
        "value embeddings, smear, backout) or classic (January 2026, commit 48abd7d)",
        choices=ARCHS,
    )
    window_pattern: str | None = opt(
        None,
        "the 2026 model's attention windows, tiled over the layers: L full context, S a quarter of it "
        "(the last layer is always L); default SSSL",
        metavar="PATTERN",
    )
    core_every: int = opt(0, "steps between CORE evaluations, and one at the end (0: none)", minimum=0)
    core_max_per_task: int = opt(500, "examples per CORE task during training", minimum=1, maximum=MAX_EXAMPLES)
    bundle: str | None = opt(
        None, "CORE eval bundle directory (default: <base dir>/eval_bundle, downloaded on first use)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.window_pattern is not None:
            check_window_pattern(self.window_pattern, "--window-pattern")
        if self.window_pattern is not None and self.arch == "classic":
            raise RustchatError("--window-pattern: the classic architecture has no sliding windows (use --arch 2026)")


@dataclass
class MidConfig(StageConfig):
    stage: ClassVar[str] = "mid"
    eval_every: int = opt(150, "steps between validation evaluations (0: only at the end)", minimum=0)
    tasks: str = opt("default", "task mixture: default (hub datasets) or tiny (offline)", choices=TASK_PRESETS)
    task_dir: str | None = opt(None, "directory with local copies of the hub datasets")


@dataclass
class SFTConfig(StageConfig):
    stage: ClassVar[str] = "sft"
    device_batch_size: int = opt(4, "conversations per micro-batch", minimum=1, maximum=MAX_ROWS)
    # base and mid count tokens per step; SFT counts conversations, under its own name
    total_batch_size: int | None = retired("SFT counts conversations per step: use --total-batch-conversations")
    RENAMED: ClassVar[dict] = {"total_batch_size": "total_batch_conversations"}
    total_batch_conversations: int = opt(
        32,
        "conversations per optimizer step; gradient accumulation makes up the rest",
        minimum=1,
        maximum=MAX_BATCH_CONVERSATIONS,
    )
    eval_every: int = opt(100, "steps between validation evaluations (0: only at the end)", minimum=0)
    tasks: str = opt("default", "task mixture: default (hub datasets) or tiny (offline)", choices=TASK_PRESETS)
    task_dir: str | None = opt(None, "directory with local copies of the hub datasets")
    init_lr_frac: float | None = opt(
        None, "starting fraction of the base learning rates (default: 0.02 from mid, 0.8 from base)", minimum=0.0
    )
    pack: bool = opt(False, "pack conversations into rows instead of padding")
    from_stage: str = opt(
        "mid",
        "the checkpoint to start from: mid, or base (nanochat 92d63d4's path: mid-training's "
        "data folded into the SFT mixture)",
        short="--from",
        choices=SFT_SOURCES,
    )
    matrix_lr: float | None = opt(None, "Muon learning rate of the transformer matrices (default: 0.02)", minimum=0.0)
    embedding_lr: float | None = opt(
        None,
        "AdamW learning rate of the token embedding (default: 0.2 from mid, the base run's from base)",
        minimum=0.0,
    )
    unembedding_lr: float | None = opt(
        None, "AdamW learning rate of the output head (default: 0.004 from mid, the base run's from base)", minimum=0.0
    )


@dataclass
class RLConfig(TrainConfig):
    """Simplified GRPO on tasks with checkable answers (docs/design.md, "Reinforcement learning")."""

    stage: ClassVar[str] = "rl"
    device_batch_size: int = opt(8, "rows (sampled replies) per training micro-batch", minimum=1, maximum=MAX_ROWS)
    eval_every: int = opt(60, "steps between pass@k evaluations on held-out problems (0: none)", minimum=0)
    save_every: int | None = opt(60, "steps between intermediate checkpoints", minimum=1)
    tasks: str = opt(
        "gsm8k",
        "comma list of tasks with checkable answers: gsm8k, arithmetic, spellingbee, or a "
        "custom JSONL file of conversations whose last assistant message is the reference",
    )
    task_dir: str | None = opt(None, "directory with a local copy of GSM8K (gsm8k-main-train.jsonl, ...)")
    from_path: str | None = opt(
        None, "start from this checkpoint directory instead of the SFT one", short="--from", metavar="PATH"
    )
    examples_per_step: int = opt(16, "questions per optimizer step, over all ranks", minimum=1, maximum=MAX_QUESTIONS)
    num_samples: int = opt(
        16, "replies sampled per question (the group of its advantage)", minimum=1, maximum=MAX_SAMPLES
    )
    max_new_tokens: int = opt(256, "tokens per sampled reply at most", minimum=1, maximum=MAX_NEW_TOKENS)
    temperature: float = opt(1.0, "sampling temperature of the rollouts and the pass@k evaluation", minimum=0.0)
    top_k: int | None = opt(
        50,
        "sample from the k most likely tokens (default 50; 0: the whole vocabulary)",
        minimum=0,
        maximum=MAX_TOP_K,
    )
    train_size: int = opt(
        10_000,
        "problems generated for a synthetic task's training split (arithmetic, spellingbee)",
        minimum=1,
        maximum=MAX_EXAMPLES,
    )
    eval_examples: int = opt(
        400, "held-out problems per pass@k evaluation (split over ranks)", minimum=1, maximum=MAX_QUESTIONS
    )
    init_lr_frac: float = opt(
        0.05, "starting fraction of the base learning rates (decays linearly to zero)", minimum=0.0
    )


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {"base": BaseConfig, "mid": MidConfig, "sft": SFTConfig, "rl": RLConfig}


# ----------------------------------------------------------------------------- using a model
@dataclass
class ModelSourceConfig(Config):
    """Which checkpoint a command loads."""

    source: str = opt("sft", "which stage's checkpoint to load", short="-i", choices=STAGES)
    depth: int | None = opt(None, "model depth (default: the largest with a checkpoint)", minimum=1, maximum=MAX_DEPTH)
    step: int | None = opt(None, "checkpoint step (default: the last)", minimum=0)
    device: str = opt("auto", "where to run the model", choices=DEVICES)
    base_dir: str | None = opt(None, "artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")


@dataclass
class EvalConfig(ModelSourceConfig):
    tasks: str = opt(
        "default",
        "tiny (the offline tasks), default (ARC-Easy, ARC-Challenge, MMLU, GSM8K, "
        "HumanEval, SpellingBee) or a comma list, e.g. arc-easy,gsm8k",
    )
    max_problems: int | None = opt(None, "first N problems of each task", minimum=1, maximum=MAX_EXAMPLES)
    task_dir: str | None = opt(None, "directory with local copies of the hub datasets (e.g. arc-ARC-Easy-test.jsonl)")
    batch_size: int = opt(8, "rows per forward / samples per batch", minimum=1, maximum=MAX_ROWS)
    num_samples: int = opt(1, "replies per generative problem (pass@n)", minimum=1, maximum=MAX_SAMPLES)
    temperature: float = opt(0.0, "0: greedy", minimum=0.0)
    top_k: int | None = opt(None, "sample from the k most likely tokens", minimum=1, maximum=MAX_TOP_K)
    max_new_tokens: int = opt(512, "tokens per reply at most", minimum=1, maximum=MAX_NEW_TOKENS)
    seed: int = opt(42, "sampling seed")
    data_dir: str | None = opt(None, "-i base: validation text files (default: the base run's --data-dir)")
    bpb_tokens: int | None = opt(
        None,
        "-i base: tokens scored at most (default: the count the base run scored, so the number is training's own)",
        minimum=1,
        maximum=MAX_SCORED_TOKENS,
    )
    core: bool = opt(False, "-i base: also score the CORE suite (DCLM's ICL tasks, as nanochat 48abd7d/92d63d4 do)")
    bundle: str | None = opt(
        None,
        "-i base --core: eval bundle directory (core.yaml, eval_data/, "
        "eval_meta_data.csv; default: <base dir>/eval_bundle, downloaded on first use)",
    )
    max_per_task: int | None = opt(
        None,
        "-i base --core: first N examples of each task after the seeded shuffle (default: all)",
        minimum=1,
        maximum=MAX_EXAMPLES,
    )
    nproc: int = opt(
        1,
        "-i base --core: processes on this node splitting the examples (re-launches under torchrun); "
        "at most its CPUs, and its GPUs on CUDA",
        minimum=1,
        maximum=MAX_NPROC,
    )
    quiet: bool = opt(False, "no progress bars or per-task lines")
    allow_unsandboxed: bool = opt(
        False,
        "run HumanEval's model-written code even where bubblewrap cannot sandbox it (rlimits, a fresh "
        "uid and in-process guards only; no network isolation); the report says so",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.nproc > 1 and not (self.source == "base" and self.core):
            raise RustchatError("--nproc > 1 splits only the CORE evaluation: use it with -i base --core")


@dataclass
class ChatConfig(ModelSourceConfig):
    prompt: str | None = opt(None, "answer this one prompt and exit", short="-p")
    temperature: float = opt(DEFAULT_TEMPERATURE, "0: greedy", minimum=0.0)
    top_k: int | None = opt(50, "sample from the k most likely tokens", minimum=1, maximum=MAX_TOP_K)
    max_tokens: int = opt(512, "tokens per reply at most", minimum=1, maximum=MAX_NEW_TOKENS)
    seed: int | None = opt(None, "sampling seed (default: a new one per reply)")


@dataclass
class ServeConfig(ModelSourceConfig):
    host: str = opt("127.0.0.1", "listen address (default loopback only)")
    port: int = opt(8000, "listen port", minimum=0, maximum=MAX_PORT)
    temperature: float = opt(
        DEFAULT_TEMPERATURE,
        "default when a request gives none",
        minimum=TEMPERATURE_RANGE[0],
        maximum=TEMPERATURE_RANGE[1],
    )
    top_k: int = opt(50, "default when a request gives none", minimum=TOP_K_RANGE[0], maximum=TOP_K_RANGE[1])
    max_tokens: int = opt(
        512, "default when a request gives none", minimum=MAX_TOKENS_RANGE[0], maximum=MAX_TOKENS_RANGE[1]
    )
    max_batch: int = opt(
        32, "requests decoded together (KV cache rows); more wait in a queue", minimum=1, maximum=MAX_ROWS
    )
    max_queue: int = opt(
        1024,
        "requests waiting for a free row at most; more are refused (HTTP 429)",
        minimum=0,
        maximum=MAX_SERVE_QUEUE,
    )
    max_connections: int = opt(
        2048,
        "open connections at most (lowered to fit the open-file limit); over it the longest-idle one is closed",
        minimum=1,
        maximum=MAX_CONNECTIONS,
    )
    request_timeout: float = opt(
        15.0,
        "seconds a client has to send a request's headers, and then its body, before its connection is closed",
        minimum=0.1,
    )
    allow_origin: str | None = opt(
        None,
        "comma-separated web origins (scheme://host[:port]) whose pages may call "
        "the server, or * for any (default: same origin only)",
    )


@dataclass
class ExportConfig(ModelSourceConfig):
    device: str = opt("cpu", "where to load the model while exporting", choices=DEVICES)
    out: str | None = opt(
        None, "directory to write (config.json, model.safetensors, tokenizer.json, ...)", required=True
    )
    force: bool = opt(False, "write into a directory that already holds files")


@dataclass
class ImportHFConfig(Config):
    hf_dir: str | None = opt(
        None,
        "a transformers NanoChat directory (config.json, model.safetensors, tokenizer.json)",
        positional=True,
        required=True,
    )
    stage: str = opt("base", "stage to file the import under (mid continues from base, SFT from mid)", choices=STAGES)
    step: int | None = opt(None, "step to record (default: the exported one, else 0)", minimum=0)
    base_dir: str | None = opt(None, "artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")
    force: bool = opt(False, "replace a different tokenizer and the stage's checkpoints at that depth")


# ----------------------------------------------------------------------------- whole pipeline, imports
@dataclass
class SpeedrunConfig(Config):
    preset: str = opt(
        "tiny",
        "tiny: offline, CPU, minutes; d10/d20: the real recipes on the hub datasets",
        choices=("tiny", "d10", "d20"),
    )
    device: str = opt("auto", "where to train", choices=DEVICES)
    seed: int = opt(42, "seed of every stage")
    base_dir: str | None = opt(None, "artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")
    quiet: bool = opt(False, "no progress bars")
    force: bool = opt(False, "run again where an earlier run left checkpoints (they are archived)")
    arch: str | None = opt(
        None, "the model's architecture instead of the preset's (every preset trains 2026)", choices=ARCHS
    )
    allow_unsandboxed: bool = opt(
        False, "let the evals run HumanEval's model-written code where bubblewrap cannot sandbox it (see eval)"
    )


@dataclass
class ImportNanochatConfig(Config):
    checkpoint_dir: str | None = opt(
        None, "directory with model_<step>.pt and meta_<step>.json", positional=True, required=True
    )
    tokenizer: str | None = opt(None, "nanochat tokenizer.pkl (default: look beside the checkpoint)")
    stage: str = opt("base", "stage to file the import under", choices=STAGES)
    step: int | None = opt(None, "checkpoint step (default: the last)", minimum=0)
    base_dir: str | None = opt(None, "artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")
    force: bool = opt(False, "replace a different tokenizer or the same step's checkpoint already in the base dir")


# ----------------------------------------------------------------------------- argparse from the fields
def _unwrap(t) -> tuple[type, bool]:
    """(the type inside an optional, whether None is allowed) of an annotation."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return t, False


def add_arguments(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """One flag per field of `cls`. Unset flags stay out of the namespace (argparse.SUPPRESS),
    so the dataclass's own defaults apply: the help text shows them."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        m = f.metadata
        t, _ = _unwrap(hints[f.name])
        notes = [] if f.default in (None, False) else [f"default: {f.default}"]
        if m.get("maximum") is not None:  # the bound a value out of range is refused with
            notes.append(f"at most {m['maximum']}")
        shown = f" ({', '.join(notes)})" if notes else ""
        # choices are listed in the help and checked by __post_init__ (a one-line error)
        listed = f" (one of: {', '.join(m['choices'])})" if m.get("choices") else ""
        kw: dict = {"help": argparse.SUPPRESS if m.get("retired") else m.get("help", "") + listed + shown}
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        names = [m["short"], flag_name(f.name)] if m.get("short") else [flag_name(f.name)]
        kw.update(dest=f.name, default=argparse.SUPPRESS)
        if t is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(t) is list:
            kw["action" if m.get("append") else "nargs"] = "append" if m.get("append") else "+"
            kw["required"] = bool(m.get("required"))
        else:
            kw["type"] = t
            kw["required"] = bool(m.get("required"))
        parser.add_argument(*names, **kw)


def from_args(cls: type[Config], ns: argparse.Namespace) -> Config:
    """The config of `cls` from the flags the user gave (the rest keep their defaults)."""
    cfg = cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
    cfg.given = frozenset(f.name for f in fields(cls) if hasattr(ns, f.name))  # what --resume must not override
    return cfg
