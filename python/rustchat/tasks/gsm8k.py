"""GSM8K (openai/gsm8k): grade-school math word problems with calculator annotations.

The reference answers mark each calculation as `<<expr=result>>`; these become a python tool
call (`expr`) and its output (`result`) in the assistant message, so the model learns to call
the calculator (docs/design.md, "Inference engine"). The final answer follows `#### `.
"""

from __future__ import annotations

import re

from ..common import RustchatError
from .base import Task, answers_match, assistant_text, extract_answer
from .hub import load_rows

_CALC_RE = re.compile(r"<<([^<>]*)>>")


def calculator_parts(answer: str) -> list[dict]:
    """`"a <<2*3=6>>6 b"` -> text "a ", python "2*3", python_output "6", text "6 b".

    The split is at the last "=" (the result); an annotation without "=" gets an empty output.
    Empty text parts are dropped (they render to nothing)."""
    parts: list[dict] = []
    pos = 0
    for m in _CALC_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos : m.start()]})
        expr, eq, result = m.group(1).rpartition("=")
        if not eq:
            expr, result = result, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    """Rows: question, answer (worked solution with `<<..>>` annotations, then `#### n`)."""

    def __init__(self, subset: str = "main", split: str = "test", path=None, shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise RustchatError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise RustchatError(f"GSM8K split must be train or test, got {split!r}")
        self.subset, self.split, self.name = subset, split, "GSM8K"
        self.rows = load_rows(
            "openai/gsm8k",
            subset,
            split,
            path,
            fields=("question", "answer"),
            field_types={"question": str, "answer": str},
            shuffle_seed=shuffle_seed,
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": calculator_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(assistant_text(conversation)), extract_answer(completion))
