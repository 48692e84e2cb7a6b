"""Scoring without a model: ChatCORE, the categorical (letter) pick, GSM8K-style answer checks."""

from __future__ import annotations

import numpy as np

from .common import RustchatError
from .tasks.base import answers_match, extract_answer

# Chance accuracy per task (docs/design.md, "Chat evaluation"): 4-choice tasks 0.25, generative ones 0.
BASELINES = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}


def centered(acc: float, baseline: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1."""
    if not 0.0 <= baseline < 1.0:
        raise RustchatError(f"baseline must be in [0, 1), got {baseline}")
    return (acc - baseline) / (1.0 - baseline)


def chatcore(accuracies: dict[str, float], baselines: dict[str, float] | None = None) -> float:
    """Mean over the given tasks of (acc - baseline) / (1 - baseline)."""
    if not accuracies:
        raise RustchatError("ChatCORE needs at least one task result")
    base = {**BASELINES, **(baselines or {})}
    unknown = [t for t in accuracies if t not in base]
    if unknown:
        raise RustchatError(f"no ChatCORE baseline for {', '.join(unknown)}; known: {', '.join(base)}")
    return float(np.mean([centered(float(a), base[t]) for t, a in accuracies.items()]))


def categorical_pick(logits, letter_token_ids):
    """Index (into `letter_token_ids`) of the letter with the highest logit at the answer position.

    `logits`: (vocab,) or (batch, vocab), numpy or torch. Ties go to the earlier letter.
    Returns an int, or a list of ints for a batch."""
    ids = [int(i) for i in letter_token_ids]
    if not ids:
        raise RustchatError("categorical_pick needs at least one letter token id")
    if hasattr(logits, "detach"):  # torch tensor: select on device, then move the few numbers
        sel = logits[..., ids].detach().float().cpu().numpy()
    else:
        sel = np.asarray(logits)[..., ids]
    picks = np.argmax(sel, axis=-1)
    return int(picks) if sel.ndim == 1 else [int(p) for p in picks]


def gsm8k_correct(reference: str, completion: str) -> bool:
    """Whether the `#### n` answer of `completion` equals that of `reference` (commas stripped)."""
    return answers_match(extract_answer(reference), extract_answer(completion))


__all__ = ["BASELINES", "centered", "chatcore", "categorical_pick", "gsm8k_correct", "extract_answer"]
