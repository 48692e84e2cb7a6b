"""Identity: the bundled conversations (training) and held-out questions about who the model is (test).

`get_task("identity")` is the bundled set, python/rustchat/data/identity.jsonl (written by
`identity_gen`). `get_task("identity", split="test", size=n)` asks n questions about the
model's name and maker in phrasings that never occur in the bundled set, in five languages;
a reply passes when it names rustchat. That is what the identity data teaches, measured on
questions the model was not trained on.
"""

from __future__ import annotations

import random

from ..common import RustchatError
from .base import Task
from .customjson import CustomJSON, identity_path

# Held out from identity_gen's phrasings (a test checks that none occurs in the bundled file).
HELD_OUT_QUESTIONS = (
    "May I know your name?",
    "What name were you given?",
    "Which model are you?",
    "What kind of assistant are you, and what is your name?",
    "Who is responsible for training you?",
    "What software were you trained with?",
    "Which system produced you?",
    "Please tell me who you are.",
    "Identify yourself, please.",
    "Whom am I chatting with right now?",
    "Who programmed you?",
    "What are you, exactly?",
    "Est-ce que tu as un nom ?",
    "¿Con quién estoy hablando?",
    "Mit wem spreche ich gerade?",
    "你的名字是什么？",
    "Com quem estou falando?",
)
GREETINGS = ("Hi. ", "Hello! ", "hey ")


class IdentityQuestions(Task):
    """Held-out questions about the model's name and maker (generative; passes when the reply names rustchat)."""

    name = "Identity"

    def __init__(self, size: int = len(HELD_OUT_QUESTIONS), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < 0:
            raise RustchatError(f"Identity size must be a non-negative int, got {size!r}")
        self.size, self.seed = size, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        # the first len(HELD_OUT_QUESTIONS) problems ask each question once; later ones vary greetings
        rng = random.Random(f"Identity/test/{self.seed}/{index}")
        question = HELD_OUT_QUESTIONS[index % len(HELD_OUT_QUESTIONS)]
        if index >= len(HELD_OUT_QUESTIONS):
            question = rng.choice(GREETINGS) + question
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "I'm rustchat, a small chat model trained with rustchat."},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return "rustchat" in completion.lower()


def identity_task(split: str = "train", **kwargs) -> Task:
    """The bundled conversations (split "train") or the held-out questions (split "test")."""
    if split == "train":
        return CustomJSON(identity_path(), **kwargs)
    if split == "test":
        return IdentityQuestions(**kwargs)
    raise RustchatError(f"identity split must be train or test, got {split!r}")
