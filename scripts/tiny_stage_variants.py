"""Rerun only the SFT or the RL stage of finished tiny speedruns, with a variant of the preset's
recipe for it, and print the stage against the one before it on each seed: for SFT the floors
and whether SFT beats mid beyond the seed spread, for RL what RL adds and what it costs.

    python scripts/speedrun_seeds.py --seeds 1 2 3 --root /tmp/seeds          # the runs, once
    python scripts/tiny_stage_variants.py --root /tmp/seeds --seeds 1 2 3 --out /tmp/v1 \\
        --variant identity=3,max_steps=300
    python scripts/tiny_stage_variants.py --stage rl --root /tmp/seeds --out /tmp/v2 --variant init_lr_frac=0.1

A recipe change to one stage needs no new earlier stages: mid-training is three quarters of a
run's time. Each seed's checkpoints (ROOT/seed-N) are linked read-only and only the stage and
its scoring run again (OUT/seed-N). With no variant the scores are the run's own row for that
stage, to the digit (runs are deterministic on one machine and torch), which checks the harness.

Variant parts, comma-separated:
  any setting of the preset's stage   KEY=VALUE, e.g. max_steps=300, init_lr_frac=0.05, temperature=1.0
  SFT only: identity=K                the identity slice listed K times in the SFT mixture (K >= 1)
  SFT only: TASK.size=N               that task's size in the SFT mixture, e.g. spellingbee.size=1500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun_seeds import read_run, rl_lines, sft_floor_lines, sft_vs_mid  # noqa: E402

from rustchat import speedrun, stages  # noqa: E402
from rustchat.config import SpeedrunConfig  # noqa: E402

# what each stage starts from, besides the tokenizer and the generated task data
INPUTS = {"sft": ("mid_checkpoints",), "rl": ("mid_checkpoints", "sft_checkpoints")}
BEFORE = {"sft": "mid", "rl": "sft"}


def apply_variant(variant: str, stage: str = "sft") -> str:
    """Change the tiny preset's mixture and settings for `stage` in place; returns the variant."""
    train = stages.MIXTURES["tiny"]["sft"]["train"]
    settings = speedrun.PRESETS["tiny"][stage]
    for part in filter(None, variant.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"variant part {part!r}: expected KEY=VALUE")
        try:
            if stage == "sft" and key == "identity":
                count = int(value)
                if count < 1:
                    raise ValueError
                # the copies stay where the first one is: the mixture's shuffle depends on the order
                at = [name for name, _ in train].index("identity")
                rest = [entry for entry in train if entry[0] != "identity"]
                train[:] = rest[:at] + [train[at]] * count + rest[at:]
            elif stage == "sft" and key.endswith(".size"):
                task = key[: -len(".size")]
                at = [name for name, _ in train].index(task)
                train[at] = (task, {**train[at][1], "size": int(value)})
            elif key in settings and isinstance(settings[key], (int, float)) and not isinstance(settings[key], bool):
                settings[key] = type(settings[key])(value)  # int stays int: "1.5" steps is refused
            else:
                raise SystemExit(f"variant part {part!r}: unknown key {key!r} for the {stage} stage")
        except ValueError:
            raise SystemExit(f"variant part {part!r}: bad value, or no such task in the tiny SFT mixture") from None
    return variant or "the preset as it is"


def rerun(stage: str, run: Path, out: Path, seed: int) -> dict:
    """The stage and its scoring in `out`, from `run`'s earlier stages (linked, not copied)."""
    out.mkdir(parents=True, exist_ok=False)
    for name in ("tokenizer", "tiny_data", *INPUTS[stage]):
        if not (run / name).exists():
            raise SystemExit(f"{run}: no {name}/ (not a finished tiny speedrun)")
        (out / name).symlink_to((run / name).resolve())
    cfg = SpeedrunConfig(preset="tiny", device="cpu", seed=seed, base_dir=str(out), quiet=True)
    configs = speedrun.stage_configs(cfg, out)
    start = time.perf_counter()
    result = (stages.train_sft if stage == "sft" else stages.train_rl)(configs[stage])
    trained = time.perf_counter()
    scores = speedrun.evaluate_stage(configs, stage)
    row = {
        "tasks": {task: 100 * value for task, value in scores.items()},
        "seconds": (trained - start, time.perf_counter() - trained),
    }
    if stage == "sft":
        row["val"] = (result["start_eval"]["val_loss"], result["last_eval"]["val_loss"])
    return row


def verdict(beyond: bool, seeds: int) -> str:
    """One seed has no spread to beat: say so rather than "yes"."""
    return "- (one seed)" if seeds < 2 else ("yes" if beyond else "no")


def print_sft(runs: dict, seeds: list[int], tasks: list[str]) -> None:
    print("\n| measure | mid per seed | SFT per seed | smallest SFT - mid | spread (max-min of both) | beyond |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for measure, mid, sft, gain in sft_vs_mid(runs, seeds, tasks):
        fmt = "{:.4f}" if measure == "val loss" else "{:.1f}"
        spread = max(max(sft) - min(sft), max(mid) - min(mid))
        beyond = round(min(gain), 6) > round(spread, 6)
        print(
            f"| {measure} | {' / '.join(map(fmt.format, mid))} | {' / '.join(map(fmt.format, sft))} | "
            f"{fmt.format(min(gain))} | {fmt.format(spread)} | {verdict(beyond, len(seeds))} |"
        )
    print("\n".join(sft_floor_lines(runs, seeds)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("sft", "rl"), default="sft")
    ap.add_argument("--root", type=Path, required=True, help="finished runs, ROOT/seed-N (speedrun_seeds.py's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, required=True, help="OUT/seed-N gets each rerun; must not exist yet")
    ap.add_argument("--variant", default="", help="see the module docstring")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists; give a new directory")
    print(f"{args.stage} variant: {apply_variant(args.variant, args.stage)}")
    if args.stage == "sft":
        print(f"SFT mixture: {stages.MIXTURES['tiny']['sft']['train']}")
    print(f"{args.stage} settings: {speedrun.PRESETS['tiny'][args.stage]}")
    runs = {}
    for seed in args.seeds:
        run = read_run(args.root / f"seed-{seed}")
        row = rerun(args.stage, args.root / f"seed-{seed}", args.out / f"seed-{seed}", seed)
        before = BEFORE[args.stage]
        runs[seed] = {"rows": {before: run["rows"][before], args.stage: row}, "tasks": run["tasks"]}
        scores = " / ".join(f"{row['tasks'][t]:.1f}" for t in run["tasks"])
        val = f"; val loss {row['val'][0]:.4f} -> {row['val'][1]:.4f}" if "val" in row else ""
        print(
            f"seed {seed}: {args.stage} {scores} ({', '.join(run['tasks'])}){val}; "
            f"{args.stage} {row['seconds'][0]:.0f} s, scoring {row['seconds'][1]:.0f} s",
            flush=True,
        )
    if args.stage == "sft":
        print_sft(runs, args.seeds, runs[args.seeds[0]]["tasks"])
    else:
        print("\n" + "\n".join(rl_lines(runs, args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
