"""rustchat: train small chat models end to end with a Rust core and Triton kernels."""
from . import _core  # noqa: F401
