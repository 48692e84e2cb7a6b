"""Triton kernels with plain-PyTorch references beside them (backend="torch").

backend="auto" uses Triton on CUDA tensors (or under TRITON_INTERPRET=1), else the torch reference.
"""

from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .rotary import apply_rotary, rotary_tables

__all__ = ["cross_entropy", "linear_cross_entropy", "apply_rotary", "rotary_tables"]
