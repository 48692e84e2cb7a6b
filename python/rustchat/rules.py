"""Training rules of base pretraining: from a model's size to its horizon, batch size, learning
rates, weight decay and schedule (docs/design.md, "Training rules").

Two rule sets:
- "2026" (nanochat's of July 2026, commit 92d63d4): the horizon is `ratio` (12) tokens per *scaling* parameter
  (block matrices + output head: the count that gives the cleanest scaling laws; embeddings and
  scalars are left out). Hyperparameters are tuned on a d12 reference model trained to its own
  horizon D_ref with B_ref = 2^19 tokens per step, and carried to other sizes: the batch size
  follows the Power Lines law B ∝ D^0.383 (rounded to a power of two), learning rates scale as
  √(B/B_ref) (the AdamW rule, assumed for Muon too), and weight decay as √(B/B_ref)·(D_ref/D),
  which keeps the AdamW "epoch time" B/(η·λ·D) of the reference. 40 warmup steps, a linear
  warmdown over the last 65% to 5% of the peak.
- "classic" (January 2026): 20 tokens per parameter (all of them), a fixed 524,288-token batch,
  unscaled learning rates, no weight decay, warmdown over the last 20% to 0.
The 2026 rules also pack pretraining rows BOS-aligned best-fit (`data.bestfit`); the classic
ones cut a plain stream of documents (`data.pretrain`).

Everything here is a pure function of parameter counts, so the rules can be checked by hand
without building a model (tests/test_rules.py holds such a table).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .common import RustchatError

RULES = ("2026", "classic")
REFERENCE_DEPTH = 12  # the 2026 hyperparameters were tuned at d12
B_REF = 2**19  # tokens per step at the reference (524,288)
BATCH_EXPONENT = 0.383  # B_opt ∝ D^0.383 (Power Lines, arXiv:2505.13738)


@dataclass(frozen=True)
class RuleDefaults:
    """A rule set's defaults: what a flag left unset means."""

    tokens_per_param: float
    total_batch_size: int | None  # None: derived from the horizon
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    packing: str  # pretraining rows: "bos_bestfit" (each row starts at a document) or "stream"


DEFAULTS = {
    "2026": RuleDefaults(
        tokens_per_param=12.0,
        total_batch_size=None,
        matrix_lr=0.02,
        embedding_lr=0.3,
        unembedding_lr=0.008,
        scalar_lr=0.5,
        weight_decay=0.28,
        warmup_steps=40,
        warmdown_ratio=0.65,
        final_lr_frac=0.05,
        packing="bos_bestfit",
    ),
    "classic": RuleDefaults(
        tokens_per_param=20.0,
        total_batch_size=524_288,
        matrix_lr=0.02,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        scalar_lr=0.5,
        weight_decay=0.0,
        warmup_steps=0,
        warmdown_ratio=0.2,
        final_lr_frac=0.0,
        packing="stream",
    ),
}


