"""Continuous batching for the server (docs/design.md, "Serving").

One scheduler thread owns the model. Requests wait in a queue; whenever a slot of the shared
KV cache is free, the next requests are prefilled (a few short prompts share one forward,
right-padded: `Engine.prefill`) and their cache rows copied into the slots. Every step then feeds the last
token of every running request in one forward: rows hold prompts of different lengths, so the
`SlotKVCache` keeps a length per row, writes each new key at its row's own position and masks
each row's attention to its own keys. A request that ends (stop token, token limit) or is
cancelled by its consumer (client gone, stop string seen) leaves the batch at the next step; the
last running row moves into its slot so the running rows stay 0..n-1.

Each request keeps its own sampling settings; a seeded one its own generator. Each step is
`Engine.decode_step`, the engine's own (sampling, forced calculator tokens, stop tokens): a
greedy or seeded request gives the same tokens alone or batched (up to float rounding of
batched matmuls), and the same as `Engine.generate`. A row whose sampling fails ends with an
error alone; the others go on. Between two decode steps at most PREFILL_TOKENS prompt tokens
are prefilled.

The server runs the scheduler on its own thread. Batch work that waits for every reply anyway
(evaluation, RL rollouts) runs it on the calling thread instead (`background=False`, then
`drain` or `run_once`): with torch's CPU threads, a second thread that runs operators gets its
own OpenMP pool, and once the pools' threads outnumber the cores, OpenMP stops spinning
between parallel regions and wakes its threads through the kernel for every operator. On a
2-core machine that made each small operator 2-3x slower, in both threads (docs/benchmarks.md,
"Decoding on the calling thread").
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence

import torch

from .common import MAX_NEW_TOKENS, MAX_QUEUE, MAX_ROWS, MAX_TOP_K, RustchatError, check_count
from .engine import Engine, RowState
from .model import KVCache
from .sampling import Sampling


PREFILL_TOKENS = 512


def prefill_groups(reqs: list[GenRequest]) -> list[list[GenRequest]]:
    """The admitted requests in prefill forwards: by prompt length, as many together as fit
    PREFILL_TOKENS once padded to the group's longest (a longer prompt goes alone). One forward
    of a few short prompts costs about what one of them costs alone on a CPU."""
    groups: list[list[GenRequest]] = []
    for req in sorted(reqs, key=lambda r: len(r.prompt)):
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * len(req.prompt) <= PREFILL_TOKENS:
            g.append(req)
        else:
            groups.append([req])
    return groups


class SlotKVCache:
    """Keys/values [L, S, H_kv, T_max, D] for S slots of which rows 0..n-1 run, each with its
    own length. Duck-types `KVCache` for the model: `pos` (the longest running row: the rotary
    tables must reach it), `insert`, `advance`, `layer_mask` and `prev_embedding` (the smear
    state, one per slot).

    A sliding-window layer (`windows[layer]` = w, w + 1 < T_max) keeps each row's last w + 1
    keys in a ring, position p at index p % (w + 1): a decoding step then reads w + 1 keys per
    row in that layer instead of the longest row's length (decoding is bound by reading the
    cache; the order of the keys does not change attention). Other layers keep every position,
    and the model cuts nothing from them: `layer_mask` says which keys each row sees."""

    def __init__(self, storage: KVCache, windows: Sequence[int | None] | None = None):
        self.k, self.v = storage.k, storage.v  # a KVCache's tensors: one row per slot
        self.slots, self.max_len = storage.batch_size, storage.max_len
        layers = self.k.size(0)
        windows = list(windows) if windows is not None else [None] * layers
        if len(windows) != layers:
            raise RustchatError(f"SlotKVCache: {len(windows)} windows for {layers} layers")
        # ring length per layer, None where every position is kept
        self.rings = [w + 1 if w is not None and w + 1 < self.max_len else None for w in windows]
        self.lengths = [0] * self.slots
        self.n = 0  # running rows: 0..n-1
        self.attn_mask = None  # this forward's mask over positions 0..Tk-1 [n, 1, 1, Tk]
        self._pos_t = None  # this forward's write positions [n] (a tensor on the cache's device)
        self._prev = None  # the smear state per slot [S, 1, C] (models with the smear gate)

    @classmethod
    def for_model(cls, model, slots: int) -> "SlotKVCache":
        # the engine's dtype rule; the model's windows decide which layers keep a ring
        return cls(KVCache.for_model(model, slots), model.config.window_sizes())

    @property
    def pos(self) -> int:
        return max(self.lengths[: self.n], default=0)

    def add(self, cache: KVCache, row: int = 0, length: int | None = None) -> int:
        """Copy row `row` of a prefilled cache (its first `length` positions, default all the
        cache holds) into the next free slot; returns the slot."""
        if self.n >= self.slots:
            raise RustchatError("SlotKVCache: every slot is in use")
        t = cache.pos if length is None else length
        if t > self.max_len:
            raise RustchatError(f"SlotKVCache: {t} cached tokens exceed capacity {self.max_len}")
        i = self.n
        self.k[:, i, :, :t] = cache.k[:, row, :, :t]
        self.v[:, i, :, :t] = cache.v[:, row, :, :t]
        for layer, ring in enumerate(self.rings):  # a ring layer keeps the last `ring` positions
            if ring is not None and t > ring:
                where = torch.arange(t - ring, t, device=self.k.device)
                self.k[layer, i, :, where % ring] = cache.k[layer, row, :, where]
                self.v[layer, i, :, where % ring] = cache.v[layer, row, :, where]
        self.lengths[i] = t
        if cache.prev_embedding is not None:
            if self._prev is None:
                p = cache.prev_embedding
                self._prev = torch.zeros((self.slots,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
            self._prev[i] = cache.prev_embedding[row]
        self.n += 1
        return i

    @property
    def prev_embedding(self):
        """The running rows' smear state [n, 1, C] (the model reads it, then stores the new one)."""
        return None if self._prev is None else self._prev[: self.n]

    @prev_embedding.setter
    def prev_embedding(self, value) -> None:
        if self._prev is not None:
            self._prev[: self.n] = value

    def remove(self, i: int) -> int | None:
        """Free slot i; the last running row moves into it. Returns the moved row's old slot."""
        last = self.n - 1
        self.n -= 1
        if i == last:
            return None
        t = self.lengths[last]
        self.k[:, i, :, :t] = self.k[:, last, :, :t]
        self.v[:, i, :, :t] = self.v[:, last, :, :t]
        self.lengths[i] = t
        if self._prev is not None:
            self._prev[i] = self._prev[last]
        return last

    def position_ids(self) -> torch.Tensor:
        """Rotary positions of one new token per running row, [n, 1]; also readies this forward's
        attention mask (row b sees its own keys 0..lengths[b])."""
        if any(n + 1 > self.max_len for n in self.lengths[: self.n]):
            raise RustchatError(f"KV cache is full: a row would exceed capacity {self.max_len}")
        pos = torch.tensor(self.lengths[: self.n], dtype=torch.long, device=self.k.device)
        keys = torch.arange(self.pos + 1, device=self.k.device)
        self.attn_mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, Tk]
        self._pos_t = pos
        return pos[:, None]

    def _keys(self, layer: int) -> int:
        """How many key columns this forward reads in `layer`: positions 0..Tk-1, or a ring's
        indices (fewer while every row is shorter than the ring)."""
        ring, tk = self.rings[layer], self.attn_mask.size(-1)
        return tk if ring is None else min(ring, tk)

    def layer_mask(self, layer: int, window: int | None) -> tuple[torch.Tensor, int | None]:
        """(mask [n, 1, 1, keys], window still to cut by position) for the keys `insert`
        returned for `layer`. A ring holds only in-window keys: ring index j holds a key of row
        b once j <= its position (before the ring wraps), every index after, which is the
        position mask's first columns."""
        if self.rings[layer] is None:
            return self.attn_mask, window
        return self.attn_mask[..., : self._keys(layer)], None

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store one step's k, v ([n, H_kv, 1, D]) at each row's own position."""
        if k.size(0) != self.n or k.size(2) != 1 or self._pos_t is None:
            raise RustchatError("SlotKVCache takes one token per running row, after position_ids()")
        rows = torch.arange(self.n, device=k.device)
        ring = self.rings[layer]
        at = self._pos_t if ring is None else self._pos_t % ring
        self.k[layer, rows, :, at] = k[:, :, 0]
        self.v[layer, rows, :, at] = v[:, :, 0]
        tk = self._keys(layer)
        return self.k[layer, : self.n, :, :tk], self.v[layer, : self.n, :, :tk]

    def advance(self, n: int) -> None:
        for b in range(self.n):
            self.lengths[b] += n
        self.attn_mask = self._pos_t = None


class GenRequest:
    """One reply to generate. `emit(event)` is called on the scheduler thread with
    ("token", id, forced, logprobs) per generated token (logprobs: None, or with `logprobs=k`
    the token's log-probability and its k top alternatives, see `Engine.decode_step`), then one
    ("end", reason) with reason "stop" (a stop token, which was emitted), "length" (max_tokens
    reached), "cancelled", or ("error", message). Set `cancelled` (from any thread) to stop it:
    it leaves at the next step. With a seed, it samples from its own generator (the tokens
    `Engine.generate` gives for that seed); with seed None, from the scheduler's, in one draw
    with the other unseeded rows. Bad settings raise RustchatError here, before it is queued."""

    def __init__(
        self,
        prompt: Sequence[int],
        emit: Callable[[tuple], None],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = 42,
        logprobs: int | None = None,
    ):
        self.prompt = [int(t) for t in prompt]
        if not self.prompt:
            raise RustchatError("a request needs a non-empty prompt")
        max_tokens = check_count("max_tokens", max_tokens, 1, MAX_NEW_TOKENS)
        if logprobs is not None:
            check_count("logprobs", logprobs, 0, MAX_TOP_K)
        self.emit, self.max_tokens, self.seed = emit, max_tokens, seed
        self.cancelled = False
        self.row = RowState(Sampling(temperature, top_k, top_p, logprobs=logprobs))
        self.generated = 0
        self.last = -1  # the token to feed next step


def _emit(req: GenRequest, event: tuple) -> None:
    """Hand an event to the request's consumer; a consumer that fails (its event loop is gone)
    cancels its own request instead of failing the batch."""
    try:
        req.emit(event)
    except Exception:
        traceback.print_exc()
        req.cancelled = True


class BatchScheduler:
    """Runs every request over one SlotKVCache of `max_batch` rows (at most MAX_ROWS); up to
    `max_queue` more wait (at most MAX_QUEUE). `submit` never blocks. On its own thread by
    default (`close` ends it); with `background=False` on its owner's, in `drain` or
    `run_once`. Counts out of range are an OutOfRangeError (a ValueError)."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, max_queue: int = 1024, background: bool = True):
        max_batch = check_count("max_batch", max_batch, 1, MAX_ROWS)
        max_queue = check_count("max_queue", max_queue, 0, MAX_QUEUE)
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.context = int(engine.model.config.sequence_len)
        self.cache: SlotKVCache | None = None  # allocated by the thread at its first request
        self.running: list[GenRequest] = []  # running[i] holds cache slot i
        self.queue: deque[GenRequest] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0  # batched decode forwards so far (tests read it)
        self.generator: torch.Generator | None = None  # shared by unseeded requests
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._loop, name="rustchat-batcher", daemon=True)
            self.thread.start()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "queued": len(self.queue), "max_batch": self.max_batch}

    def submit(self, req: GenRequest) -> None:
        """Queue a request; RustchatError when the queue is full or it cannot fit the context."""
        if len(req.prompt) + req.max_tokens > self.context:
            raise RustchatError(
                f"prompt {len(req.prompt)} + max_tokens {req.max_tokens} tokens exceed the context of {self.context}"
            )
        with self.cond:
            if self.closed:
                raise RustchatError("the scheduler is closed")
            if len(self.queue) >= self.max_queue:
                raise RustchatError(f"the server is busy: {len(self.queue)} requests are waiting")
            self.queue.append(req)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for req in [*self.running, *self.queue]:
            _emit(req, ("end", "cancelled"))
        self.running, self.queue = [], deque()

    # -- the scheduler's rounds ------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.queue and not self.running:
                    self.cond.wait()
                if self.closed:
                    return
            self.run_once()

    def run_once(self) -> bool:
        """One round on the calling thread: admit what fits, then one decoding step for every
        running row. Returns whether requests are still queued or running. The scheduler's own
        thread calls it; with `background=False` its owner does (`drain`)."""
        with self.cond:
            # prefill at most PREFILL_TOKENS prompt tokens (at least one request) between two
            # decode steps, so running replies keep streaming while a crowd arrives
            admitted, budget = [], PREFILL_TOKENS
            while (
                self.queue
                and len(self.running) + len(admitted) < self.max_batch
                and (not admitted or len(self.queue[0].prompt) <= budget)
            ):
                budget -= len(self.queue[0].prompt)
                admitted.append(self.queue.popleft())
        try:
            with torch.inference_mode():
                self._admit(admitted)
                self._finish_rows()
                if self.running:
                    self._step()
                    self._finish_rows()
        except Exception as e:  # a failing forward must not kill the server: fail its requests
            traceback.print_exc()
            with self.cond:
                failed, self.running = self.running, []
            if self.cache is not None:
                self.cache.n = 0
            for req in failed + [r for r in admitted if r not in failed and r.generated == 0]:
                _emit(req, ("error", f"generation failed: {type(e).__name__}: {e}"))
        with self.cond:
            return bool(self.queue or self.running)

    def drain(self) -> None:
        """Rounds on the calling thread until nothing is queued or running: every request
        submitted so far has ended (a scheduler made with `background=False`)."""
        if self.thread is not None:
            raise RustchatError("drain() runs a scheduler without its own thread (background=False)")
        while self.run_once():
            pass

    def _admit(self, reqs: list[GenRequest]) -> None:
        """Prefill the admitted requests, a few prompts per forward, and move their rows into
        the shared cache; each takes its first token at once."""
        model = self.engine.model
        if self.cache is None:
            self.cache = SlotKVCache.for_model(model, self.max_batch)
        device = model.get_device()
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.seed()  # unseeded requests: fresh randomness per server run
        ready = []
        for req in reqs:
            if req.cancelled:
                _emit(req, ("end", "cancelled"))
                continue
            if req.seed is not None:
                req.row.sampling.generator = torch.Generator(device=device)
                req.row.sampling.generator.manual_seed(req.seed)
            else:  # drawn together with the other unseeded rows
                req.row.sampling.generator = self.generator
            ready.append(req)
        for group in prefill_groups(ready):
            cache, logits = self.engine.prefill([r.prompt for r in group])
            for b, req in enumerate(group):
                self.cache.add(cache, b, len(req.prompt))
                with self.cond:
                    self.running.append(req)
            for req, step in zip(group, self.engine.decode_step([r.row for r in group], logits)):
                self._take(req, step)

    def _take(self, req: GenRequest, step) -> None:
        if step is None:  # its sampling failed: it leaves with its error at _finish_rows
            return
        req.generated += 1
        req.last = step.token
        _emit(req, ("token", step.token, step.forced, step.logprobs))

    def _step(self) -> None:
        cache = self.cache
        logits = self.engine.forward([[r.last] for r in self.running], cache, cache.position_ids())
        self.steps += 1
        for req, step in zip(self.running, self.engine.decode_step([r.row for r in self.running], logits)):
            self._take(req, step)

    def _finish_rows(self) -> None:
        """Rows that stopped, reached their limit or were cancelled leave the batch now."""
        i = 0
        while i < len(self.running):
            req = self.running[i]
            reason = (
                "error"
                if req.row.error
                else "stop"
                if req.row.done
                else "length"
                if req.generated >= req.max_tokens
                else "cancelled"
                if req.cancelled
                else None
            )
            if reason is None:
                i += 1
                continue
            moved = self.cache.remove(i)
            with self.cond:
                if moved is not None:
                    self.running[i] = self.running.pop()
                else:
                    self.running.pop(i)
            _emit(req, ("error", f"generation failed: {req.row.error}") if reason == "error" else ("end", reason))
