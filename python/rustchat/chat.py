"""`rustchat chat`: a streaming terminal chat with history; `-p PROMPT` answers once and exits.

Each turn renders the whole conversation (`render_for_completion`), so earlier replies,
including their calculator calls, are what the model sees again. Tool calls are shown inline,
e.g. `[calculator: 3*7 -> 21]`. Oldest turns are dropped when the conversation outgrows the
model's context.
"""

from __future__ import annotations

import random
import sys

from .checkpoint import load_model
from .common import RustchatError
from .config import DEFAULT_TEMPERATURE, ChatConfig
from .conversation import render_for_completion
from .engine import Engine, stream_reply
from .replies import CompletionParser

HELP = "commands: 'clear' starts over, 'quit' (or Ctrl-D) exits"


class ChatSession:
    """A conversation with a model: `reply(text, write)` streams the answer and keeps history."""

    def __init__(
        self,
        engine,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int | None = 50,
        max_tokens: int = 512,
        seed: int | None = None,
    ):
        if temperature < 0:
            raise RustchatError(f"--temperature must be >= 0, got {temperature}")
        self.engine, self.temperature, self.top_k, self.max_tokens = engine, temperature, top_k, max_tokens
        self.seed = seed
        self.history: list[dict] = []

    def clear(self) -> None:
        self.history = []

    def _prompt(self, user: str):
        tok = self.engine.tok
        ctx = self.engine.model.config.sequence_len
        room = min(self.max_tokens, ctx // 2)  # keep at least this much context for the reply
        history, dropped = list(self.history), 0
        while True:
            msgs = history + [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]
            prompt = render_for_completion(tok, {"messages": msgs})
            if len(prompt) + room <= ctx or not history:
                return prompt, dropped
            history, dropped = history[2:], dropped + 1  # one user + assistant pair

    def reply(self, user: str, write=None) -> str:
        """Stream the answer to `user` through `write(str)`; returns the reply's text."""
        write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        prompt, dropped = self._prompt(user)
        if dropped:
            self.history = self.history[2 * dropped :]
            write(f"(dropped the {dropped} oldest turn(s) to fit the model's context)\n")
        seed = self.seed if self.seed is not None else random.randrange(1 << 31)
        parser = CompletionParser(self.engine.tok)
        shown = []
        for kind, s in stream_reply(
            self.engine,
            prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=seed,
            parser=parser,
        ):
            s = s if kind == "text" else f" {s} "
            shown.append(s)
            write(s)
        write("\n")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": parser.content()}]
        return "".join(shown)


def run_chat(cfg: ChatConfig, input_fn=input, write=None) -> None:
    model, tok, meta = load_model(cfg.source, depth=cfg.depth, step=cfg.step, device=cfg.device, base_dir=cfg.base_dir)
    session = ChatSession(
        Engine(model, tok), temperature=cfg.temperature, top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=cfg.seed
    )
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if cfg.prompt is not None:
        session.reply(cfg.prompt, write)
        return
    write(f"rustchat: {cfg.source} d{model.config.n_layer} step {meta.get('step')} on {model.get_device()}. {HELP}\n")
    while True:
        try:
            text = input_fn("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        cmd = text.strip().lower()
        if cmd in ("quit", "exit", "/quit", "/exit"):
            return
        if cmd in ("clear", "/clear"):
            session.clear()
            write("(conversation cleared)\n")
            continue
        if not cmd:
            continue
        write("assistant> ")
        session.reply(text, write)
