"""Inference engine: KV-cached batched sampling with the calculator tool (docs/design.md, "Inference").

The prompt is prefilled once with batch 1 and its cache fanned out to N rows
(`KVCache.prefill`); each step then feeds one token per row. A row ends at `<|assistant_end|>`
or `<|bos|>`. When a row emits `<|python_end|>`, the tokens since its `<|python_start|>` go to
the restricted calculator (`rustchat.tools`, never `eval`); a result is forced into
that row as `<|output_start|>` result `<|output_end|>`: those tokens are fed to the model on the
following steps instead of sampled ones.

`Engine.generate` streams (token column, forced flags) per step; `generate_batch` collects the
completions. `CompletionParser` turns a row's tokens back into conversation parts (text,
python, python_output) for display and chat history.
"""
from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from .common import RustchatError
from .model import KVCache
from .runtime import autocast_ctx
from .tokenizer import SPECIAL_TOKENS
from .tools import calculate


def _default_calculator(expr: str) -> str | None:
    return calculate(expr, timeout=1.0)


def _check_sampling(temperature: float, top_k: int | None) -> None:
    if not temperature >= 0:  # also refuses NaN
        raise RustchatError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise RustchatError(f"top_k must be >= 1 or None, got {top_k}")


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `sample_next` draws from, for temperature > 0: (probs [B, K], ids [B, K]) over the
    top tokens, or (probs [B, V], None) over the whole vocabulary. Rows are independent, so a
    batch gives each row exactly what it would get alone."""
    logits = logits.float() / temperature
    if top_p is not None and top_p < 1.0:
        k = top_k if top_k is not None and top_k < logits.size(-1) else logits.size(-1)
        vals, idx = torch.topk(logits, k, dim=-1)  # sorted, largest first
        probs = torch.softmax(vals, dim=-1)
        # drop a token once the tokens before it already reach top_p (the first always stays)
        return probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0), idx
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals, dim=-1), idx
    return torch.softmax(logits, dim=-1), None


def draw(probs: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `sampling_probs`' output -> int64 [B]."""
    choice = torch.multinomial(probs, 1, generator=generator)
    return (ids.gather(-1, choice) if ids is not None else choice).squeeze(-1)


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V] -> int64 [B]. Greedy at temperature 0 (and top_k 1).
    `top_p` < 1 keeps the smallest set of top tokens whose probability reaches top_p (after top_k)."""
    _check_sampling(temperature, top_k)
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    return draw(*sampling_probs(logits, temperature, top_k, top_p), generator)


class RowState:
    """Per-sample state: forced tokens still to feed, the open tool call, done."""

    __slots__ = ("forced", "in_python", "python", "done")

    def __init__(self):
        self.forced: deque[int] = deque()
        self.in_python = False
        self.python: list[int] = []
        self.done = False


class Engine:
    """Generation for one model + tokenizer. `tools=False` turns the calculator off;
    `calculator(expr) -> str | None` replaces it (None: refused, nothing is forced)."""

    def __init__(self, model, tokenizer, *, tools: bool = True,
                 calculator: Callable[[str], str | None] | None = None):
        self.model, self.tok, self.tools = model, tokenizer, tools
        self.calculator = calculator or _default_calculator
        sp = {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
        self.bos, self.assistant_end = sp["<|bos|>"], sp["<|assistant_end|>"]
        self.python_start, self.python_end = sp["<|python_start|>"], sp["<|python_end|>"]
        self.output_start, self.output_end = sp["<|output_start|>"], sp["<|output_end|>"]
        self.stop_tokens = frozenset((self.bos, self.assistant_end))

    def _device(self) -> torch.device:
        return self.model.get_device()

    def _new_cache(self, batch_size: int, max_len: int):
        return KVCache.for_model(self.model, batch_size, max_len)

    def _tool_result(self, row: RowState) -> list[int]:
        expr = self.tok.decode(row.python)
        result = self.calculator(expr)
        if result is None:
            return []
        return [self.output_start, *self.tok.encode_ordinary(result), self.output_end]

    def next_token(self, row: RowState, sampled: int) -> tuple[int, bool]:
        """The token a row takes this step (a forced one before the sampled one) and whether it
        was forced; updates the row's tool-call state and `done`."""
        is_forced = bool(row.forced)
        t = row.forced.popleft() if is_forced else sampled
        if t in self.stop_tokens:
            row.done = True
        elif self.tools and not is_forced:
            if t == self.python_start:
                row.in_python, row.python = True, []
            elif t == self.python_end and row.in_python:
                row.in_python = False
                row.forced.extend(self._tool_result(row))
            elif row.in_python:
                row.python.append(t)
        return t, is_forced

    @torch.inference_mode()
    def generate(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[bool]]]:
        """Yields, per step, (token per row, forced per row). A row's stop token is yielded
        once; afterwards its entries repeat `<|assistant_end|>` (ignore them). Ends when every
        row has stopped or after `max_tokens` steps (default: the rest of the model's context)."""
        prompt = [int(t) for t in tokens]
        if not prompt:
            raise RustchatError("generate needs a non-empty prompt")
        if num_samples < 1:
            raise RustchatError(f"num_samples must be >= 1, got {num_samples}")
        _check_sampling(temperature, top_k)  # before any work
        max_tokens = self.reply_limit(len(prompt), max_tokens)
        if max_tokens < 1:
            return
        device = self._device()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        max_len = len(prompt) + max_tokens
        # prefill once with batch 1, then copy the cache into every sample row
        cache1 = self._new_cache(1, max_len)
        logits = self._forward([prompt], cache1, device)
        if num_samples == 1:
            cache = cache1
        else:
            cache = self._new_cache(num_samples, max_len)
            cache.prefill(cache1)
            del cache1
            logits = logits.expand(num_samples, -1)
        yield from self._decode(logits, cache, num_samples, max_tokens, gen, temperature, top_k, device)

    @torch.inference_mode()
    def generate_prompts(self, prompts: Sequence[Sequence[int]], max_tokens: int | None = None,
                         temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                         ) -> Iterator[tuple[list[int], list[bool]]]:
        """As `generate`, with one row per prompt. The prompts must have one length: the rows
        share the cache's position, so they are prefilled together without padding."""
        rows = [[int(t) for t in p] for p in prompts]
        if not rows or not rows[0]:
            raise RustchatError("generate_prompts needs non-empty prompts")
        if len({len(r) for r in rows}) != 1:
            raise RustchatError("generate_prompts needs prompts of one length")
        _check_sampling(temperature, top_k)
        max_tokens = self.reply_limit(len(rows[0]), max_tokens)
        if max_tokens < 1:
            return
        device = self._device()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        cache = self._new_cache(len(rows), len(rows[0]) + max_tokens)
        logits = self._forward(rows, cache, device)
        yield from self._decode(logits, cache, len(rows), max_tokens, gen, temperature, top_k, device)

    def _decode(self, logits, cache, num_rows: int, max_tokens: int, gen, temperature, top_k, device):
        """The decoding loop after the prefill: sample, force tool outputs, stop rows."""
        rows = [RowState() for _ in range(num_rows)]
        for step in range(max_tokens):
            sampled = sample_next(logits, gen, temperature, top_k).tolist()
            column, forced = [], []
            for i, row in enumerate(rows):
                if row.done:
                    column.append(self.assistant_end)
                    forced.append(False)
                    continue
                t, is_forced = self.next_token(row, int(sampled[i]))
                column.append(t)
                forced.append(is_forced)
            yield column, forced
            if all(r.done for r in rows) or step == max_tokens - 1:
                return
            logits = self._forward([[t] for t in column], cache, device)

    def reply_limit(self, prompt_len: int, max_tokens: int | None) -> int:
        """New tokens a reply may have: `max_tokens` (all when None), capped by what the model's
        context leaves after the prompt (it was trained on sequence_len tokens), and at least one
        token even when the prompt fills the context."""
        room = max(self.model.config.sequence_len - prompt_len, 1)
        return room if max_tokens is None else min(max_tokens, room)

    def _forward(self, ids: list[list[int]], cache, device) -> torch.Tensor:
        # autocast per call, not around the generator: its state is thread-local and the
        # consumer (e.g. the web server) may resume us on another thread
        x = torch.tensor(ids, dtype=torch.long, device=device)
        with autocast_ctx(device):
            return self.model(x, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42, *,
                       return_forced: bool = False):
        """Completions (generated ids, without the prompt and the stop token), one list per
        sample; with `return_forced`, also per-token forced flags: (completions, forced)."""
        stream = self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed)
        return self._collect(stream, num_samples, return_forced)

    def complete_prompts(self, prompts: Sequence[Sequence[int]], max_tokens: int | None = None,
                         temperature: float = 1.0, top_k: int | None = None, seed: int = 42) -> list[list[int]]:
        """One completion per prompt (prompts of one length, see `generate_prompts`)."""
        return self._collect(self.generate_prompts(prompts, max_tokens, temperature, top_k, seed), len(prompts), False)

    def _collect(self, stream, num_rows: int, return_forced: bool):
        out = [[] for _ in range(num_rows)]
        flags = [[] for _ in range(num_rows)]
        done = [False] * num_rows
        for column, forced in stream:
            for i, (t, f) in enumerate(zip(column, forced)):
                if done[i]:
                    continue
                if t in self.stop_tokens:
                    done[i] = True
                    continue
                out[i].append(t)
                flags[i].append(f)
        return (out, flags) if return_forced else out


