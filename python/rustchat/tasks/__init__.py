"""Tasks: conversations for SFT and evaluation, from the Hugging Face hub, local files, or generated.

`get_task("arc-easy", split="train")` builds one by name; `TaskMixture` / `TaskSequence` combine
them. Every hub task also takes `path=` (a local JSONL/parquet copy with the hub's fields).
"""
from __future__ import annotations

from ..common import RustchatError
from .arc import ARC
from .arithmetic import Arithmetic
from .base import (
    CategoricalTask,
    Task,
    TaskMixture,
    TaskSequence,
    answers_match,
    assistant_text,
    conversation_problem,
    extract_answer,
    render_mc,
)
from .customjson import CustomJSON, identity_path
from .gsm8k import GSM8K, calculator_parts
from .humaneval import HumanEval
from .identity import IdentityQuestions, identity_task
from .mmlu import MMLU
from .smoltalk import SmolTalk
from .spelling import SimpleSpelling, SpellingBee

_REGISTRY = {
    "arc-easy": lambda **kw: ARC(subset="ARC-Easy", **kw),
    "arc-challenge": lambda **kw: ARC(subset="ARC-Challenge", **kw),
    "arc": ARC,
    "mmlu": MMLU,
    "mmlu-aux": lambda **kw: MMLU(subset="auxiliary_train", **{"split": "train", **kw}),
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "smoltalk": SmolTalk,
    "spellingbee": SpellingBee,
    "simplespelling": SimpleSpelling,
    "arithmetic": Arithmetic,
    "customjson": CustomJSON,
    "identity": identity_task,
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs) -> Task:
    """Build a task by name (case, "_" and "-" ignored: "ARC-Easy", "arc_easy", "arceasy")."""
    key = "".join(c for c in str(name).lower() if c.isalnum())
    for known, factory in _REGISTRY.items():
        if known.replace("-", "") == key:
            try:
                return factory(**kwargs)
            except TypeError as e:
                if "keyword argument" not in str(e):
                    raise
                raise RustchatError(f"task {name!r}: {e}") from None
    raise RustchatError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")


__all__ = [
    "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk", "CustomJSON", "SpellingBee", "SimpleSpelling", "Arithmetic",
    "IdentityQuestions", "Task", "CategoricalTask", "TaskMixture", "TaskSequence", "get_task", "task_names", "identity_path",
    "render_mc", "calculator_parts", "extract_answer", "answers_match", "assistant_text", "conversation_problem",
]
