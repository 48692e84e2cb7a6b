"""The rustchat tokenizer: byte-level BPE trained and run by the Rust core.

Semantics follow tiktoken (a token's id is its rank; encoding merges the lowest-ranked pair
first), so any tiktoken vocabulary loads with `Tokenizer.from_ranks` and ours exports with
`to_tiktoken()`, giving identical ids. Text with lone surrogates (no UTF-8 form) is handled
as tiktoken's `encode` handles it, by every method that takes text (encoding, batches,
`split`, `train`): each lone surrogate becomes U+FFFD.

On-disk format (`save` / `load`, no pickle): a directory with
  tokenizer.json   {"format": "rustchat-bpe", "version": 1, "pattern": ..., "special_tokens": {name: id}}
  ranks.tiktoken   one token per line, "<base64 bytes> <rank>" (tiktoken's own format)
"""

from __future__ import annotations

import base64
import gc
import json
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from . import _core
from . import conversation as rendering  # the module; methods below take a `conversation` argument
from .common import RustchatError, get_base_dir

SPLIT_PATTERN: str = _core.DEFAULT_PATTERN
# The 9 special tokens in their fixed order (docs/design.md, "Tokenizer") (defined once, in the Rust renderer that relies on them).
SPECIAL_TOKENS: list[str] = list(_core.SPECIAL_TOKENS)

_FORMAT = "rustchat-bpe"
_VERSION = 1
# Ids (ranks, special tokens, vocab_size) must be below this: the core's per-id tables are dense.
MAX_VOCAB: int = _core.MAX_VOCAB
# Documents are handed to the Rust counter in batches of about this many characters: big
# enough to keep all cores busy, small enough to keep the stream's memory flat.
_TRAIN_BATCH_CHARS = 8_000_000


def _ids_to_buffer(ids) -> bytes:
    """Any sequence of ints (list, numpy, torch) -> little-endian u32 bytes, range-checked."""
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch tensor, without importing torch
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return b""
    if arr.ndim != 1:
        arr = arr.reshape(-1) if arr.ndim == 0 else arr
        if arr.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype == object or arr.dtype.kind == "b":
            bad = next((x for x in arr.tolist() if not isinstance(x, int) or isinstance(x, bool)), None)
            raise ValueError(f"ids must be integers, found {bad!r}")
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        pos = int(np.argmax(arr < 0))
        raise ValueError(f"invalid token id {int(arr[pos])} at position {pos}")
    if arr.size and int(arr.max()) > 0xFFFFFFFF:
        pos = int(np.argmax(arr > 0xFFFFFFFF))
        raise ValueError(f"invalid token id {int(arr[pos])} at position {pos}")
    return arr.astype("<u4", copy=False).tobytes()


