"""Triton kernels with plain-PyTorch references (filled in by the kernels work)."""
