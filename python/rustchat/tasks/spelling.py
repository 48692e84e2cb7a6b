"""Synthetic spelling tasks built like nanochat's at 48abd7d (offline): SpellingBee and SimpleSpelling.

SpellingBee asks how many times a letter occurs in a word, in one of many phrasings in seven
languages; the answer spells the word out, counts by hand, checks with the calculator tool
(`'word'.count('l')`) and ends in `#### n`, in the same five parts as nanochat's. SimpleSpelling
asks "Spell the word: WORD" and answers `word:w,o,r,d`.

Words: every lowercase alphabetic word of the `english-words` package's web2 and GCIDE lists
(about 263K; nanochat downloads dwyl's words_alpha.txt, about 370K, which offline installs
cannot). Unlike nanochat, whose test problems are drawn from the same words with other seeds,
words are split between train and test by a CRC32 of the word, so test words are never
trained on. Example i of a (split, seed) is the same on every machine.
"""

from __future__ import annotations

import functools
import random
import zlib

from ..common import RustchatError
from ..tools import calculate
from .base import Task, answers_match, assistant_text, extract_answer

ALPHABET = "abcdefghijklmnopqrstuvwxyz"

# Phrasings of "how many <letter> in <word>", in English and six other languages (nanochat's
# 51 at 48abd7d span the same languages). No trailing "?" here: one is added to half of the questions.
BEE_TEMPLATES = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "How many times does {letter} occur in the word {word}",
    "Count the number of {letter} in {word}",
    "Count how many {letter} there are in the word {word}",
    "In the word {word}, how many {letter} are there",
    "What is the count of the letter {letter} in {word}",
    "How often does {letter} show up in {word}",
    "Tell me how many {letter}'s are in {word}",
    "How many {letter}s does {word} have",
    "How many letter {letter} does the word {word} contain",
    "Find the number of times {letter} appears in {word}",
    "Can you count the {letter} in {word}",
    "What's the number of {letter} in the word {word}",
    "Number of {letter} in {word}",
    "Count every {letter} in {word}",
    "¿Cuántas {letter} hay en la palabra {word}",
    "¿Cuántas veces aparece la {letter} en {word}",
    "Cuenta las {letter} en {word}",
    "Combien de {letter} dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind im Wort {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "单词{word}中有几个{letter}",
    "{word}里有多少个{letter}",
    "数一数{word}中的{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}라는 단어에 {letter}는 몇 번 나오나요",
    "{word}に{letter}はいくつありますか",
    "{word}の中に{letter}は何回出てきますか",
)
SPELL_TEMPLATE = "Spell the word: {word}"


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    """{"train": words, "test": words}: the lowercase alphabetic words, sorted, split ~90/10."""
    try:
        from english_words import get_english_words_set  # loads its word lists on import
    except ImportError:
        raise RustchatError("the spelling tasks need the english-words package (pip install english-words)") from None
    words = sorted(
        w for w in get_english_words_set(["web2", "gcide"], lower=True, alpha=True) if w.isascii() and w.isalpha()
    )
    test = tuple(w for w in words if zlib.crc32(w.encode()) % 10 == 0)
    train = tuple(w for w in words if zlib.crc32(w.encode()) % 10 != 0)
    return {"train": train, "test": test}


class _WordTask(Task):
    def __init__(self, size: int = 1000, split: str = "train", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise RustchatError(f"{type(self).__name__} split must be train or test, got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise RustchatError(f"{type(self).__name__} size must be a non-negative int, got {size!r}")
        self.size, self.split, self.seed = size, split, seed
        self.words = word_lists()[split]

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # str seeds hash with sha512: stable across runs and machines (unlike hash())
        return random.Random(f"{type(self).__name__}/{self.split}/{self.seed}/{index}")


def spelling_bee_answer(word: str, letter: str) -> list[dict]:
    """The assistant parts for "how many `letter` in `word`", split as nanochat (48abd7d) splits them:
    the manual count, the lead-in to the check, the python call, its output, the final answer."""
    expr = f"'{word}'.count('{letter}')"
    count = calculate(expr)  # the very tool the engine runs, so training shows its real output
    lines = [
        f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.",
        "",
        "First spell the word out:",
        f"{word}:{','.join(word)}",
        "",
        f"Then count the occurrences of '{letter}':",
    ]
    running = 0
    for i, ch in enumerate(word, 1):
        if ch == letter:
            running += 1
            lines.append(f"{i}:{ch} hit! count={running}")
        else:
            lines.append(f"{i}:{ch}")
    lines += ["", f"This gives us {running}."]
    return [
        {"type": "text", "text": "\n".join(lines)},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": expr},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class SpellingBee(_WordTask):
    """How many times does a letter occur in a word (generative; checked by the `#### n` number)."""

    name = "SpellingBee"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        # mostly letters of the word, sometimes absent ones so 0 is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)
        template = rng.choice(BEE_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
        user = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user += "?"
        return {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": spelling_bee_answer(word, letter)},
            ],
            "word": word,
            "letter": letter,
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(extract_answer(assistant_text(conversation)), extract_answer(completion))


class SimpleSpelling(_WordTask):
    """Spell a word letter by letter: answer `word:w,o,r,d` (generative; exact match)."""

    name = "SimpleSpelling"

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": SPELL_TEMPLATE.format(word=word)},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ],
            "word": word,
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == assistant_text(conversation).strip()
