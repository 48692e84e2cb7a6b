"""MMLU (cais/mmlu): 57 subjects, 4-choice questions; `auxiliary_train` is the big training set."""

from __future__ import annotations

from ..common import RustchatError
from .base import LETTERS, CategoricalTask, render_mc
from .hub import load_rows

SUBSETS = ("all", "auxiliary_train")


class MMLU(CategoricalTask):
    """Rows: question, subject, choices (4 strings), answer (0..3)."""

    letters = tuple(LETTERS[:4])

    def __init__(self, subset: str = "all", split: str = "test", path=None, shuffle_seed: int | None = 42, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise RustchatError(f"MMLU subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise RustchatError("MMLU subset auxiliary_train has only the split 'train'")
        if subset == "all" and split not in ("auxiliary_train", "dev", "validation", "test"):
            raise RustchatError(f"MMLU subset all has splits auxiliary_train, dev, validation, test; got {split!r}")
        self.subset, self.split, self.name = subset, split, "MMLU"
        # the hub's auxiliary_train rows are wrapped in a {"train": {...}} column, so no field check there
        fields = () if subset == "auxiliary_train" else ("question", "choices", "answer")
        self.rows = load_rows(
            "cais/mmlu",
            subset,
            split,
            path,
            fields=fields,
            field_types={"question": str, "choices": list, "answer": (int, str)},
            shuffle_seed=shuffle_seed,
        )

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]
        choices, answer = list(row["choices"]), row["answer"]
        if isinstance(answer, str) and answer in self.letters:  # some copies store the letter
            answer = self.letters.index(answer)
        if len(choices) != 4 or not isinstance(answer, int) or not 0 <= answer < 4:
            raise RustchatError(f"{self.rows.source}: row {index} needs 4 choices and an answer in 0..3")
        letters = list(self.letters)
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": letters[answer]},
            ],
            "letters": letters,
            "subject": row.get("subject", ""),
        }
