"""Read nanochat's `tokenizer.pkl` (a pickled `tiktoken.Encoding`) WITHOUT running code from it.

A normal `pickle.load` would import and call whatever the file names. Here the unpickler
resolves exactly one global, `tiktoken.core.Encoding`, to an inert stand-in that only records
the state tiktoken pickles (name, pat_str, mergeable_ranks, special_tokens); every other
global is refused. The state then goes through `Tokenizer.from_ranks`.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from .common import RustchatError


class _EncodingState:
    """Stands in for tiktoken.Encoding during unpickling; holds its state dict."""

    def __setstate__(self, state):
        self.state = state


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a tokenizer pickle")


def load_nanochat_tokenizer(path: str | Path):
    from .tokenizer import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise RustchatError(f"{p}: nanochat tokenizer.pkl not found")
    try:
        obj = _SafeUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise RustchatError(f"{p}: not a pickled tiktoken Encoding ({e})") from None
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise RustchatError(f"{p}: pickles the registered tiktoken encoding {state!r} by name; "
                            "load it with Tokenizer.from_tiktoken(tiktoken.get_encoding(name))")
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise RustchatError(f"{p}: unexpected tokenizer pickle contents")
    return Tokenizer.from_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])
