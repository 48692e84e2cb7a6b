"""The `rustchat` command.

Each stage module contributes a `register(subparsers)` that adds its subcommand; commands
whose module needs torch import it only when run, so `rustchat tok ...` starts fast.
User-facing errors (bad files, missing checkpoints) print as one line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import RustchatError, get_base_dir


def default_tokenizer_dir() -> Path:
    return get_base_dir(create=False) / "tokenizer"


# ------------------------------------------------------------------ tok train / tok eval
def _cmd_tok_train(args) -> None:
    from tqdm import tqdm

    from .textsource import iter_documents, list_files
    from .tokenizer import Tokenizer

    files = list_files(args.input)
    total = sum(f.stat().st_size for f in files)
    if args.max_chars:
        total = min(total, args.max_chars)
    read = [0]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="counting chunks", disable=args.quiet, mininterval=0.5)
    last = [0]

    def progress(_chars_seen):
        bar.update(read[0] - last[0])
        last[0] = read[0]

    t0 = time.time()
    tok = Tokenizer.train(
        iter_documents(args.input, progress=read),
        args.vocab_size,
        doc_cap=args.doc_cap or None,
        max_chars=args.max_chars,
        progress=progress,
        verbose=not args.quiet,
    )
    bar.close()
    out = Path(args.out) if args.out else default_tokenizer_dir()
    tok.save(out)
    print(f"trained vocab {tok.vocab_size} on {read[0] / 1e6:.1f} M chars in {time.time() - t0:.1f} s -> {out}")


def _load_tokenizer(path: str | None):
    from .tokenizer import Tokenizer

    d = Path(path) if path else default_tokenizer_dir()
    if not (d / "tokenizer.json").is_file():
        raise RustchatError(f"no tokenizer at {d}: run `rustchat tok train --input FILES --out {d}` first")
    return Tokenizer.load(d)


def _cmd_tok_eval(args) -> None:
    from .tok_eval import evaluate, format_table

    tok = _load_tokenizer(args.tokenizer)
    extra = {}
    for spec in args.text or []:
        kind, sep, path = spec.partition("=")
        if not sep:
            raise RustchatError(f"--text expects KIND=PATH, got {spec!r}")
        p = Path(path)
        if not p.is_file():
            raise RustchatError(f"--text {kind}: no such file {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            extra[kind] = f.read(args.max_bytes)
    print(f"tokenizer: {tok} ({args.tokenizer or default_tokenizer_dir()})")
    print(format_table(evaluate(tok, extra)))


def _register_tok(sub) -> None:
    p = sub.add_parser("tok", help="train or evaluate the BPE tokenizer")
    tsub = p.add_subparsers(dest="tok_command", required=True)
    t = tsub.add_parser("train", help="train a BPE tokenizer on text files, directories or parquet shards")
    t.add_argument("--input", nargs="+", required=True, help="text/JSONL/parquet files or directories")
    t.add_argument("--vocab-size", type=int, default=65536)
    t.add_argument("--out", help=f"output directory (default {default_tokenizer_dir()})")
    t.add_argument("--doc-cap", type=int, default=10_000, help="max chars per document (0: no cap)")
    t.add_argument("--max-chars", type=int, default=None, help="max chars in all")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_tok_train)
    e = tsub.add_parser("eval", help="bytes/token by kind of text, ours vs GPT-2 and GPT-4")
    e.add_argument("--tokenizer", help="tokenizer directory (default: the trained one under the base dir)")
    e.add_argument("--text", action="append", metavar="KIND=PATH", help="extra rows, e.g. train=train.txt val=val.txt")
    e.add_argument("--max-bytes", type=int, default=2_000_000, help="chars read from each --text file")
    e.set_defaults(func=_cmd_tok_eval)


# Modules that add further subcommands (stages, eval, chat) when present.
_STAGE_MODULES = ("rustchat.stages_cli", "rustchat.eval_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rustchat", description="Train and chat with small language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_tok(sub)
    import importlib

    for name in _STAGE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .textsource import TextSourceError

    try:
        args.func(args)
    except (RustchatError, TextSourceError) as e:
        print(f"rustchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rustchat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