class Tokenizer:
    """A BPE tokenizer backed by the Rust core. Build with `train`, `from_ranks` or `load`."""

    def __init__(self, core: "_core.CoreTokenizer"):
        self._core = core
        self._special = dict(core.specials())

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_ranks(
        cls, mergeable_ranks: Mapping[bytes, int], pattern: str, special_tokens: Mapping[str, int] | None = None
    ) -> "Tokenizer":
        """Load any tiktoken-style vocabulary (token bytes -> rank), e.g. GPT-4's."""
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, not {type(pattern).__name__}")
        ranks = []
        for tok, rank in mergeable_ranks.items():
            if not isinstance(tok, (bytes, bytearray)):
                raise TypeError(f"mergeable_ranks keys must be bytes, found {type(tok).__name__}: {tok!r}")
            if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
                raise ValueError(f"rank of {bytes(tok)!r} must be a non-negative int, got {rank!r}")
            if rank >= MAX_VOCAB:
                raise ValueError(f"rank of {bytes(tok)!r} is {rank}, too large: ids must be below {MAX_VOCAB}")
            ranks.append((bytes(tok), int(rank)))
        specials = []
        for name, i in (special_tokens or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"special token names must be str, found {name!r}")
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
                raise ValueError(f"special token {name!r} has invalid id {i!r}")
            if i >= MAX_VOCAB:
                raise ValueError(f"special token {name!r} has id {i}, too large: ids must be below {MAX_VOCAB}")
            specials.append((name, int(i)))
        return cls(_core.CoreTokenizer(ranks, pattern, specials))

    @classmethod
    def from_tiktoken(cls, enc) -> "Tokenizer":
        """Take a `tiktoken.Encoding`'s ranks, pattern and special tokens."""
        return cls.from_ranks(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 65536,
        *,
        pattern: str = SPLIT_PATTERN,
        special_tokens: Iterable[str] = SPECIAL_TOKENS,
        doc_cap: int | None = 10_000,
        max_chars: int | None = None,
        verbose: bool = False,
        progress=None,
    ) -> "Tokenizer":
        """Train a BPE vocabulary of `vocab_size` ids (256 bytes + merges + specials).

        `texts` is consumed as a stream, in batches; at most `doc_cap` chars of each document and
        `max_chars` chars in all are used. Merge i gets id 256+i; ties go to the smaller pair;
        the special tokens follow the merges. `progress(chars_seen)` is called after each batch.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of str (one item per document), not a single string")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, not {type(vocab_size).__name__}")
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token names must be non-empty str, found {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError("special token names must be unique")
        if vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size={vocab_size} is too large: it must be at most {MAX_VOCAB}")
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must be at least 256 bytes + "
                f"{len(specials)} special tokens = {256 + len(specials)}"
            )
        for name, v in (("doc_cap", doc_cap), ("max_chars", max_chars)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        trainer = _core.BpeTrainer(pattern, doc_cap, max_chars)
        _feed_stream(trainer, texts, progress)
        merges = trainer.learn(n_merges, verbose)
        if len(merges) < n_merges:
            warnings.warn(
                f"the corpus supports only {len(merges)} merges, fewer than the {n_merges} asked for; "
                f"the vocabulary has {256 + len(merges) + len(specials)} ids",
                stacklevel=2,
            )
        # Built and checked here (merges have unique bytes, 2 or more each; the special names
        # were checked above), so straight to the core, past from_ranks' per-token checks in
        # Python (about 25 ms for 65k tokens).
        ranks = [(bytes([b]), b) for b in range(256)] + [(m, 256 + i) for i, m in enumerate(merges)]
        n = len(ranks)
        return cls(_core.CoreTokenizer(ranks, pattern, [(s, n + i) for i, s in enumerate(specials)]))

    # ----------------------------------------------------------------- encoding
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`; text that looks like a special token stays plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return self._core.encode_ordinary_list(text)

    def check_split_bounded(self, seconds: float = 1.0) -> None:
        """ValueError unless the split pattern runs in bounded time on adversarial text.

        The GPT-4-family and o200k patterns run on hand-written scanners (linear in any text).
        Any other pattern is a fancy-regex, which gives up (a ValueError) when one search
        backtracks past its limit, and can be quadratic below it. Such a pattern is run here on
        the inputs that make backtracking blow up: long runs of one character of each class,
        alone and before each kind of terminator, and alternating pairs; an error, or more
        than `seconds` on one of them (a linear pattern takes milliseconds), refuses it. A model
        whose pattern passes does not answer a user's text with a tokenizer error."""
        if self._core.fast_split:
            return
        chars = ["a", "A", "0", " ", "\n", "\t", ".", "'", "_", "-", "\u00e9", "\u4e2d", "\U0001f389", "\r\n"]
        probes = ["a" * 50_000 + "!", " " * 50_000 + "a"]
        for c in chars:
            probes.append(c * 2048)
            probes += [c * 2048 + t for t in ("!", "b", "B", "1", " ", "\n", "'", ".", "\u00e9")]
        probes += [p * 2048 for p in ("a ", "a1", "a.", ". ", " \n", "'s", "A a", "1.")]
        for text in probes:
            start = time.monotonic()
            try:
                self._core.encode_ordinary_list(text)
            except ValueError as e:
                raise ValueError(
                    f"split pattern {self.pattern[:120]!r} fails on {_describe(text)} ({str(e)[:120]}); "
                    "rustchat could not encode such a user text"
                ) from None
            if time.monotonic() - start > seconds:
                raise ValueError(
                    f"split pattern {self.pattern[:120]!r} takes over {seconds:g} s on {_describe(text)} "
                    "(catastrophic backtracking); rustchat could not answer such a user text in bounded time"
                )

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """Like `encode_ordinary`, as an int32 numpy array (no Python int per token)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return np.frombuffer(self._core.encode_ordinary(text), dtype="<i4")

    def split(self, text: str) -> list[str]:
        """The chunks the split pattern cuts `text` into (BPE never merges across them)."""
        return self._core.split(text)

    def _special_id(self, tok) -> int | None:
        if tok is None:
            return None
        if isinstance(tok, str):
            return self.encode_special(tok)
        if isinstance(tok, (int, np.integer)) and not isinstance(tok, bool):
            if not 0 <= int(tok) < self.vocab_size:
                raise ValueError(f"token id {tok} is out of range for a vocabulary of {self.vocab_size}")
            return int(tok)
        raise TypeError(f"prepend/append must be a special token name or an id, not {tok!r}")

    def encode(self, text: str, *, prepend=None, append=None) -> list[int]:
        """Ids of `text`, optionally with a token (special name or id) before and/or after."""
        ids = self.encode_ordinary(text)
        pre, post = self._special_id(prepend), self._special_id(append)
        if pre is not None:
            ids.insert(0, pre)
        if post is not None:
            ids.append(post)
        return ids

    def encode_batch_numpy(self, texts: list[str], *, prepend=None, append=None, num_threads: int | None = None):
        """Encode many texts in parallel (GIL released). Returns (ids int32, offsets int64):
        text i is ids[offsets[i]:offsets[i+1]]."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not a single str")
        if not isinstance(texts, list):
            texts = list(texts)
        pre, post = self._special_id(prepend), self._special_id(append)
        ids, offs = self._core.encode_batch(texts, pre, post, num_threads)
        return np.frombuffer(ids, dtype="<i4"), np.frombuffer(offs, dtype="<i8")

    def encode_batch(
        self, texts: list[str], *, prepend=None, append=None, num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many texts in parallel with all cores (or `num_threads`), GIL released."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str, not a single str")
        if not isinstance(texts, list):
            texts = list(texts)
        pre, post = self._special_id(prepend), self._special_id(append)
        # Building one list per text would trigger the cyclic GC over and over (it counts
        # container allocations); lists of ints cannot form cycles, so pause it meanwhile.
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._core.encode_batch_lists(texts, pre, post, num_threads)
        finally:
            if paused:
                gc.enable()

    def encode_special(self, name: str) -> int:
        """Id of a special token by name."""
        try:
            return self._special[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown special token {name!r}; known: {list(self._special)}") from None

    # ----------------------------------------------------------------- decoding
    def decode_bytes(self, ids) -> bytes:
        return self._core.decode_bytes(_ids_to_buffer(ids))

    def decode(self, ids) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, id: int) -> bytes:
        return self.decode_bytes([id])

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._core.n_vocab

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def pattern(self) -> str:
        return self._core.pattern

    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._core.ranks())

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length per id (int32), 0 for special tokens; for bits-per-byte."""
        return np.frombuffer(self._core.token_bytes(), dtype="<i4").copy()

    def to_tiktoken(self, name: str = "rustchat"):
        import tiktoken  # optional: only this export needs it

        return tiktoken.Encoding(
            name=name, pat_str=self.pattern, mergeable_ranks=self.mergeable_ranks(), special_tokens=self.special_tokens
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self._special)})"

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in self._core.ranks()]
        meta = {"format": _FORMAT, "version": _VERSION, "pattern": self.pattern, "special_tokens": self.special_tokens}
        # Write to temporary names, then rename: a crash never leaves a half-written tokenizer.
        for name, content in (("ranks.tiktoken", "".join(lines)), ("tokenizer.json", json.dumps(meta, indent=1))):
            tmp = d / f".{name}.tmp"
            tmp.write_text(content, encoding="utf-8")
            os.replace(tmp, d / name)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a directory written by `save`. A missing file raises FileNotFoundError, any other
        problem (not a regular file, too large, malformed) ValueError; each names the file."""
        d = Path(directory)
        meta_path, ranks_path = d / "tokenizer.json", d / "ranks.tiktoken"
        # far above real tokenizers (o200k's ranks are 3.6 MB), far below exhausting memory
        for p, max_bytes in ((meta_path, 1 << 20), (ranks_path, 256 << 20)):
            if not p.exists():
                raise FileNotFoundError(
                    f"{p}: not found (a tokenizer directory holds tokenizer.json and ranks.tiktoken)"
                )
            # is_file() follows links and is true only for regular files: a FIFO would hang
            # reading, a link to /dev/zero never end, so neither is opened
            if not p.is_file():
                raise ValueError(f"{p}: not a regular file (a directory, FIFO or device)")
            if p.stat().st_size > max_bytes:
                raise ValueError(f"{p}: {p.stat().st_size} bytes, more than a tokenizer file may have ({max_bytes})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{meta_path}: invalid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: field 'format' must be {_FORMAT!r}")
        if meta.get("version") != _VERSION:
            raise ValueError(f"{meta_path}: unsupported field 'version' {meta.get('version')!r} (expected {_VERSION})")
        for field, typ in (("pattern", str), ("special_tokens", dict)):
            if not isinstance(meta.get(field), typ):
                raise ValueError(f"{meta_path}: field {field!r} missing or not a {typ.__name__}")
        ranks = {}
        lineno = 0
        try:
            with open(ranks_path, encoding="ascii", errors="strict") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.split()
                    try:
                        if len(parts) != 2:
                            raise ValueError("expected '<base64> <rank>'")
                        tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                        if rank < 0:
                            raise ValueError(f"negative rank {rank}")
                    except Exception as e:  # noqa: BLE001 - rephrased with the location
                        raise ValueError(f"{ranks_path} line {lineno}: {e}") from None
                    if tok in ranks:
                        raise ValueError(f"{ranks_path} line {lineno}: token {tok!r} appears twice")
                    ranks[tok] = rank
        except UnicodeDecodeError:
            raise ValueError(f"{ranks_path} line {lineno + 1}: not ASCII text") from None
        try:
            return cls.from_ranks(ranks, meta["pattern"], meta["special_tokens"])
        except Exception as e:  # noqa: BLE001 - the core's refusal, said about the files it came from
            raise ValueError(f"{d}: tokenizer.json / ranks.tiktoken do not make a tokenizer: {e}") from None

    # ----------------------------------------------------------------- conversations
    def render_conversation(self, conversation, max_tokens: int | None = 2048):
        """(ids int32, mask uint8) of one conversation; see rustchat.conversation."""
        return rendering.render_conversation(self, conversation, max_tokens)

    def render_conversations(self, conversations, max_tokens: int | None = 2048, num_threads: int | None = None):
        """List of (ids, mask) pairs, rendered in parallel; see rustchat.conversation."""
        return rendering.render_conversations(self, conversations, max_tokens, num_threads)

    def render_for_completion(self, conversation, max_tokens: int | None = None):
        """int32 prompt ids: the conversation without its last (assistant) message, then
        <|assistant_start|>; see rustchat.conversation."""
        return rendering.render_for_completion(self, conversation, max_tokens)


