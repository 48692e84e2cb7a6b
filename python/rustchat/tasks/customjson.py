"""CustomJSON: your own conversations, one per line of a JSONL file; and the bundled identity set."""

from __future__ import annotations

from pathlib import Path

from ..common import RustchatError
from .hub import task_lines
from .base import Task, answers_match, assistant_text, conversation_problem, extract_answer


def identity_path() -> Path:
    """The bundled identity conversations (the assistant says it is rustchat)."""
    return Path(__file__).resolve().parent.parent / "data" / "identity.jsonl"


class CustomJSON(Task):
    """Each non-blank line: `{"messages": [...]}` or a bare list of messages.

    The whole file is read and checked up front, so a bad line fails before training starts;
    the error names the file, the line and the problem."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.name = self.path.stem
        if not self.path.is_file():
            raise RustchatError(f"{self.path}: no such file")
        self.conversations: list[dict] = []
        for lineno, obj in task_lines(self.path):  # streamed; bounded in size and nesting
            if not isinstance(obj, (dict, list)):
                raise RustchatError(
                    f"{self.path}:{lineno}: expected an object with 'messages' or a list of messages, got {type(obj).__name__}"
                )
            problem = conversation_problem(obj)
            if problem:
                raise RustchatError(f"{self.path}:{lineno}: {problem}")
            self.conversations.append({"messages": obj["messages"] if isinstance(obj, dict) else obj})

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The last assistant message is the reference answer: when it ends in a `#### n`
        marker the numbers must match (as GSM8K checks them), otherwise the whole reply must
        equal it, surrounding white space aside."""
        reference = assistant_text(conversation)
        number = extract_answer(reference)
        if number is not None:
            return answers_match(number, extract_answer(completion))
        return completion.strip() == reference.strip()
