"""Inference engine: KV-cached batched sampling with the calculator tool (docs/design.md, "Inference engine").

The prompt is prefilled once with batch 1 and its cache fanned out to N rows
(`KVCache.prefill`); each step then feeds one token per row. A row ends at `<|assistant_end|>`
or `<|bos|>`. When a row emits `<|python_end|>`, the tokens since its `<|python_start|>` go to
the restricted calculator (`rustchat.tools`, never `eval`); a result is forced into
that row as `<|output_start|>` result `<|output_end|>`: those tokens are fed to the model on the
following steps instead of sampled ones.

`Engine.decode_step` is the one decoding step after a forward, for rows of any settings: it
samples every row (rustchat.sampling), forces calculator tokens, stops rows, and fails only the
row whose logits are no distribution. `Engine.generate` runs it over one shared cache and
streams (token column, forced flags) per step; the server's scheduler (rustchat.batching)
runs it over its slot cache. `generate_batch` collects the completions; `stream_reply` turns
one reply into display events (rustchat.replies).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from .common import MAX_NEW_TOKENS, MAX_ROWS, RustchatError, check_count
from .model import KVCache
from .replies import CompletionParser, ReplyEvents
from .runtime import autocast_ctx
from .sampling import Sampling, check_sampling, sample_rows, token_logprobs
from .tokenizer import SPECIAL_TOKENS
from .tools import calculate


def _check_max_tokens(max_tokens: int | None) -> None:
    """A reply's token limit: None (the rest of the context) or 1..MAX_NEW_TOKENS."""
    if max_tokens is not None:
        check_count("max_tokens", max_tokens, 1, MAX_NEW_TOKENS)


def _default_calculator(expr: str) -> str | None:
    return calculate(expr, timeout=1.0)


class RowState:
    """Per-row state: its sampling settings, forced tokens still to feed, the open tool call,
    done, and `error` (a message) once its sampling failed."""

    __slots__ = ("sampling", "forced", "in_python", "python", "done", "error")

    def __init__(self, sampling: Sampling | None = None):
        self.sampling = sampling or Sampling(temperature=0.0)
        self.forced: deque[int] = deque()
        self.in_python = False
        self.python: list[int] = []
        self.done = False
        self.error: str | None = None


class Step:
    """What one row took at one decode step: the token, whether it was forced, and with
    `Sampling.logprobs` its (log-probability, [(id, log-probability)] top alternatives)."""

    __slots__ = ("token", "forced", "logprobs")

    def __init__(self, token: int, forced: bool, logprobs=None):
        self.token, self.forced, self.logprobs = token, forced, logprobs