def _feed_stream(trainer, texts: Iterable[str], progress) -> None:
    """Feed documents in batches; the next batch is gathered in Python while Rust counts the
    previous one with the GIL released."""
    result: dict = {}

    def run(batch):
        try:
            result["full"] = trainer.feed(batch)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    worker: threading.Thread | None = None
    batch: list[str] = []
    size = 0
    index = 0

    def wait():
        if worker is not None:
            worker.join()
            if "error" in result:
                raise result.pop("error")
            if progress is not None:
                progress(trainer.chars_seen)

    def flush(batch):
        nonlocal worker
        wait()
        worker = threading.Thread(target=run, args=(batch,), daemon=True)
        worker.start()

    for doc in texts:
        if not isinstance(doc, str):
            raise TypeError(f"texts item {index} is {type(doc).__name__}, expected str")
        batch.append(doc)
        size += len(doc)
        index += 1
        if size >= _TRAIN_BATCH_CHARS:
            flush(batch)
            batch, size = [], 0
            if result.get("full"):
                break
    if batch and not result.get("full"):
        flush(batch)
    wait()


def _describe(text: str) -> str:
    """A probe text in a few words: "'a' * 2048 + '!'"."""
    head = text[0]
    run = len(text) - len(text.lstrip(head))
    return f"{head!r} * {run}" + (f" + {text[run:][:8]!r}" if run < len(text) else "")


def load_tokenizer(base_dir=None, *, directory=None) -> Tokenizer:
    """The tokenizer trained into <base dir>/tokenizer (the one every stage of a run shares), or
    the one saved in `directory`; any problem with its files is a one-line RustchatError."""
    d = (
        Path(directory)
        if directory is not None
        else Path(base_dir if base_dir is not None else get_base_dir(create=False)) / "tokenizer"
    )
    if not (d / "tokenizer.json").exists():
        raise RustchatError(
            f"no tokenizer at {d}: run `rustchat tok train --input FILES --out {d}` first "
            "(offline, rustchat speedrun --preset tiny trains one on bundled text)"
        )
    try:
        return Tokenizer.load(d)
    except (ValueError, FileNotFoundError) as e:  # their messages start with the file
        raise RustchatError(str(e)) from None
    except OSError as e:
        raise RustchatError(f"{e.filename or d}: cannot read the tokenizer ({e.strerror or e})") from None
