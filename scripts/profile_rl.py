"""Profile RL steps of the tiny preset on the CPU: where a step's time goes.

    python scripts/profile_rl.py --base-dir /tmp/tiny       # a base dir after `rustchat speedrun --preset tiny`

Runs `rustchat rl` with the tiny preset's settings from the base dir's SFT checkpoint (in a
scratch copy of the base dir, so its real rl checkpoints are untouched) for a few steps under
cProfile, in both threads that work: the main one during the steps (rendering, rewards, the
training forward and backward, the optimizer) and the scheduler's (the rollouts). Time inside torch's C
functions (operators, tensor methods, torch.tensor) is compute; time waiting on a lock is
idle; the rest is Python overhead: bytecode and the other builtins (lists, dicts, the
tokenizer's decode, ...). cProfile's own per-call cost, and tensor work reached through
Python operators (indexing, +, *), which cProfile books to the calling Python function, land
in the Python share, so the share is if anything overstated. Prints the Python share of the busy time, the rollout share
and the sampled tokens per second.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rustchat import batching, rl, stages
from rustchat.config import RLConfig
from rustchat.speedrun import PRESETS

PROFILES: list[cProfile.Profile] = []


def _profiled_loop(loop):
    def run(self):
        prof = cProfile.Profile()
        PROFILES.append(prof)
        prof.enable()
        try:
            loop(self)
        finally:
            prof.disable()

    return run


def _profiled(fn, prof: cProfile.Profile):
    """fn, profiled while it runs (the steps only: not loading, tasks or checkpoints)."""

    def run(*args, **kwargs):
        prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            prof.disable()

    return run


def _kind(func: tuple) -> str:
    """'torch', 'wait' or 'python' for a cProfile entry (filename, line, name)."""
    filename, _, name = func
    if filename != "~":
        return "python"
    if "acquire" in name and "lock" in name or "wait" in name:
        return "wait"
    if "torch" in name or "Tensor" in name or "PyCapsule" in name or name.startswith("<built-in method tensor"):
        return "torch"
    return "python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-dir", type=Path, required=True, help="holds tokenizer/ and sft_checkpoints/")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batching.BatchScheduler._loop = _profiled_loop(batching.BatchScheduler._loop)
    tiny = PRESETS["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        shutil.copytree(args.base_dir / "tokenizer", base / "tokenizer")
        shutil.copytree(args.base_dir / "sft_checkpoints", base / "sft_checkpoints")
        cfg = RLConfig(
            **{**tiny["rl"], "max_steps": args.steps, "eval_every": 0},
            depth=tiny["common"]["depth"],
            device="cpu",
            quiet=True,
            base_dir=str(base),
        )
        main_prof = cProfile.Profile()
        PROFILES.append(main_prof)
        rl.RolloutSteps.next_step = _profiled(rl.RolloutSteps.next_step, main_prof)
        stages.rl_train_step = _profiled(stages.rl_train_step, main_prof)
        t0 = time.time()
        res = stages.train_rl(cfg)
        wall = time.time() - t0
    totals = {"torch": 0.0, "wait": 0.0, "python": 0.0}
    for prof in PROFILES:
        for func, (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
            totals[_kind(func)] += tottime
    busy = totals["torch"] + totals["python"]
    steps = res["history"]
    step_s = sum(h["rollout_s"] + h["train_s"] for h in steps)
    print(f"{len(steps)} steps: {step_s:.2f} s in the steps, {wall:.2f} s with loading and the checkpoint")
    print(
        f"busy {busy:.2f} s: torch {totals['torch']:.2f} s, Python {totals['python']:.2f} s = "
        f"{100 * totals['python'] / busy:.0f}% (waiting on locks {totals['wait']:.2f} s, not counted)"
    )
    share = sum(h["rollout_s"] for h in steps) / step_s
    tps = sum(h["sampled_tokens"] for h in steps) / sum(h["sample_s"] for h in steps)
    print(
        f"rollouts: {100 * share:.0f}% of the step time, {tps:,.0f} sampled tokens/s (under the profiler); "
        f"reward {', '.join(format(h['reward'], '.2f') for h in steps)}"
    )
    for prof in PROFILES:
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
