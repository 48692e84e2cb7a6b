"""The bridge between the scheduler thread and the server's event loop: a request's tokens,
generated on the scheduler thread (rustchat.batching), arrive in the loop as text pieces.

`Mailbox` hands events over in one loop wake-up per batch step; `Reply` is one request as the
loop sees it: it queues the generation, turns tokens into display text (rustchat.replies),
cuts stop strings, keeps the log-probabilities the request asked for, and cancels the
generation when its reader leaves.
"""

from __future__ import annotations

import asyncio
import threading

from .batching import BatchScheduler, GenRequest
from .common import RustchatError
from .replies import ReplyEvents, StopText


class Mailbox:
    """Hands the scheduler thread's events to the event loop in one wake-up per batch step
    rather than one per token: with 200 streams, a call_soon_threadsafe per token would keep
    the loop busy waking up instead of answering."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list = []

    def post(self, q: asyncio.Queue, event) -> bool:
        """False when the loop has closed (nobody will read the event)."""
        if self.loop.is_closed():
            return False
        with self.lock:
            self.pending.append((q, event))
            if len(self.pending) > 1:
                return True  # a delivery is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for q, event in items:
            q.put_nowait(event)


def logprob_entry(tok, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """One token's entry in OpenAI's `logprobs.content`: its text, log-probability and bytes,
    and the top alternatives in the same shape."""

    def one(t: int, lp: float) -> dict:
        raw = tok.decode_bytes([t])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


class Reply:
    """One request's generation as seen from the event loop: `pieces()` yields ("text", s) and
    ("tool", s) until the reply ends; then `finish_reason` ("stop"/"length") and
    `completion_tokens` are set. With `req["logprobs"]` set, `logprobs` collects one OpenAI
    entry per generated token (the stop token excepted) as tokens arrive. Leaving `pieces()`
    early cancels the generation, which frees its batch slot at the next step."""

    def __init__(self, scheduler: BatchScheduler, mailbox: Mailbox, tok, prompt: list[int], req: dict, max_tokens: int):
        self.events: asyncio.Queue = asyncio.Queue()
        self.mailbox = mailbox
        self.gen = GenRequest(
            prompt,
            self._post,
            max_tokens=max_tokens,
            temperature=req["temperature"],
            top_k=req["top_k"],
            top_p=req["top_p"],
            seed=req["seed"],
            logprobs=req.get("logprobs"),
        )
        self.tok, self.stops = tok, StopText(req["stop"])
        self.prompt_tokens = len(prompt)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []
        scheduler.submit(self.gen)

    def _post(self, event) -> None:  # on the scheduler thread
        if not self.mailbox.post(self.events, event):
            self.gen.cancelled = True  # the loop that would read it is gone

    async def pieces(self):
        display = ReplyEvents(self.tok)
        try:
            while self.finish_reason is None:
                ev = await self.events.get()
                if ev[0] == "error":
                    raise RustchatError(ev[1])
                if ev[0] == "end":
                    out = display.finish(cut=ev[1] == "length")
                    self.finish_reason = "length" if ev[1] == "length" else "stop"
                else:
                    out = display.feed(ev[1])
                    if not display.finished:  # the stop token is not counted
                        self.completion_tokens += 1
                        if ev[3] is not None:
                            self.logprobs.append(logprob_entry(self.tok, ev[1], *ev[3]))
                for kind, s in out:
                    s, hit = self.stops.feed(s)
                    if s:
                        yield kind, s
                    if hit:
                        self.finish_reason = "stop"
                        break
            rest = self.stops.flush()
            if rest:
                yield "text", rest
        finally:
            self.gen.cancelled = True  # no-op once ended; otherwise the slot frees at the next step
