"""scripts/tiny_stage_variants.py's variants of the tiny SFT and RL recipes, against a plain rebuild of the
expected mixture and settings from fresh random values; bad parts stop with one line."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_stage_variants  # noqa: E402

from rustchat import speedrun, stages  # noqa: E402


@pytest.fixture
def recipe(monkeypatch):
    """The tiny SFT mixture and SFT settings, restored after the test (the RL settings too)."""
    monkeypatch.setitem(stages.MIXTURES, "tiny", copy.deepcopy(stages.MIXTURES["tiny"]))
    monkeypatch.setitem(speedrun.PRESETS, "tiny", copy.deepcopy(speedrun.PRESETS["tiny"]))
    return stages.MIXTURES["tiny"]["sft"]["train"], speedrun.PRESETS["tiny"]["sft"]


def test_variants_change_the_mixture_and_settings(recipe):
    train, settings = recipe
    before, settings_before = copy.deepcopy(train), dict(settings)
    rng = random.Random()
    count, size, steps, frac = rng.randint(1, 5), rng.randint(10, 3000), rng.randint(1, 999), rng.random()
    tiny_stage_variants.apply_variant(
        f"identity={count},spellingbee.size={size},max_steps={steps},init_lr_frac={frac!r}"
    )
    # the expected list, rebuilt by hand: identity entries replaced in place by `count` copies
    first = next(i for i, (name, _) in enumerate(before) if name == "identity")
    others = [e for e in before if e[0] != "identity"]
    expected = others[:first] + [before[first]] * count + others[first:]
    expected = [(n, {**kw, "size": size}) if n == "spellingbee" else (n, kw) for n, kw in expected]
    assert train == expected
    assert settings == {**settings_before, "max_steps": steps, "init_lr_frac": frac}


def test_no_variant_leaves_the_preset_as_it_is(recipe):
    train, settings = recipe
    before, settings_before = copy.deepcopy(train), dict(settings)
    tiny_stage_variants.apply_variant("")
    assert train == before and settings == settings_before


@pytest.mark.parametrize(
    "part, says",
    [
        ("identity", "expected KEY=VALUE"),
        ("identity=0", "bad value"),
        ("identity=two", "bad value"),
        ("nosuchtask.size=5", "no such task"),
        ("max_steps=1.5", "bad value"),
        ("warmup=3", "unknown key 'warmup'"),
    ],
)
def test_a_bad_part_stops_with_one_line_naming_it(recipe, part, says):
    with pytest.raises(SystemExit) as stop:
        tiny_stage_variants.apply_variant(f"max_steps=10,{part}")
    message = str(stop.value)
    assert "\n" not in message and part in message and says in message


def test_rl_variants_change_only_the_rl_settings(recipe):
    train, sft_settings = recipe
    train_before, sft_before = copy.deepcopy(train), dict(sft_settings)
    rl = speedrun.PRESETS["tiny"]["rl"]
    rl_before = dict(rl)
    rng = random.Random()
    frac, steps, temp = rng.random(), rng.randint(1, 200), rng.uniform(0.1, 2.0)
    tiny_stage_variants.apply_variant(f"init_lr_frac={frac!r},max_steps={steps},temperature={temp!r}", "rl")
    assert rl == {**rl_before, "init_lr_frac": frac, "max_steps": steps, "temperature": temp}
    assert train == train_before and sft_settings == sft_before
    for part in ("identity=2", "spellingbee.size=10", "tasks=spellingbee"):  # SFT's keys, or not a number
        with pytest.raises(SystemExit, match="unknown key .* for the rl stage"):
            tiny_stage_variants.apply_variant(part, "rl")
