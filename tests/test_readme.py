"""The README (and docs/usage.md, which goes on where the README stops) runs as written:
every Python block runs offline in a fresh process, in a
directory holding the files it obviously expects (corpus.txt, a trained-looking SFT checkpoint
under RUSTCHAT_BASE_DIR), with nothing on stderr (no warnings); every `rustchat ...` command it
shows, in blocks or inline, parses with the real command line into a valid config."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rustchat import Tokenizer
from rustchat.checkpoint import save_checkpoint, stage_dir
from rustchat.cli import build_parser
from rustchat.config import from_args
from rustchat.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8") + "\n" + (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", TEXT, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
# what a placeholder in a shown command stands for
PLACEHOLDERS = {
    "DATA...": "corpus.txt",
    "DIR": "some_dir",
    "PROMPT": "hi",
    "NAME": "run1",
    "LIST": "arc-easy,gsm8k",
    "FILES": "corpus.txt",
    "N": "3",
}


def _commands() -> list[str]:
    """Every `rustchat ...` command of the README: lines of its shell blocks and inline code."""
    found = []
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                if part.strip().startswith("rustchat "):
                    found.append(part.strip())
    found += [m for m in re.findall(r"`(rustchat [^`]+)`", TEXT)]
    return found


def _as_argv(command: str) -> list[str]:
    """A shown command as one concrete command line: optional [parts] included, the first of
    a|b alternatives, placeholders filled in."""
    argv = []
    for word in shlex.split(command.replace("[", " ").replace("]", " "))[1:]:
        word = word.split("|")[0] if "|" in word and not word.startswith("-") else word
        argv.append(PLACEHOLDERS.get(word, word))
    return argv


COMMANDS = _commands()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_shown_command_parses(command):
    argv = _as_argv(command)
    args = build_parser().parse_args(argv)
    from_args(args.config_class, args)  # the config's own checks (choices, minimums)


def test_the_readme_shows_commands_and_code():
    assert len(COMMANDS) >= 15 and len(PYTHON) >= 2
    first = TEXT.index("pip install . && rustchat speedrun --preset tiny")
    cpu = TEXT.index("pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install .")
    assert 0 < cpu - first < 600  # the CPU-only install sits beside the first command


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("readme")
    (d / "corpus.txt").write_text(corpus["code"], encoding="utf-8")
    base = d / "base"
    tok = Tokenizer.train([corpus["code"][i : i + 4000] for i in range(0, 200_000, 4000)], vocab_size=400)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=128))
    save_checkpoint(stage_dir("sft", 1, base), 5, model, None, {"stage": "sft"})
    return d


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_block_runs_offline_without_warnings(workdir, tmp_path, i):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TIKTOKEN"))}
    env.update(
        {
            "RUSTCHAT_BASE_DIR": str(workdir / "base"),
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"),
            "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken_cache"),  # empty: nothing downloaded before
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
        }
    )  # no network
    r = subprocess.run(
        [sys.executable, "-c", PYTHON[i]], cwd=workdir, capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]


def test_every_flag_the_readme_names_exists():
    import argparse

    known = set()
    stack = [build_parser()]
    while stack:
        p = stack.pop()
        for a in p._actions:
            known.update(a.option_strings)
            if isinstance(a, argparse._SubParsersAction):
                stack.extend(a.choices.values())
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", TEXT)) - {
        "--index-url",
        "--nproc-per-node",
    }  # pip's and torchrun's, not ours
    assert named and named <= known, sorted(named - known)


def test_readme_stays_short():
    """The README is the front page: 100 lines at most; measurements and the rest go in docs/."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 100, f"README.md has {len(lines)} lines; move detail to docs/"
