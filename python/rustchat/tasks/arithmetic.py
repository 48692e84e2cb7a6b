"""Arithmetic: generated word problems and sums, solved GSM8K style with calculator tool calls.

Offline stand-in for GSM8K in the tiny recipe: each answer is written with `<<expr=result>>`
annotations and turned into python / python_output parts by the same code as GSM8K, so the
model practises the tool-call format; the final answer follows `#### `. All results are ints.

Held out: a problem belongs to the test split when a CRC32 of its numbers falls in one tenth
of the range, so no test problem's numbers (whatever the names) are trained on.
"""

from __future__ import annotations

import random
import zlib

from ..common import RustchatError
from .base import Task, answers_match, assistant_text, extract_answer
from .gsm8k import calculator_parts

NAMES = (
    "Ana",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jack",
    "Kemi",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Zoe",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "shells",
    "cards",
    "stamps",
    "eggs",
    "balloons",
    "coins",
)
THINGS = ("notebook", "sandwich", "toy car", "ticket", "plant", "mug", "kite", "puzzle")


def in_test_split(answer: str) -> bool:
    """Whether a problem is held out: by a CRC32 of the numbers of its worked answer, in order,
    so the same numbers under other names or items are held out too."""
    numbers = " ".join("".join(c if c.isdigit() else " " for c in answer).split())
    return zlib.crc32(numbers.encode()) % 10 == 0


def _problem(rng: random.Random) -> tuple[str, str]:
    """(question, GSM8K-style annotated answer)."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    r = rng.randint
    kind = rng.randrange(7)
    if kind == 0:
        a, b = r(2, 99), r(2, 99)
        return (
            f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
            f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {item} now.\n#### {a + b}",
        )
    if kind == 1:
        a = r(10, 200)
        b = r(1, a - 1)
        return (
            f"{name} has {a} {item} and gives {b} of them to {friend}. How many {item} does {name} have left?",
            f"{name} has {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {item} left.\n#### {a - b}",
        )
    if kind == 2:
        a, b, c = r(0, 50), r(2, 12), r(2, 24)
        p = b * c
        return (
            f"{name} has {a} {item} and buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?",
            f"The packs hold {b}*{c} = <<{b}*{c}={p}>>{p} {item}. "
            f"So {name} has {a}+{p} = <<{a}+{p}={a + p}>>{a + p} {item} now.\n#### {a + p}",
        )
    if kind == 3:
        n, k = r(2, 12), r(2, 99)
        total = n * k
        return (
            f"{name} shares {total} {item} equally among {n} friends. How many {item} does each friend get?",
            f"Each friend gets {total}/{n} = <<{total}/{n}={k}>>{k} {item}.\n#### {k}",
        )
    if kind == 4:
        thing, p, q = rng.choice(THINGS), r(2, 40), r(2, 9)
        cost = p * q
        paid = (cost // 10 + r(1, 10)) * 10
        return (
            f"A {thing} costs ${p}. {name} buys {q} of them and pays with ${paid}. How much change does {name} get?",
            f"The {q} items cost {q}*{p} = <<{q}*{p}={cost}>>{cost} dollars. "
            f"The change is {paid}-{cost} = <<{paid}-{cost}={paid - cost}>>{paid - cost} dollars.\n#### {paid - cost}",
        )
    if kind == 5:
        rate, h, d = r(8, 40), r(2, 10), r(2, 7)
        day = rate * h
        return (
            f"{name} earns ${rate} per hour and works {h} hours a day for {d} days. How many dollars does {name} earn?",
            f"In one day {name} earns {rate}*{h} = <<{rate}*{h}={day}>>{day} dollars. "
            f"Over {d} days that is {day}*{d} = <<{day}*{d}={day * d}>>{day * d} dollars.\n#### {day * d}",
        )
    a, b, c = r(2, 999), r(2, 99), r(2, 99)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    expr = f"{a} {op1} {b} {op2} {c}"
    value = _eval3(a, op1, b, op2, c)
    question = rng.choice((f"What is {expr}?", f"Calculate {expr}.", f"Compute {expr}", f"{expr} = ?"))
    return question, f"{expr} = <<{expr.replace(' ', '')}={value}>>{value}\n#### {value}"


def _eval3(a: int, op1: str, b: int, op2: str, c: int) -> int:
    # usual precedence, without eval(): * binds tighter than + and -
    f = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    if op2 == "*" and op1 != "*":
        return f[op1](a, b * c)
    return f[op2](f[op1](a, b), c)


class Arithmetic(Task):
    """Generated arithmetic problems (generative; checked by the `#### n` number)."""

    name = "Arithmetic"

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise RustchatError(f"Arithmetic split must be train or test, got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise RustchatError(f"Arithmetic size must be a non-negative int, got {size!r}")
        self.size, self.split, self.seed = size, split, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        # draw until the problem falls in this split (about 10 draws for test, 1.1 for train)
        for attempt in range(1000):
            rng = random.Random(f"Arithmetic/{self.split}/{self.seed}/{index}/{attempt}")
            question, answer = _problem(rng)
            if in_test_split(answer) == (self.split == "test"):
                break
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": calculator_parts(answer)},
            ]
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(assistant_text(conversation)), extract_answer(completion))
