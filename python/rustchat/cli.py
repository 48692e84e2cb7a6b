"""The `rustchat` command: every subcommand is defined here, each a typed config (`config.py`)
handed to the one function that does its work.

Commands that need torch import their module when run, so `rustchat tok ...` and `--help`
start fast. User-facing errors (bad files, missing checkpoints) print as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from . import __version__, _core
from .common import RustchatError
from .config import (
    STAGE_CONFIGS,
    ChatConfig,
    EvalConfig,
    ExportConfig,
    ImportHFConfig,
    ImportNanochatConfig,
    ServeConfig,
    SpeedrunConfig,
    TokEvalConfig,
    TokTrainConfig,
    add_arguments,
    from_args,
)
from .tokenizer_stage import evaluate_tokenizer, train_tokenizer


# ----------------------------------------------------------------------------- commands
def cmd_tok_train(cfg: TokTrainConfig) -> None:
    train_tokenizer(cfg)


def cmd_tok_eval(cfg: TokEvalConfig) -> None:
    evaluate_tokenizer(cfg)


def cmd_base(cfg) -> None:
    from .stages import train_base  # torch: loaded only for the commands that train

    with _processes(cfg):
        train_base(cfg)


def cmd_mid(cfg) -> None:
    from .stages import train_mid  # torch

    with _processes(cfg):
        train_mid(cfg)


def cmd_sft(cfg) -> None:
    from .stages import train_sft  # torch

    with _processes(cfg):
        train_sft(cfg)


def cmd_rl(cfg) -> None:
    from .stages import train_rl  # torch

    with _processes(cfg):
        train_rl(cfg)


def cmd_speedrun(cfg: SpeedrunConfig) -> None:
    from .speedrun import run_speedrun  # torch

    run_speedrun(cfg)


def cmd_eval(cfg: EvalConfig) -> None:
    from .evaluate import run_eval  # torch

    with _processes(cfg):
        run_eval(cfg)


def cmd_chat(cfg: ChatConfig) -> None:
    from .chat import run_chat  # torch

    run_chat(cfg)


def cmd_serve(cfg: ServeConfig) -> None:
    from .serve import run_server  # torch and the web stack

    run_server(cfg)


def cmd_export(cfg: ExportConfig) -> None:
    from .export import run_export  # torch

    run_export(cfg)


def cmd_import_hf(cfg: ImportHFConfig) -> None:
    from .export import import_hf  # torch

    import_hf(cfg)


def cmd_import_nanochat(cfg: ImportNanochatConfig) -> None:
    from .nanochat_import import import_nanochat  # torch

    import_nanochat(cfg)


@contextlib.contextmanager
def _processes(cfg):
    """The body runs in each of the run's processes: `nproc` on each of `nnodes` machines. Unless
    already under torchrun, the command re-launches itself under torchrun when more than one
    process is asked for (at most one per CPU, and per GPU on CUDA); the process group closes
    after."""
    from .runtime import check_local_processes, cleanup_distributed  # torch

    if (cfg.nproc > 1 or getattr(cfg, "nnodes", 1) > 1) and "RANK" not in os.environ:
        check_local_processes(cfg.nproc, cfg.device)  # --nproc fits this machine's CPUs (and GPUs)
        _relaunch_with_torchrun(cfg)
    try:
        yield
    finally:
        cleanup_distributed()


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def torchrun_command(cfg, argv: list[str]) -> list[str]:
    """torchrun's command line for this run: `argv` (the command's own arguments) without the
    launch flags, which become torchrun's. One node: a standalone rendezvous on this machine;
    several: a static one at --master-addr:--master-port, which node 0 hosts. Commands without
    the node flags (eval) run on one node."""
    nnodes, node_rank = getattr(cfg, "nnodes", 1), getattr(cfg, "node_rank", 0)
    master_addr, master_port = getattr(cfg, "master_addr", None), getattr(cfg, "master_port", 29500)
    if node_rank >= nnodes:
        raise RustchatError(f"--node-rank {node_rank} must be below --nnodes {nnodes}")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in LAUNCH_FLAGS:
            continue
        out.append(a)
    if nnodes == 1:
        launch = ["--standalone"]
    else:
        if not master_addr:
            raise RustchatError("--nnodes > 1 needs --master-addr (the address of node 0, reachable from every node)")
        launch = [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={master_port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        f"--nproc-per-node={cfg.nproc}",
        "-m",
        "rustchat.cli",
        *out,
    ]


def _relaunch_with_torchrun(cfg) -> None:
    """Re-run this very command under torchrun (it never returns)."""
    cmd = torchrun_command(cfg, sys.argv[1:])
    os.execv(sys.executable, cmd)


# ----------------------------------------------------------------------------- the parser
# The training stages as (name, help, handler); COMMANDS adds each one's config class from
# STAGE_CONFIGS. COMMANDS and TOK_COMMANDS hold (name, help, config class, handler); every
# command's flags come from its config class's fields.
STAGE_COMMANDS = (
    ("base", "pretrain on web text (FineWeb-Edu or --data-dir)", cmd_base),
    ("mid", "mid-train on conversations (every token trained)", cmd_mid),
    ("sft", "supervised fine-tuning (loss on assistant tokens)", cmd_sft),
    ("rl", "reinforcement learning on tasks with checkable answers (simplified GRPO)", cmd_rl),
)
COMMANDS = (
    *((name, help_, STAGE_CONFIGS[name], handler) for name, help_, handler in STAGE_COMMANDS),
    ("speedrun", "tokenizer -> base -> mid -> SFT (-> RL) -> eval in one go", SpeedrunConfig, cmd_speedrun),
    (
        "eval",
        "evaluate a checkpoint: chat tasks + ChatCORE, or bits/byte (and --core: CORE) for base models",
        EvalConfig,
        cmd_eval,
    ),
    ("chat", "chat with a model in the terminal", ChatConfig, cmd_chat),
    ("serve", "web chat UI and an OpenAI-compatible /v1/chat/completions API", ServeConfig, cmd_serve),
    (
        "export",
        "write a checkpoint as a Hugging Face transformers directory (NanoChat architecture)",
        ExportConfig,
        cmd_export,
    ),
    (
        "import-hf",
        "import a transformers NanoChat directory as a checkpoint to continue mid/SFT",
        ImportHFConfig,
        cmd_import_hf,
    ),
    (
        "import-nanochat",
        "import a nanochat checkpoint dir (+ tokenizer.pkl) to continue mid/SFT",
        ImportNanochatConfig,
        cmd_import_nanochat,
    ),
)
TOK_COMMANDS = (
    ("train", "train a BPE tokenizer on text files, directories or parquet shards", TokTrainConfig, cmd_tok_train),
    ("eval", "bytes/token by kind of text, ours vs GPT-4 and GPT-4o", TokEvalConfig, cmd_tok_eval),
)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line too, like every other error, pointing to the help of the
    command they concern. Flags are never abbreviated: `--dept` is an error, not `--depth`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_command(sub, name: str, help_: str, cls, handler) -> None:
    p = sub.add_parser(name, help=help_, description=help_)
    add_arguments(p, cls)
    p.set_defaults(config_class=cls, handler=handler, command_parser=p)


def versions() -> str:
    """`rustchat --version`: the package's and the Rust core's (they are built together; a
    mismatch means a stale extension)."""
    try:
        installed = version("rustchat")
    except PackageNotFoundError:  # run from a checkout without installing
        installed = __version__
    return f"rustchat {installed} (core {getattr(_core, '__version__', 'unknown')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rustchat", description="Train and chat with small language models.")
    parser.add_argument("--version", action="version", version=versions())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tok = sub.add_parser("tok", help="train or evaluate the BPE tokenizer")
    tsub = tok.add_subparsers(dest="tok_command", required=True, parser_class=_Parser)
    for spec in TOK_COMMANDS:
        _add_command(tsub, *spec)
    for spec in COMMANDS:
        _add_command(sub, *spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, so the hint names its help
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    code = _run(args)
    runtime = sys.modules.get("rustchat.runtime")  # loaded only by the commands that use torch
    if runtime is not None and runtime.had_process_group():
        runtime.exit_without_finalizing(code)  # a torchrun worker: its gloo threads may still be freeing work
    return code


def _run(args) -> int:
    try:
        args.handler(from_args(args.config_class, args))
    except RustchatError as e:  # TextSourceError and every other user-facing error derive from it
        print(f"rustchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rustchat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
