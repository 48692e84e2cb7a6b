"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT (train / test)."""

from __future__ import annotations

from ..common import RustchatError
from .base import Task, conversation_problem
from .hub import load_rows


class SmolTalk(Task):
    """Rows: messages (list of {role, content}); an optional leading system message is kept."""

    def __init__(self, split: str = "train", path=None, shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise RustchatError(f"SmolTalk split must be train or test, got {split!r}")
        self.split, self.name = split, "SmolTalk"
        self.rows = load_rows(
            "HuggingFaceTB/smol-smoltalk",
            None,
            split,
            path,
            fields=("messages",),
            field_types={"messages": list},
            shuffle_seed=shuffle_seed,
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        # keep only role/content: hub rows may carry other keys the renderer does not need
        msgs = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        conv = {"messages": msgs}
        problem = conversation_problem(conv)
        if problem:
            raise RustchatError(f"{self.rows.source}: row {index}: {problem}")
        return conv
