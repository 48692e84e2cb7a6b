"""Picking the next token from logits, for one row or a batch of rows with their own settings.

Temperature, top-k and top-p (nucleus) sampling, greedy argmax, and the log-probabilities the
OpenAI API reports. Rows are independent: a batch gives each row what it would get alone.
No setting the API accepts can make a distribution of inf/NaN: a temperature below
MIN_TEMPERATURE is greedy (dividing logits by a tiny temperature overflows float32), and top-p
always keeps the most likely token (a top_p that rounds to 0 in float32 would drop them all).
A row whose logits are still not a distribution (a model that returned NaN) fails alone:
`sample_rows` gives None for it and the other rows their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .common import MAX_TOP_K, OutOfRangeError, check_count

# Below this a temperature means greedy: logits are softcapped to |15|, so 15 / 1e-3 leaves
# the nearest rival e^-(gap * 1000) of the top token's odds, argmax to float precision unless
# two logits nearly tie, and far from float32 overflow (which is what 1e-300 hit).
MIN_TEMPERATURE = 1e-3


def check_sampling(temperature: float, top_k: int | None, top_p: float | None = None) -> None:
    """OutOfRangeError (a RustchatError and a ValueError) for settings no sampler takes (NaN included)."""
    if not temperature >= 0:
        raise OutOfRangeError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        check_count("top_k", top_k, 1, MAX_TOP_K)
    if top_p is not None and not 0 < top_p <= 1:
        raise OutOfRangeError(f"top_p must be in (0, 1] or None, got {top_p}")


def is_greedy(temperature: float, top_k: int | None) -> bool:
    return temperature < MIN_TEMPERATURE or top_k == 1


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a row draws from when not greedy: (probs [B, K], ids [B, K]) over the top tokens,
    or (probs [B, V], None) over the whole vocabulary."""
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_p is not None and top_p < 1.0:
        k = top_k if top_k is not None and top_k < logits.size(-1) else logits.size(-1)
        vals, idx = torch.topk(logits, k, dim=-1)  # sorted, largest first
        probs = torch.softmax(vals, dim=-1)
        # drop a token once the tokens before it already reach top_p; the first always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        return probs.masked_fill(drop, 0.0), idx
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals, dim=-1), idx
    return torch.softmax(logits, dim=-1), None


def draw(probs: torch.Tensor, ids: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `sampling_probs`' output -> int64 [B]."""
    choice = torch.multinomial(probs, 1, generator=generator)
    return (ids.gather(-1, choice) if ids is not None else choice).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next token per row from logits [B, V] -> int64 [B], every row with the same settings.
    Greedy below MIN_TEMPERATURE (and at top_k 1). `top_p` < 1 keeps the smallest set of top
    tokens whose probability reaches top_p (after top_k)."""
    check_sampling(temperature, top_k, top_p)
    if is_greedy(temperature, top_k):
        return logits.argmax(dim=-1)
    return draw(*sampling_probs(logits, temperature, top_k, top_p), generator)


@dataclass(eq=False)
class Sampling:
    """One row's settings. Rows holding the same `generator` object draw together in one call
    (as `sample_next` does for a batch); a row with its own generator draws alone, so its
    tokens do not depend on its neighbours. `logprobs`: None, or how many top alternatives to
    report with each token's log-probability (0: the chosen token's only)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    logprobs: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature, self.top_k)


def _valid(probs: torch.Tensor) -> torch.Tensor:
    """Rows that are a distribution multinomial can draw from -> bool [B]."""
    return torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)


def sample_rows(logits: torch.Tensor, rows: Sequence[Sampling]) -> list[int | None]:
    """One token per row of logits [B, V], each row by its own settings; None for a row whose
    logits give no distribution (it fails alone). Greedy rows share one argmax and rows of
    equal settings one softmax."""
    out: list[int | None] = [None] * len(rows)
    greedy, groups = [], {}
    for i, s in enumerate(rows):
        if s.greedy:
            greedy.append(i)
        else:
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
    if greedy:
        sub = logits[greedy]
        ok = (~torch.isnan(sub).any(dim=-1)).tolist()
        for i, t, good in zip(greedy, sub.argmax(dim=-1).tolist(), ok):
            out[i] = t if good else None
    for (temperature, top_k, top_p), idx in groups.items():
        probs, ids = sampling_probs(logits[idx], temperature, top_k, top_p)
        ok = _valid(probs).tolist()
        by_gen: dict[int, list[int]] = {}  # rows of one generator draw in one call
        for j, i in enumerate(idx):
            if ok[j]:
                by_gen.setdefault(id(rows[i].generator), []).append(j)
        if not by_gen:
            continue
        # torch.multinomial's own draw of one sample, as `draw` makes it: the argmax of probs / q,
        # q ~ Exp(1) from the generator, one call per generator over its rows. Written out, the
        # division and argmax serve every row at once, and the rows skip multinomial's checks of
        # the distribution (three reductions read back per call; `_valid` checked them): a
        # decoding step of 32 seeded rows made 32 multinomial calls of about 20 us each.
        q = torch.ones_like(probs)
        for js in by_gen.values():
            gen = rows[idx[js[0]]].generator
            if len(js) == 1:
                q[js[0]].exponential_(generator=gen)
            else:
                q[js] = torch.empty((len(js), probs.size(-1)), dtype=probs.dtype, device=probs.device).exponential_(
                    generator=gen
                )
        choice = (probs / q).argmax(dim=-1, keepdim=True)
        picked = (ids.gather(-1, choice) if ids is not None else choice).squeeze(-1).tolist()
        for js in by_gen.values():
            for j in js:
                out[idx[j]] = picked[j]
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of logits [B, V]: the log-probability of `tokens[b]` under the model's own
    distribution (log-softmax of the logits, before temperature, top-k or top-p) and the `top`
    most likely tokens with theirs, most likely first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.size(-1)), dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        alts = [[] for _ in tokens]
    return [(c, a) for c, a in zip(chosen, alts)]
