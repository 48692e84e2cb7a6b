"""Tasks: conversations for SFT and evaluation, from the Hugging Face hub, local files, or generated.

`get_task("arc-easy", split="train")` builds one by name; `TaskMixture` / `TaskSequence` combine
them. Every hub task also takes `path=` (a local JSONL/parquet copy with the hub's fields); `task_from`
finds that copy in a --task-dir by its file name.
"""

from __future__ import annotations

from pathlib import Path

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
from .hub import HubUnavailable, local_hint
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


# ----------------------------------------------------------------------------- local copies (--task-dir)
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
HUB_TASKS = ("arc", "mmlu", "gsm8k", "smoltalk", "humaneval")  # the tasks whose rows come from the hub


def local_task_stem(name: str, kwargs: dict) -> str:
    """The file name (without suffix) --task-dir looks for: <task>[-<subset>]-<split>, e.g.
    arc-ARC-Easy-train, smoltalk-test, mmlu-auxiliary_train-train."""
    return "-".join(str(x) for x in (name, kwargs.get("subset"), kwargs.get("split")) if x)


def local_task_file(task_dir, name: str, kwargs: dict) -> Path | None:
    """A local copy of a hub dataset in task_dir (`local_task_stem` + one of LOCAL_SUFFIXES)."""
    stem = local_task_stem(name, kwargs)
    for suffix in LOCAL_SUFFIXES:
        p = Path(task_dir) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def task_from(
    name: str, kwargs: dict, task_dir=None, *, file_name: str | None = None, file_kwargs: dict | None = None
) -> Task:
    """get_task, reading the task's local copy from task_dir when it has one (a hub task, its
    file named by `local_task_stem` of `file_name` or `name` and kwargs + `file_kwargs`); when the
    hub is needed but cannot be used, the error names the exact file --task-dir would need."""
    if task_dir is not None and not Path(task_dir).is_dir():
        raise RustchatError(f"--task-dir {task_dir}: no such directory")
    kw = dict(kwargs)
    stem_name, naming = file_name or name, {**kwargs, **(file_kwargs or {})}
    if task_dir is not None and stem_name in HUB_TASKS:
        local = local_task_file(task_dir, stem_name, naming)
        if local is not None:
            kw["path"] = str(local)
    try:
        return get_task(name, **kw)
    except HubUnavailable as e:
        raise RustchatError(f"{e.what}; {local_hint(local_task_stem(stem_name, naming))}") from None


__all__ = [
    "ARC",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "SmolTalk",
    "CustomJSON",
    "SpellingBee",
    "SimpleSpelling",
    "Arithmetic",
    "IdentityQuestions",
    "Task",
    "CategoricalTask",
    "TaskMixture",
    "TaskSequence",
    "get_task",
    "task_names",
    "identity_path",
    "task_from",
    "local_task_file",
    "local_task_stem",
    "LOCAL_SUFFIXES",
    "render_mc",
    "calculator_parts",
    "extract_answer",
    "answers_match",
    "assistant_text",
    "conversation_problem",
]
