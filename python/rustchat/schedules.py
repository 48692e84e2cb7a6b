"""Learning-rate multipliers (of each group's `initial_lr`), Muon's momentum and weight decay.

Steps count from 0; `num_steps` is the number of optimizer steps in the run.
"""

from __future__ import annotations

import math


def base_lr_multiplier(
    step: int,
    num_steps: int,
    *,
    warmup_ratio: float = 0.0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
    warmup_steps: int | None = None,
) -> float:
    """Base pretraining: optional linear warmup (`warmup_steps`, else `warmup_ratio` of the
    run), flat at 1, then linear warmdown over the last `warmdown_ratio` of the run to
    `final_lr_frac` (reached at step == num_steps)."""
    warmup = round(warmup_ratio * num_steps) if warmup_steps is None else warmup_steps
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown or warmdown == 0:
        return 1.0
    progress = (num_steps - step) / warmdown  # 1 -> 0 across the warmdown
    return progress + (1.0 - progress) * final_lr_frac


def mid_lr_multiplier(progress: float, *, warmdown_frac: float = 0.2) -> float:
    """Mid-training: flat, then linear decay to 0 over the last 20% of progress (0..1); the
    run is sized by its data, so the schedule is driven by the fraction consumed."""
    if progress < 1.0 - warmdown_frac:
        return 1.0
    return max(0.0, (1.0 - progress) / warmdown_frac)


def sft_lr_multiplier(step: int, num_steps: int, *, init_lr_frac: float = 0.02, warmdown_ratio: float = 1.0) -> float:
    """SFT: starts at init_lr_frac of the base lrs, flat, then linear decay to 0 at num_steps
    over the last `warmdown_ratio` of the run (from mid: 0.02 and all of it; from base, as
    nanochat's 2026 SFT at 92d63d4: 0.8 and the last half).

    Use either this init_lr_frac or build_optimizers(lr_scale=...), not both."""
    progress = step / num_steps
    if progress <= 1.0 - warmdown_ratio:
        return init_lr_frac
    return init_lr_frac * max(0.0, (1.0 - progress) / warmdown_ratio)


def muon_momentum(step: int, *, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Base pretraining: Muon momentum ramps linearly 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def muon_momentum_2026(step: int, num_steps: int, *, warmdown_ratio: float = 0.65) -> float:
    """The 2026 recipe: 0.85 -> 0.97 over the first 400 steps, 0.97 -> 0.90 across the lr warmdown."""
    warmdown = round(warmdown_ratio * num_steps)
    start = num_steps - warmdown
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= start and warmdown > 0:
        progress = (step - start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(step: int, num_steps: int, weight_decay: float) -> float:
    """The 2026 recipe: Muon's (cautious) weight decay falls to 0 along a half cosine."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_steps))


def apply_lr_multiplier(optimizers, multiplier: float) -> None:
    """group['lr'] = group['initial_lr'] * multiplier for every group of every optimizer."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def _muon_groups(optimizers):
    return [g for opt in optimizers for g in opt.param_groups if g.get("kind") == "muon"]


def set_muon_momentum(optimizers, momentum: float) -> None:
    """Set the momentum of every Muon group (AdamW groups untouched)."""
    for group in _muon_groups(optimizers):
        group["momentum"] = momentum


def set_muon_weight_decay(optimizers, weight_decay: float) -> None:
    """Set the weight decay of every 2026-recipe Muon group (classic Muon has none)."""
    for group in _muon_groups(optimizers):
        if group.get("recipe") == "2026":
            group["weight_decay"] = weight_decay