class Engine:
    """Generation for one model + tokenizer. `tools=False` turns the calculator off;
    `calculator(expr) -> str | None` replaces it (None: refused, nothing is forced)."""

    def __init__(self, model, tokenizer, *, tools: bool = True, calculator: Callable[[str], str | None] | None = None):
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

    def decode_step(self, rows: Sequence[RowState], logits: torch.Tensor) -> list[Step | None]:
        """One decoding step for rows [B] given this forward's logits [B, V]: sample each row by
        its own settings, take a forced token first, update tool calls and `done`. A done row
        gives `<|assistant_end|>` again. A row whose logits are no distribution gets `error`,
        turns done and gives None; the other rows are unaffected."""
        live = [i for i, r in enumerate(rows) if not r.done]
        if not live:
            sampled = []
        else:  # (no copy of the logits while every row runs)
            sampled = sample_rows(logits if len(live) == len(rows) else logits[live], [rows[i].sampling for i in live])
        out: list[Step | None] = [Step(self.assistant_end, False) for _ in rows]
        want = []  # rows that report log-probabilities
        for i, t in zip(live, sampled):
            row = rows[i]
            if t is None and not row.forced:
                row.done, row.error, out[i] = True, "the model's next-token probabilities are not finite", None
                continue
            out[i] = Step(*self.next_token(row, -1 if t is None else t))
            if row.sampling.logprobs is not None:
                want.append(i)
        if want:
            reports = token_logprobs(
                logits[want], [out[i].token for i in want], max(rows[i].sampling.logprobs for i in want)
            )
            for i, (lp, top) in zip(want, reports):
                out[i].logprobs = (lp, top[: rows[i].sampling.logprobs])
        return out

    def generate(
        self,
        tokens: Sequence[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[bool]]]:
        """Yields, per step, (token per row, forced per row). A row's stop token is yielded
        once; afterwards its entries repeat `<|assistant_end|>` (ignore them). Ends when every
        row has stopped or after `max_tokens` steps (default: the rest of the model's context).
        `num_samples` is at most MAX_ROWS, `max_tokens` at most MAX_NEW_TOKENS: arguments out of
        range raise here, at the call (OutOfRangeError, a ValueError), before any work."""
        prompt = [int(t) for t in tokens]
        if not prompt:
            raise RustchatError("generate needs a non-empty prompt")
        check_count("num_samples", num_samples, 1, MAX_ROWS)
        _check_max_tokens(max_tokens)
        check_sampling(temperature, top_k)
        return self._generate(prompt, num_samples, max_tokens, temperature, top_k, seed)

    @torch.inference_mode()
    def _generate(self, prompt: list[int], num_samples: int, max_tokens, temperature: float, top_k, seed: int):
        max_tokens = self.reply_limit(len(prompt), max_tokens)
        if max_tokens < 1:
            return
        device = self._device()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        max_len = len(prompt) + max_tokens
        # prefill once with batch 1, then copy the cache into every sample row
        cache1 = self._new_cache(1, max_len)
        logits = self.forward([prompt], cache1)
        if num_samples == 1:
            cache = cache1
        else:
            cache = self._new_cache(num_samples, max_len)
            cache.prefill(cache1)
            del cache1
            logits = logits.expand(num_samples, -1)
        yield from self._decode(logits, cache, num_samples, max_tokens, Sampling(temperature, top_k, generator=gen))

    def generate_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[bool]]]:
        """As `generate`, with one row per prompt. The prompts must have one length: the rows
        share the cache's position, so they are prefilled together without padding."""
        rows = [[int(t) for t in p] for p in prompts]
        if not rows or not rows[0]:
            raise RustchatError("generate_prompts needs non-empty prompts")
        if len({len(r) for r in rows}) != 1:
            raise RustchatError("generate_prompts needs prompts of one length")
        check_count("len(prompts)", len(rows), 1, MAX_ROWS)
        _check_max_tokens(max_tokens)
        check_sampling(temperature, top_k)
        return self._generate_prompts(rows, max_tokens, temperature, top_k, seed)

    @torch.inference_mode()
    def _generate_prompts(self, rows: list[list[int]], max_tokens, temperature: float, top_k, seed: int):
        max_tokens = self.reply_limit(len(rows[0]), max_tokens)
        if max_tokens < 1:
            return
        device = self._device()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        cache = self._new_cache(len(rows), len(rows[0]) + max_tokens)
        logits = self.forward(rows, cache)
        yield from self._decode(logits, cache, len(rows), max_tokens, Sampling(temperature, top_k, generator=gen))

    def _decode(self, logits, cache, num_rows: int, max_tokens: int, sampling: Sampling):
        """The decoding loop after the prefill: `decode_step` per forward, every row sharing
        one Sampling (and so one generator: the rows draw together)."""
        rows = [RowState(sampling) for _ in range(num_rows)]
        for step in range(max_tokens):
            steps = self.decode_step(rows, logits)
            failed = next((r.error for r in rows if r.error), None)
            if failed:
                raise RustchatError(f"generation failed: {failed}")
            column, forced = [s.token for s in steps], [s.forced for s in steps]
            yield column, forced
            if all(r.done for r in rows) or step == max_tokens - 1:
                return
            logits = self.forward([[t] for t in column], cache)

    def reply_limit(self, prompt_len: int, max_tokens: int | None) -> int:
        """New tokens a reply may have: `max_tokens` (all when None), capped by what the model's
        context leaves after the prompt (it was trained on sequence_len tokens), and at least one
        token even when the prompt fills the context."""
        room = max(self.model.config.sequence_len - prompt_len, 1)
        return room if max_tokens is None else min(max_tokens, room)

    def forward(self, ids, cache, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] at the last position of one forward over `ids` (rows of token ids, a
        list or tensor) with `cache`: a KVCache, or the scheduler's SlotKVCache with each row's
        rotary position in `position_ids`."""
        # autocast per call, not around the generator: its state is thread-local and the
        # consumer (e.g. the web server) may resume us on another thread
        device = self._device()
        x = torch.as_tensor(ids, dtype=torch.long, device=device)
        kw = {} if position_ids is None else {"position_ids": position_ids}
        with autocast_ctx(device):
            return self.model(x, kv_cache=cache, **kw)[:, -1, :]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[KVCache, torch.Tensor]:
        """One forward over several prompts, right-padded to the longest: (a cache whose row b
        holds prompt b's keys at positions 0..len_b-1 and its smear state; logits [B, V] after
        each prompt's last token). Attention is causal, so the padding after a prompt never
        reaches its positions: each row is what a prefill of that prompt alone gives, up to the
        rounding of larger matmuls."""
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) < 1:
            raise RustchatError("prefill needs non-empty prompts")
        width = max(lengths)
        device = self._device()
        # the padding repeats each prompt's last token: the smear state the model keeps (the
        # last position's embedding) is then that row's own
        ids = torch.tensor([[int(t) for t in p] + [int(p[-1])] * (width - len(p)) for p in prompts], device=device)
        cache = self._new_cache(len(prompts), width)
        with autocast_ctx(device):
            logits = self.model(ids, kv_cache=cache)
        last = torch.tensor(lengths, device=device) - 1
        return cache, logits[torch.arange(len(prompts), device=device), last]

    def generate_batch(
        self,
        tokens: Sequence[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
        *,
        return_forced: bool = False,
    ):
        """Completions (generated ids, without the prompt and the stop token), one list per
        sample; with `return_forced`, also per-token forced flags: (completions, forced)."""
        stream = self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed)
        return self._collect(stream, num_samples, return_forced)

    def complete_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> list[list[int]]:
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


def stream_reply(
    engine: Engine,
    prompt: Sequence[int],
    *,
    max_tokens: int | None = None,
    temperature: float = 0.6,
    top_k: int | None = 50,
    seed: int = 42,
    parser: CompletionParser | None = None,
) -> Iterator[tuple[str, str]]:
    """One sampled reply as display events (see ReplyEvents). Pass `parser` to read the reply's
    parts (for history) afterwards."""
    events = ReplyEvents(engine.tok, parser)
    for column, _forced in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed):
        yield from events.feed(column[0])
        if events.finished:
            break
    yield from events.finish(cut=not events.finished)
