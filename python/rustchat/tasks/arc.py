"""ARC (allenai/ai2_arc): grade-school science, multiple choice, ARC-Easy and ARC-Challenge."""

from __future__ import annotations

from ..common import RustchatError
from .base import LETTERS, CategoricalTask, render_mc
from .hub import load_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(CategoricalTask):
    """Rows: question, choices {text: [...], label: [...]}, answerKey.

    The dataset's own labels and answerKey are used unchanged, as nanochat does (48abd7d, 92d63d4): most rows are
    labelled A-D, a few "1".."4" (and a few have 3 or 5 choices); each conversation carries its
    labels as `letters`, which are what the categorical evaluation scores."""

    letters = tuple(LETTERS[:5])  # only a fallback: every ARC conversation has its own letters

    def __init__(
        self, subset: str = "ARC-Easy", split: str = "test", path=None, shuffle_seed: int | None = 42, **kwargs
    ):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise RustchatError(f"ARC subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if split not in SPLITS:
            raise RustchatError(f"ARC split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.subset, self.split, self.name = subset, split, subset
        self.rows = load_rows(
            "allenai/ai2_arc",
            subset,
            split,
            path,
            fields=("question", "choices", "answerKey"),
            field_types={"question": str, "choices": dict, "answerKey": str},
            shuffle_seed=shuffle_seed,
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
        if len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS) or str(row["answerKey"]) not in labels:
            raise RustchatError(
                f"{self.rows.source}: row {index} has malformed choices or an answerKey not among the labels"
            )
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], labels, texts)},
                {"role": "assistant", "content": str(row["answerKey"])},
            ],
            "letters": labels,
        }
