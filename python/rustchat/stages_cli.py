"""CLI for the training stages: `rustchat base|mid|sft`, `rustchat speedrun`,
`rustchat import-nanochat`. Registered into `rustchat.cli`."""
from __future__ import annotations

import os
import sys

from .common import RustchatError


def _add_stage_flags(p, stage: str) -> None:
    from .stages import defaults_for

    d = defaults_for(stage)
    unit = "examples" if stage == "sft" else "tokens"
    p.add_argument("--depth", type=int, default=10, help="model depth (d10 = 640 dim, 5 heads)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--device-batch-size", type=int, default=d["device_batch_size"], help="rows per micro-batch")
    p.add_argument("--total-batch-size", type=int, default=d["total_batch_size"],
                   help=f"{unit} per optimizer step; gradient accumulation makes up the rest")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the stage's horizon)")
    p.add_argument("--num-epochs", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--run", default=None, help="wandb run name (off by default and when offline)")
    p.add_argument("--resume", action="store_true", help="continue from this stage's latest checkpoint")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop at this step with a checkpoint, schedule unchanged; continue later with --resume")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--base-dir", default=None, help="artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this node (wraps torchrun)")
    p.add_argument("--quiet", action="store_true")
    if stage == "base":
        p.add_argument("--data-dir", default=None, help="local parquet/text files instead of downloading FineWeb-Edu")
        p.add_argument("--num-shards", type=int, default=8, help="FineWeb-Edu shards to download")
        p.add_argument("--tokens-per-param", type=float, default=20.0)
    else:
        p.add_argument("--tasks", default="default", help="task mixture preset: default (hub datasets) or tiny (offline)")
        p.add_argument("--task-dir", default=None, help="directory with local copies of the hub datasets")
    if stage == "sft":
        p.add_argument("--init-lr-frac", type=float, default=0.02)
        p.add_argument("--pack", action="store_true", help="pack conversations into rows instead of padding")


def _relaunch_with_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with `nproc` processes."""
    argv = [a for a in sys.argv[1:]]
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rustchat.cli", *out]
    os.execv(sys.executable, cmd)


def _cmd_stage(args) -> None:
    from .common import cleanup_distributed
    from .stages import STAGE_FUNCS, config_from_args

    if args.nproc > 1 and "RANK" not in os.environ:
        _relaunch_with_torchrun(args.nproc)
    cfg = config_from_args(args.command, args)
    try:
        STAGE_FUNCS[args.command](cfg)
    finally:
        cleanup_distributed()


def _cmd_speedrun(args) -> None:
    from .speedrun import run_speedrun

    run_speedrun(args)


def _cmd_import_nanochat(args) -> None:
    """nanochat checkpoint + tokenizer.pkl -> a rustchat checkpoint of --stage and our tokenizer,
    so `rustchat mid` / `rustchat sft` continue from it."""
    from pathlib import Path

    from .checkpoint import save_checkpoint, stage_dir
    from .common import get_base_dir
    from .nanochat_import import find_nanochat_step, import_nanochat_model
    from .nanochat_tokenizer import load_nanochat_tokenizer

    src = Path(args.checkpoint_dir)
    step = args.step if args.step is not None else find_nanochat_step(src)
    model, meta = import_nanochat_model(src, step)
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
    else:
        near = [src / "tokenizer.pkl", src.parent / "tokenizer" / "tokenizer.pkl",
                src.parent.parent / "tokenizer" / "tokenizer.pkl"]
        tok_path = next((p for p in near if p.is_file()), None)
        if tok_path is None:
            raise RustchatError(f"no tokenizer.pkl near {src}; pass --tokenizer PATH")
    tok = load_nanochat_tokenizer(tok_path)
    if tok.vocab_size != model.config.vocab_size:
        raise RustchatError(f"tokenizer {tok_path} has {tok.vocab_size} ids but the model expects {model.config.vocab_size}")
    base = Path(args.base_dir) if args.base_dir else get_base_dir()
    tok.save(base / "tokenizer")
    depth = model.config.n_layer
    out = stage_dir(args.stage, depth, base)
    save_checkpoint(out, step, model, None, {"imported_from": str(src.resolve()), "nanochat_meta": meta,
                                              "stage": args.stage})
    print(f"imported nanochat step {step} (depth {depth}, {model.num_params() / 1e6:.1f}M params) -> {out}; "
          f"tokenizer -> {base / 'tokenizer'}")


def register(sub) -> None:
    for stage, help_ in (("base", "pretrain on web text (FineWeb-Edu or --data-dir)"),
                         ("mid", "mid-train on conversations (every token trained)"),
                         ("sft", "supervised fine-tuning (loss on assistant tokens)")):
        p = sub.add_parser(stage, help=help_)
        _add_stage_flags(p, stage)
        p.set_defaults(func=_cmd_stage)
    s = sub.add_parser("speedrun", help="tokenizer -> base -> mid -> SFT -> eval in one go")
    s.add_argument("--preset", default="tiny", choices=["tiny", "d10", "d20"],
                   help="tiny: offline, CPU, minutes; d10/d20: the real recipes on the hub datasets")
    s.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    s.add_argument("--base-dir", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_speedrun)
    n = sub.add_parser("import-nanochat", help="import a nanochat checkpoint dir (+ tokenizer.pkl) to continue mid/SFT")
    n.add_argument("checkpoint_dir", help="directory with model_<step>.pt and meta_<step>.json")
    n.add_argument("--tokenizer", default=None, help="nanochat tokenizer.pkl (default: look beside the checkpoint)")
    n.add_argument("--stage", default="base", choices=["base", "mid", "sft"], help="stage to file the import under")
    n.add_argument("--step", type=int, default=None)
    n.add_argument("--base-dir", default=None)
    n.set_defaults(func=_cmd_import_nanochat)


__all__ = ["register", "RustchatError"]