@dataclass(frozen=True)
class Plan:
    """Everything the rules derive for one base run (the banner prints all of it)."""

    rules: str
    params: int  # the count the horizon is measured in (2026: scaling params; classic: all)
    ref_params: int | None  # the same count of the d12 reference (2026 only)
    tokens_per_param: float
    target_tokens: int  # the horizon D
    ref_tokens: float | None  # D_ref (2026 only)
    total_batch_size: int
    batch_auto: bool  # derived from the horizon rather than given
    num_steps: int
    lr_scale: float  # applied to every learning rate below
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float  # the scaled peak (2026: decays to 0 along a cosine)
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    packing: str

    def describe(self) -> str:
        """One banner line with every derived value."""
        ref = (
            f", d{REFERENCE_DEPTH} reference {self.ref_params:,} params -> D_ref {self.ref_tokens:,.0f}"
            if self.ref_params is not None
            else ""
        )
        batch = "auto: B_ref*(D/D_ref)^0.383, power of 2" if self.batch_auto else "given"
        return (
            f"rules {self.rules}: horizon {self.tokens_per_param:g} x {self.params:,} params = "
            f"{self.target_tokens:,} tokens{ref} | batch {self.total_batch_size:,} tokens ({batch}) | "
            f"{self.num_steps:,} steps | lr scale {self.lr_scale:.4f}: matrix {self.matrix_lr:.6g}, "
            f"embedding {self.embedding_lr:.6g}, unembedding {self.unembedding_lr:.6g}, "
            f"scalar {self.scalar_lr:.6g} | weight decay {self.weight_decay:.6g} | warmup "
            f"{self.warmup_steps} steps, warmdown {self.warmdown_ratio:g} to {self.final_lr_frac:g} of peak | "
            f"rows: {self.packing}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def scaling_params(transformer_matrices: int, lm_head: int) -> int:
    """The parameters the 2026 horizon counts: every block parameter plus the (padded) head."""
    return transformer_matrices + lm_head


def auto_batch_size(target_tokens: float, ref_tokens: float, b_ref: int = B_REF) -> int:
    """B_ref * (D/D_ref)^0.383, rounded to the nearest power of two (in log2)."""
    if target_tokens <= 0 or ref_tokens <= 0:
        raise RustchatError(
            f"the horizon must be positive to derive a batch size, got {target_tokens} and {ref_tokens}"
        )
    predicted = b_ref * (target_tokens / ref_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(predicted))


def batch_lr_scale(total_batch_size: int, b_ref: int = B_REF) -> float:
    """Learning rates ∝ √(B/B_ref)."""
    return (total_batch_size / b_ref) ** 0.5


def scaled_weight_decay(
    weight_decay: float, total_batch_size: int, target_tokens: float, ref_tokens: float, b_ref: int = B_REF
) -> float:
    """λ = λ_ref · √(B/B_ref) · (D_ref/D): B/(η·λ·D) stays the reference's when η ∝ √B."""
    return weight_decay * math.sqrt(total_batch_size / b_ref) * (ref_tokens / target_tokens)


def plan_2026(
    params: int,
    ref_params: int,
    *,
    tokens_per_param: float | None = None,
    total_batch_size: int | None = None,
    num_steps: int | None = None,
    **overrides,
) -> Plan:
    """The 2026 rules for a model with `params` scaling parameters whose d12 sibling (same
    width rule, vocabulary and context) has `ref_params`. A given `total_batch_size` or
    `num_steps` replaces the derived one; the lr and weight-decay scaling still follow the batch
    and the ratio's horizon, as nanochat 92d63d4's do. `overrides`: fields of RuleDefaults."""
    d = _defaults("2026", overrides)
    ratio = d.tokens_per_param if tokens_per_param is None else tokens_per_param
    if ratio <= 0:
        raise RustchatError(f"--target-param-data-ratio must be > 0 under the 2026 rules, got {ratio}")
    target = int(ratio * params)
    ref_tokens = ratio * ref_params
    auto = total_batch_size is None
    B = auto_batch_size(target, ref_tokens) if auto else total_batch_size
    steps = num_steps if num_steps is not None else target // B
    if steps < 1:
        raise RustchatError(
            f"the horizon ({target:,} tokens) is less than one batch of {B:,} tokens: "
            "raise --target-param-data-ratio or lower --total-batch-size"
        )
    s = batch_lr_scale(B)
    return Plan(
        rules="2026",
        params=params,
        ref_params=ref_params,
        tokens_per_param=ratio,
        target_tokens=target,
        ref_tokens=ref_tokens,
        total_batch_size=B,
        batch_auto=auto,
        num_steps=steps,
        lr_scale=s,
        matrix_lr=d.matrix_lr * s,
        embedding_lr=d.embedding_lr * s,
        unembedding_lr=d.unembedding_lr * s,
        scalar_lr=d.scalar_lr * s,
        weight_decay=scaled_weight_decay(d.weight_decay, B, target, ref_tokens),
        warmup_steps=d.warmup_steps,
        warmdown_ratio=d.warmdown_ratio,
        final_lr_frac=d.final_lr_frac,
        packing=d.packing,
    )


def plan_classic(
    params: int,
    *,
    tokens_per_param: float | None = None,
    total_batch_size: int | None = None,
    num_steps: int | None = None,
    **overrides,
) -> Plan:
    """The classic rules: `tokens_per_param` (20) times ALL parameters, rounded up to whole
    steps of a fixed batch, learning rates as given."""
    d = _defaults("classic", overrides)
    ratio = d.tokens_per_param if tokens_per_param is None else tokens_per_param
    B = d.total_batch_size if total_batch_size is None else total_batch_size
    target = int(ratio * params)
    steps = num_steps if num_steps is not None else max(1, math.ceil(ratio * params / B))
    return Plan(
        rules="classic",
        params=params,
        ref_params=None,
        tokens_per_param=ratio,
        target_tokens=target,
        ref_tokens=None,
        total_batch_size=B,
        batch_auto=False,
        num_steps=steps,
        lr_scale=1.0,
        matrix_lr=d.matrix_lr,
        embedding_lr=d.embedding_lr,
        unembedding_lr=d.unembedding_lr,
        scalar_lr=d.scalar_lr,
        weight_decay=d.weight_decay,
        warmup_steps=d.warmup_steps,
        warmdown_ratio=d.warmdown_ratio,
        final_lr_frac=d.final_lr_frac,
        packing=d.packing,
    )


def _defaults(rules: str, overrides: dict) -> RuleDefaults:
    d = DEFAULTS[rules]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(asdict(d))
    if unknown:
        raise TypeError(f"unknown rule settings: {', '.join(sorted(unknown))}")
    return RuleDefaults(**{**asdict(d), **given})


__all__ = [
    "RULES",
    "DEFAULTS",
    "Plan",
    "RuleDefaults",
    "plan_2026",
    "plan_classic",
    "scaling_params",
    "auto_batch_size",
    "batch_lr_scale",
    "scaled_weight_decay",
    "B_REF",
    "REFERENCE_DEPTH",
]
