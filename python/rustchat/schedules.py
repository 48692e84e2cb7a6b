"""Learning-rate multipliers (of each group's `initial_lr`) and the Muon momentum warmup.

Steps count from 0; `num_steps` is the number of optimizer steps in the run.
"""
from __future__ import annotations

from .optim import Muon


def base_lr_multiplier(step: int, num_steps: int, *, warmup_ratio: float = 0.0,
                       warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0) -> float:
    """Base pretraining: optional linear warmup, flat at 1, then linear warmdown over the last
    `warmdown_ratio` of the run to `final_lr_frac` (reached at step == num_steps)."""
    warmup = round(warmup_ratio * num_steps)
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


def sft_lr_multiplier(step: int, num_steps: int, *, init_lr_frac: float = 0.02) -> float:
    """SFT: starts at init_lr_frac (0.02) of the base lrs, linear decay to 0 at num_steps.

    Use either this init_lr_frac or build_optimizers(lr_scale=...), not both."""
    return init_lr_frac * max(0.0, 1.0 - step / num_steps)


def muon_momentum(step: int, *, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Base pretraining: Muon momentum ramps linearly 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def apply_lr_multiplier(optimizers, multiplier: float) -> None:
    """group['lr'] = group['initial_lr'] * multiplier for every group of every optimizer."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def set_muon_momentum(optimizers, momentum: float) -> None:
    """Set the momentum of every Muon optimizer in the list (AdamW untouched)."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum
