"""FP8 training of the transformer's matmuls (`rustchat base --fp8`), tensorwise scaling.

Each of a Linear's three matmuls (output = x W^T; grad_x = grad_out W; grad_W = grad_out^T x)
runs in FP8 on the GPU's FP8 tensor cores (torch._scaled_mm): every operand is scaled by one
number per tensor, scale = FP8_MAX / max|tensor|, clamped to the format's range and cast; the
matmul multiplies by the inverse scales on the way out. Inputs and weights use e4m3 (more
mantissa), gradients e5m2 (more range). Weights stay in their own dtype (fp32 master weights):
only the matmuls see FP8. The backward matmuls accumulate exactly (no fast accumulation).

Only matrices the hardware takes are converted: both sides multiples of 16, and at least 128
(smaller ones gain nothing). In eval mode a converted layer is a plain Linear again, so
validation and sampling are unaffected. Off CUDA, `scaled_mm` emulates the FP8 product
(dequantize, then matmul), which is what the CPU tests check the scaling math with.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import RustchatError

EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90), Blackwell


def fp8_refusal(device) -> str | None:
    """Why --fp8 cannot run on `device` (one line), or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"--fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
            f"Blackwell); this run is on {device.type}"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (
            f"--fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}"
        )
    if not hasattr(torch, "_scaled_mm"):
        return f"--fp8 needs torch._scaled_mm, which torch {torch.__version__} lacks"
    return None


@torch.no_grad()
def quantize(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise dynamic scaling -> (x in fp8_dtype, inverse scale as a 0-d fp32 tensor)."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.float().abs().max()
    # the division in float64, as torchao does: eager and compiled code agree on the scale
    scale = (fp8_max / amax.double().clamp(min=EPS)).float()
    # clamp before the cast: casting saturates nothing, an overflow would become NaN
    x8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x8, scale.reciprocal()


def dequantize(x8: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * inv_scale


def scaled_mm(a8, b8, a_inv, b_inv, out_dtype, fast_accum: bool) -> torch.Tensor:
    """a8 @ b8 rescaled by a_inv * b_inv: torch._scaled_mm on CUDA (b8 column-major), an fp32
    emulation elsewhere."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return (dequantize(a8, a_inv) @ dequantize(b8, b_inv)).to(out_dtype)


def _col_major(x: torch.Tensor) -> torch.Tensor:
    # _scaled_mm wants its second operand column-major: same shape, transposed strides
    return x.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """input_2d [B, K] @ weight [N, K]^T with all three matmuls in FP8."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inv = quantize(x, torch.float8_e4m3fn)
        w8, w_inv = quantize(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w8 is [N, K] row-major, so w8.t() is [K, N] column-major: no copy
        return scaled_mm(x8, w8.t(), x_inv, w_inv, x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = quantize(grad_out.contiguous(), torch.float8_e5m2)  # row-major for _scaled_mm
        grad_x = scaled_mm(g8, _col_major(w8), g_inv, w_inv, grad_out.dtype, fast_accum=False)
        grad_w = scaled_mm(g8.t().contiguous(), _col_major(x8), g_inv, x_inv, grad_out.dtype, fast_accum=False)
        return grad_x, grad_w.to(ctx.weight_dtype)


class FP8Linear(nn.Linear):
    """nn.Linear whose training matmuls run in FP8 (same weight and bias tensors)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if x.is_cuda and x.dtype == torch.float32:  # _scaled_mm's output dtype: bf16 like autocast
            x = x.to(torch.bfloat16)
        shape = x.shape
        out = _FP8Matmul.apply(x.reshape(-1, shape[-1]).contiguous(), self.weight)
        out = out.reshape(*shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_linear(cls, mod: nn.Linear) -> "FP8Linear":
        with torch.device("meta"):  # a shell; the parameters are the original module's
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight = mod.weight
        new.bias = mod.bias
        return new


def fp8_eligible(mod: nn.Module) -> bool:
    return (
        isinstance(mod, nn.Linear)
        and mod.in_features % 16 == 0
        and mod.out_features % 16 == 0
        and min(mod.in_features, mod.out_features) >= 128
    )


def convert_to_fp8(module: nn.Module) -> tuple[int, int]:
    """Swap every eligible nn.Linear under `module` for an FP8Linear sharing its parameters
    (state_dict names unchanged). Returns (converted, Linear layers in all)."""
    total = sum(1 for m in module.modules() if isinstance(m, nn.Linear))
    done = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if fp8_eligible(child) and not isinstance(child, FP8Linear):
                setattr(parent, name, FP8Linear.from_linear(child))
                done += 1
    return done, total


def enable_fp8(model, device) -> str:
    """Convert the model's transformer blocks for FP8 training, or refuse in one line. Returns
    the banner line. The head stays as it is: the fused loss kernel reads its weight directly."""
    reason = fp8_refusal(device)
    if reason is not None:
        raise RustchatError(reason)
    done, total = convert_to_fp8(model.transformer.h)
    return f"== fp8: tensorwise scaling, {done}/{total} block matmuls in FP8 (the rest too small)"


__all__ = ["FP8Linear", "convert_to_fp8", "dequantize", "enable_fp8", "fp8_refusal", "quantize", "scaled_mm"]