class CompletionParser:
    """A row's tokens -> events ("text", s), ("python", expr), ("python_output", result).

    Text is decoded incrementally (a multi-byte character split across tokens is held back
    until complete). A tool call gives ("python", expr) at `<|python_end|>` and
    ("python_output", result) at `<|output_end|>`. `finished` turns true at a stop token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        sp = tokenizer.special_tokens
        self.ids = {name: sp[name] for name in SPECIAL_TOKENS if name in sp}
        self.special = set(self.ids.values())
        self.stops = {self.ids.get("<|assistant_end|>"), self.ids.get("<|bos|>")} - {None}
        self.mode = "text"  # or "python" / "output"
        self.buf: list[int] = []
        self.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finished = False
        self.parts: list[dict] = []

    def _add_part(self, kind: str, text: str) -> None:
        if kind == "text" and self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        elif text or kind != "text":
            self.parts.append({"type": kind, "text": text})

    def feed(self, token: int) -> list[tuple[str, str]]:
        if self.finished:
            return []
        ids, events = self.ids, []
        if token in self.stops:
            self.finished = True
            return self.flush()
        if token in self.special:
            if token == ids.get("<|python_start|>") or token == ids.get("<|output_start|>"):
                events += self.flush()
                self.mode = "python" if token == ids["<|python_start|>"] else "output"
                self.buf = []
            elif token == ids.get("<|python_end|>") and self.mode == "python":
                events.append(("python", self.tok.decode(self.buf)))
                self.mode = "text"
            elif token == ids.get("<|output_end|>") and self.mode == "output":
                events.append(("python_output", self.tok.decode(self.buf)))
                self.mode = "text"
            for kind, s in events:
                self._add_part(kind, s)
            return events  # other specials (a stray <|user_start|>...) are dropped
        if self.mode == "text":
            s = self.text.decode(self.tok.decode_bytes([token]))
            if s:
                self._add_part("text", s)
                return [("text", s)]
            return []
        self.buf.append(token)
        return []

    def flush(self) -> list[tuple[str, str]]:
        """Pending text (an incomplete character becomes U+FFFD)."""
        s = self.text.decode(b"", final=True)
        self.text.reset()
        if s:
            self._add_part("text", s)
            return [("text", s)]
        return []

    def content(self):
        """The assistant message content: a string, or a list of parts when tools were used."""
        if all(p["type"] == "text" for p in self.parts):
            return "".join(p["text"] for p in self.parts)
        return [dict(p) for p in self.parts]


def format_tool_call(expr: str, result: str | None) -> str:
    """How chat shows a calculator call: [calculator: 3*7 -> 21]."""
    return f"[calculator: {expr.strip()} -> {result if result is not None else 'refused'}]"


class ReplyEvents:
    """One reply's tokens -> display events ("text", s) and ("tool", "[calculator: e -> r]").

    A tool call whose expression the calculator refused shows when the next token arrives
    without an output. `parser` holds the reply's parts (for history)."""

    def __init__(self, tokenizer, parser: CompletionParser | None = None):
        self.parser = parser or CompletionParser(tokenizer)
        self.pending: str | None = None  # expression waiting for its output

    @property
    def finished(self) -> bool:
        return self.parser.finished

    def feed(self, token: int) -> list[tuple[str, str]]:
        out = []
        for kind, s in self.parser.feed(token):
            if kind == "python":
                if self.pending is not None:
                    out.append(("tool", format_tool_call(self.pending, None)))
                self.pending = s
            elif kind == "python_output":
                out.append(("tool", format_tool_call(self.pending or "", s)))
                self.pending = None
            else:
                if self.pending is not None:
                    out.append(("tool", format_tool_call(self.pending, None)))
                    self.pending = None
                out.append((kind, s))
        return out

    def finish(self, cut: bool = False) -> list[tuple[str, str]]:
        """What is still held back once the reply has ended: by a stop token, or `cut` by its
        token limit (then a call still waiting for its output was never run, not refused)."""
        out = self.parser.flush()
        if self.pending is not None:
            result = "not run: the reply reached its token limit" if cut else None
            out.append(("tool", format_tool_call(self.pending, result)))
            self.pending = None
        return out


def stream_reply(engine: Engine, prompt: Sequence[int], *, max_tokens: int | None = None,
                 temperature: float = 0.6, top_k: int | None = 50, seed: int = 42,
                 parser: CompletionParser | None = None) -> Iterator[tuple[str, str]]:
    """One sampled reply as display events (see ReplyEvents). Pass `parser` to read the reply's
    parts (for history) afterwards."""
    events = ReplyEvents(engine.tok, parser)
    for column, _forced in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed):
        yield from events.feed(column[0])
        if events.finished:
            break
    yield from events.finish(cut=not events.finished)
