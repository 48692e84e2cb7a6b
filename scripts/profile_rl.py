"""Profile RL steps of the tiny preset on the CPU: where a step's wall time goes.

    python scripts/profile_rl.py --base-dir /tmp/tiny       # a base dir after `rustchat speedrun --preset tiny`

Runs `rustchat rl` with the tiny preset's settings from the base dir's SFT checkpoint (into a
scratch copy of the base dir, so the real rl checkpoints are untouched) for a few steps under
torch.profiler, which records the operators of every thread (the rollouts decode on the
scheduler's thread). A step's time in torch operators (top-level ops, their children
included) is compute; the rest of the wall time is Python overhead: the scheduler's per-row
bookkeeping, rendering, reward checks, batching. Prints the Python share of the step time,
the rollout share and the sampled tokens per second.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rustchat.config import RLConfig
from rustchat.speedrun import PRESETS
from rustchat.stages import train_rl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-dir", type=Path, required=True, help="holds tokenizer/ and sft_checkpoints/")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiny = PRESETS["tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        shutil.copytree(args.base_dir / "tokenizer", base / "tokenizer")
        shutil.copytree(args.base_dir / "sft_checkpoints", base / "sft_checkpoints")
        cfg = RLConfig(**{**tiny["rl"], "max_steps": args.steps, "eval_every": 0}, depth=tiny["common"]["depth"],
                       device="cpu", quiet=True, base_dir=str(base))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.time()
            res = train_rl(cfg)
            wall = time.time() - t0
    steps = res["history"]
    # time inside torch operators: the top-level ones (no parent op), any thread; the whole run
    # is counted (loading and the checkpoint too), so the Python share is if anything overstated
    ops_s = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e6
    step_s = sum(h["rollout_s"] + h["train_s"] for h in steps)
    print(f"{len(steps)} steps: {step_s:.2f} s in the steps, {wall:.2f} s with loading and the checkpoint")
    print(f"torch operators: {ops_s:.2f} s; Python overhead: {max(wall - ops_s, 0):.2f} s = "
          f"{100 * max(wall - ops_s, 0) / wall:.0f}% of the run")
    share = sum(h["rollout_s"] for h in steps) / step_s
    tps = sum(h["sampled_tokens"] for h in steps) / sum(h["sample_s"] for h in steps)
    print(f"rollouts: {100 * share:.0f}% of the step time, {tps:,.0f} sampled tokens/s; "
          f"reward {', '.join(f'{h['reward']:.2f}' for h in steps)}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
