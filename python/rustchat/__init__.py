"""rustchat: train small chat models end to end with a Rust core and Triton kernels.

`import rustchat` gives the tokenizer and the conversation tools (Rust core, no torch);
`rustchat.load_model(...)` and the training stack (`rustchat.model`, `rustchat.kernels`, ...)
load torch when first used, so the tokenizer stays usable and fast to import without it.
"""

from importlib import import_module

from . import _core as _core  # the extension, importable as rustchat._core
from .conversation import collate_sft, pack_rows
from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Tokenizer",
    "SPLIT_PATTERN",
    "SPECIAL_TOKENS",
    "collate_sft",
    "pack_rows",
    "load_model",
    "kernels",
    "__version__",
]


def __getattr__(name):
    # torch-backed names resolve on first use, not at `import rustchat`
    if name == "load_model":
        return import_module(".checkpoint", __name__).load_model
    if name == "kernels":
        return import_module(".kernels", __name__)
    raise AttributeError(f"module 'rustchat' has no attribute {name!r}")
