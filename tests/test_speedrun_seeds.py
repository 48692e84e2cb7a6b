"""scripts/speedrun_seeds.py's verdict on the tiny preset's targets, read back from report.md files
(--reuse), against a plain reference of each target on fresh random scores."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("Arithmetic", "SpellingBee", "SimpleSpelling", "Identity")


def _report(scores: dict, seconds: int, rl_seconds: int, machine: str = "host (Some CPU, 2 CPUs)") -> str:
    """A report.md whose speedrun section has the layout the speedrun writes."""

    def row(stage, first_cells, pcts, secs):
        cells = [f"{pcts[t]:.1f}%" if pcts else "-" for t in TASKS]
        return f"| {stage} | {first_cells} | {' | '.join(cells)} | {secs} s |"

    lines = [
        "## speedrun",
        "",
        f"_2026-12-06 20:00:00 on {machine}_",
        "",
        "| | |",
        "| --- | --- |",
        "| preset | tiny |",
        f"| total time | {seconds} s |",
        "",
        f"| Stage | Loss first -> last | Val metric | {' | '.join(TASKS)} | Time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        row("base", "5.3 -> 2.8 | val bpb 4.4", None, 9),
        row("mid", "1.3 -> 0.2 | val loss 3.7 -> 0.0256", scores["mid"], 100),
        row("sft", f"0.05 -> 0.02 | val loss {scores['val'][0]:.4f} -> {scores['val'][1]:.4f}", scores["sft"], 60),
        row("rl", "reward 0.8 -> 0.9 | pass@1 0.8", scores["rl"], rl_seconds),
        "",
        "## base-eval",
        "",
    ]
    return "\n".join(lines)


def _expected(runs: list[dict], seconds: list[int], rl_seconds: list[int]) -> list[bool]:
    """Each target, met or not, computed directly from the scores."""

    def col(stage, task):
        return [r[stage][task] for r in runs]

    def spread(xs):
        return max(xs) - min(xs)

    out = [min(col("sft", "SpellingBee")) >= 85, min(col("sft", "Arithmetic")) >= 50]
    # SFT beats mid on at least one task, or on the held-out val loss (lower is better), by more than
    # both stages' spreads; compared in integer units of the report's last decimal
    beyond = []
    for t in TASKS:
        mid, sft = [round(x * 10) for x in col("mid", t)], [round(x * 10) for x in col("sft", t)]
        beyond.append(min(f - m for m, f in zip(mid, sft)) > max(spread(mid), spread(sft)))
    mid, sft = [round(r["val"][0] * 1e4) for r in runs], [round(r["val"][1] * 1e4) for r in runs]
    beyond.append(min(m - f for m, f in zip(mid, sft)) > max(spread(mid), spread(sft)))
    out.append(any(beyond))
    out.append(all(r >= f + 5 or r >= 97 for f, r in zip(col("sft", "Arithmetic"), col("rl", "Arithmetic"))))
    out.append(all(r >= f - 5 for f, r in zip(col("sft", "SpellingBee"), col("rl", "SpellingBee"))))
    out += [max(seconds) <= 360, max(t - r for t, r in zip(seconds, rl_seconds)) <= 300]
    return out


def test_targets_verdict_matches_a_plain_reference(tmp_path):
    rng = random.Random()
    for trial in range(6):
        root = tmp_path / f"t{trial}"
        runs, seconds, rl_seconds, machines = [], [], [], []
        # mid scores close across seeds on odd trials and far apart on even ones, so SFT's margin
        # lands on both sides of the spread
        noise = 4 if trial % 2 else 50
        mid_level = {t: rng.randrange(60, 150) for t in TASKS + ("val",)}
        for seed in (1, 2, 3):
            # half-point scores, as 200 problems give; near the thresholds often enough to hit both sides
            mid = {t: (mid_level[t] + rng.randrange(noise)) / 2 for t in TASKS}
            sft = {t: min(100.0, mid[t] + rng.randrange(-10, 40) / 2) for t in TASKS}
            rl = {t: max(0.0, min(100.0, sft[t] + rng.randrange(-14, 16) / 2)) for t in TASKS}
            val_mid = (mid_level["val"] + rng.randrange(noise)) / 1e4  # the mid and SFT models' val loss
            val = (val_mid, max(0.0, val_mid - rng.randrange(-10, 40) / 1e4))
            runs.append({"mid": mid, "sft": sft, "rl": rl, "val": val})
            seconds.append(rng.randrange(240, 380))
            rl_seconds.append(rng.randrange(40, 120))
            (root / f"seed-{seed}").mkdir(parents=True)
            machines.append(f"vm{rng.randrange(1000)} (CPU model {rng.randrange(1000)}, {rng.randrange(1, 9)} CPUs)")
            report = _report(runs[-1], seconds[-1], rl_seconds[-1], machines[-1])
            (root / f"seed-{seed}" / "report.md").write_text(report)
        r = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "speedrun_seeds.py"), "--root", str(root), "--reuse"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        verdicts = [line for line in r.stdout.splitlines() if line.startswith("- ")]
        assert [v.endswith("-> met") for v in verdicts] == _expected(runs, seconds, rl_seconds), r.stdout
        # each seed says the machine its report names (seeds may have run on different ones)
        for seed, (secs, where) in enumerate(zip(seconds, machines), 1):
            assert f"seed {seed}: {secs} s on {where}\n" in r.stdout
        # the per-seed gains are printed as computed
        arith = next(v for v in verdicts if v.startswith("- RL Arithmetic"))
        for run in runs:
            assert f"{run['rl']['Arithmetic']:.1f} ({run['rl']['Arithmetic'] - run['sft']['Arithmetic']:+.1f})" in arith


def test_a_report_without_a_speedrun_section_is_one_line(tmp_path):
    """A stage's own report (what tiny_stage_variants.py leaves, say) is not a speedrun run: one line
    naming the file, for speedrun_seeds.py and for tiny_stage_variants.py reading it as --root."""
    run = tmp_path / "seed-1"
    run.mkdir()
    (run / "report.md").write_text("## sft\n\n| | |\n| --- | --- |\n| steps | 330 |\n")
    for script, extra in (
        ("speedrun_seeds.py", ["--seeds", "1", "--reuse"]),
        ("tiny_stage_variants.py", ["--stage", "rl", "--seeds", "1", "--out", str(tmp_path / "out")]),
    ):
        r = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--root", str(tmp_path), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0
        assert r.stderr.strip() == f"{run / 'report.md'}: no speedrun section (not a finished `rustchat speedrun` run)"
