"""rustchat: train small chat models end to end with a Rust core and Triton kernels.

`import rustchat` gives the tokenizer (Rust core); the training stack, kernels and tasks are
submodules (`rustchat.kernels`, `rustchat.model`, ...) imported on demand, so the tokenizer
stays usable without torch.
"""
from . import _core
from .conversation import collate_sft, pack_rows
from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

__version__ = "0.1.0"

__all__ = ["Tokenizer", "SPLIT_PATTERN", "SPECIAL_TOKENS", "collate_sft", "pack_rows", "kernels", "__version__"]


def __getattr__(name):
    # `rustchat.kernels` without importing torch at `import rustchat` time.
    if name == "kernels":
        import importlib

        return importlib.import_module(".kernels", __name__)
    raise AttributeError(f"module 'rustchat' has no attribute {name!r}")
