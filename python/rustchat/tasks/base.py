"""Task base class, mixtures and sequences, the multiple-choice prompt, and a conversation checker.

A task is an indexable collection of conversations (`{"messages": [...]}` dicts, see
docs/design.md, "Conversation rendering"). Subclasses implement `num_examples()` and `get_example(i)`; the base
adds `start/stop/step` slicing, so `SmolTalk(split="train", stop=10_000)` is its first 10,000
examples. `eval_type` is "categorical" (scored by letter logits; conversations carry a
`letters` list) or "generative" (sampled, then checked by `evaluate`).
"""

from __future__ import annotations

import re

import numpy as np

from ..common import RustchatError

MC_INSTRUCTION = "Respond only with the letter of the correct answer."
LETTERS = "ABCDEFGHIJ"
PART_TYPES = ("text", "python", "python_output")

# `#### n` final answers, read exactly as nanochat reads them at 48abd7d and 92d63d4 (docs/design.md,
# "Chat evaluation"):
# one space after the marker, then digits, dots and commas; commas are removed afterwards.
_ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")


class Task:
    """Base class: an indexable, sliceable collection of conversations."""

    eval_type = "generative"
    name = "task"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        for k, v in (("start", start), ("step", step)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise RustchatError(f"{type(self).__name__}: {k} must be an int, got {v!r}")
        if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool)):
            raise RustchatError(f"{type(self).__name__}: stop must be an int or None, got {stop!r}")
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise RustchatError(
                f"{type(self).__name__}: need start >= 0, stop >= 0 and step >= 1 (got {start}, {stop}, {step})"
            )
        self.start, self.stop, self.step = start, stop, step
        self._range: range | None = None

    # --- to implement
    def num_examples(self) -> int:
        """Number of examples before slicing."""
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        """Conversation at physical index `index` (before slicing)."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether `completion` (the assistant's reply text) answers `conversation` correctly."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    # --- provided
    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: 1.0 when correct, else 0.0."""
        return float(self.evaluate(conversation, completion))

    @property
    def indices(self) -> range:
        # Computed on first use so subclasses may load their data after calling super().__init__.
        if self._range is None:
            self._range = range(self.num_examples())[self.start : self.stop : self.step]
        return self._range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"{type(self).__name__} indices must be ints, got {type(i).__name__}")
        return self.get_example(self.indices[int(i)])  # range raises IndexError when out of bounds

    def __iter__(self):
        for j in self.indices:
            yield self.get_example(j)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)})"


class CategoricalTask(Task):
    """Multiple choice: the assistant answer is one letter out of `conversation["letters"]`."""

    eval_type = "categorical"
    letters: tuple[str, ...] = tuple(LETTERS[:4])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == assistant_text(conversation).strip()


class TaskMixture(Task):
    """All examples of all tasks, interleaved in one deterministic shuffled order (seeded).

    Examples are drawn exactly once each; to oversample a task, list it twice."""

    eval_type = "mixture"

    def __init__(self, tasks, seed: int = 42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        if not self.tasks:
            raise RustchatError("TaskMixture needs at least one task")
        sizes = [len(t) for t in self.tasks]
        task_id = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        local = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
        # numpy's PCG64 stream is fixed for a given seed across platforms and versions
        perm = np.random.default_rng(seed).permutation(len(task_id))
        self._task_id, self._local = task_id[perm], local[perm]

    def num_examples(self) -> int:
        return len(self._task_id)

    def get_example(self, index: int) -> dict:
        return self.tasks[self._task_id[index]][int(self._local[index])]

    def source(self, i: int) -> tuple[int, int]:
        """(task position, index inside that task) of the mixture's example i."""
        j = self.indices[i]
        return int(self._task_id[j]), int(self._local[j])


class TaskSequence(Task):
    """The tasks one after the other, in order."""

    eval_type = "mixture"

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self._ends = np.cumsum([len(t) for t in self.tasks], dtype=np.int64)

    def num_examples(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def get_example(self, index: int) -> dict:
        t = int(np.searchsorted(self._ends, index, side="right"))
        before = int(self._ends[t - 1]) if t else 0
        return self.tasks[t][index - before]


# ---------------------------------------------------------------------------- helpers


def render_mc(question: str, letters, choices) -> str:
    """The multiple-choice user message (docs/design.md, "Tasks"): question, `- {choice}={letter}` lines, instruction."""
    lines = "".join(f"- {c}={l}\n" for l, c in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\n{MC_INSTRUCTION}"


def assistant_text(conversation: dict) -> str:
    """Text of the last assistant message (all parts joined; tool outputs included)."""
    for m in reversed(conversation["messages"]):
        if m["role"] == "assistant":
            c = m["content"]
            return c if isinstance(c, str) else "".join(p["text"] for p in c)
    raise RustchatError("the conversation has no assistant message")


def extract_answer(text: str) -> str | None:
    """The number after the first `#### ` marker, commas removed (None when there is none)."""
    m = _ANSWER_RE.search(text)
    return None if m is None else m.group(1).replace(",", "")


def answers_match(reference: str | None, predicted: str | None) -> bool:
    """Extracted answers equal as strings, as nanochat compares them ("18" != "18.0"; 48abd7d, 92d63d4)."""
    return reference is not None and predicted == reference


def conversation_problem(conv) -> str | None:
    """What is wrong with a conversation as the renderer would see it, or None if it is valid.

    Valid: a dict with a "messages" list (or a bare list), an optional leading system message,
    then user and assistant strictly alternating from user, at least one assistant message;
    user/system content a str, assistant content a str or a list of typed parts."""
    msgs = conv.get("messages") if isinstance(conv, dict) else conv
    if isinstance(conv, dict) and "messages" not in conv:
        return "a conversation object needs a 'messages' key"
    if not isinstance(msgs, list):
        return f"messages must be a list, got {type(msgs).__name__}"
    if not msgs:
        return "the conversation has no messages"
    expect = "user"
    seen_assistant = False
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content'"
        role, content = m["role"], m["content"]
        if role == "system" and i == 0:
            if not isinstance(content, str):
                return "message 0: system content must be a string"
            continue
        if role not in ("user", "assistant", "system"):
            return f"message {i}: unknown role {role!r} (expected system, user or assistant)"
        if role != expect:
            return f"message {i}: expected role {expect!r}, got {role!r} (roles must alternate user, assistant, ...)"
        if role == "user" and not isinstance(content, str):
            return f"message {i}: user content must be a string"
        if role == "assistant":
            seen_assistant = True
            if isinstance(content, list):
                for j, p in enumerate(content):
                    if not isinstance(p, dict) or p.get("type") not in PART_TYPES or not isinstance(p.get("text"), str):
                        return (
                            f"message {i}, part {j}: a part must be {{'type': text|python|python_output, 'text': str}}"
                        )
            elif not isinstance(content, str):
                return f"message {i}: assistant content must be a string or a list of parts"
        expect = "assistant" if role == "user" else "user"
    if not seen_assistant:
        return "the conversation has no assistant message"
    return None
