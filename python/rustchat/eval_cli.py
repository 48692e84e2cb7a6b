"""CLI for using a trained model: `rustchat eval`, `rustchat chat`, `rustchat serve`.
Registered into `rustchat.cli`; torch and the web stack are imported only when a command runs."""
from __future__ import annotations

from .common import RustchatError

SOURCES = ["base", "mid", "sft", "rl"]


def _add_model_flags(p, default_source: str = "sft") -> None:
    p.add_argument("-i", "--source", default=default_source, choices=SOURCES, help="which stage's checkpoint to load")
    p.add_argument("--depth", type=int, default=None, help="model depth (default: the largest with a checkpoint)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--base-dir", default=None, help="artifacts root (default $RUSTCHAT_BASE_DIR or ~/.cache/rustchat)")


def _cmd_eval(args) -> None:
    from .evaluate import run_eval

    run_eval(args)


def _cmd_chat(args) -> None:
    from .chat_cli import run_chat

    run_chat(args)


def _cmd_serve(args) -> None:
    from .serve import run_server

    run_server(args)


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise ValueError(s)
        return v

    parse.__name__ = kind.__name__
    return parse


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint: chat tasks + ChatCORE, or bits/byte for base models")
    _add_model_flags(e)
    e.add_argument("--tasks", default="default",
                   help="tiny (offline: Arithmetic, SpellingBee), default (ARC-Easy, ARC-Challenge, MMLU, GSM8K, "
                        "HumanEval, SpellingBee) or a comma list, e.g. arc-easy,gsm8k")
    e.add_argument("--max-problems", type=_positive(int), default=None, help="first N problems of each task")
    e.add_argument("--batch-size", type=_positive(int), default=8, help="rows per forward / samples per batch")
    e.add_argument("--num-samples", type=_positive(int), default=1, help="replies per generative problem (pass@n)")
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    e.add_argument("--top-k", type=_positive(int), default=None)
    e.add_argument("--max-new-tokens", type=_positive(int), default=512)
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--data-dir", default=None, help="-i base: validation text files (default: the base dir's)")
    e.add_argument("--bpb-tokens", type=_positive(int), default=1 << 20, help="-i base: tokens scored at most")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model_flags(c)
    c.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    c.add_argument("--temperature", type=float, default=0.6)
    c.add_argument("--top-k", type=_positive(int), default=50)
    c.add_argument("--max-tokens", type=_positive(int), default=512, help="tokens per reply at most")
    c.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new one per reply)")
    c.set_defaults(func=_cmd_chat)

    s = sub.add_parser("serve", help="web chat UI and a streaming /chat/completions endpoint")
    _add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--temperature", type=float, default=0.8, help="default when a request gives none")
    s.add_argument("--top-k", type=_positive(int), default=50, help="default when a request gives none")
    s.add_argument("--max-tokens", type=_positive(int), default=512, help="default when a request gives none")
    s.set_defaults(func=_cmd_serve)


__all__ = ["register", "RustchatError"]
