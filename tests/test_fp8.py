"""FP8 training's scaling math on the CPU, against a float64 reference of tensorwise scaling
(the FP8 product itself needs FP8 tensor cores: scripts/gpu_check.sh measures it)."""

import pytest
import torch
import torch.nn as nn

from rustchat.common import RustchatError
from rustchat.fp8 import FP8Linear, convert_to_fp8, dequantize, enable_fp8, fp8_refusal, quantize
from rustchat.model import GPT, GPTConfig

FORMATS = {torch.float8_e4m3fn: (448.0, 3), torch.float8_e5m2: (57344.0, 2)}  # max, mantissa bits


def ref_quantize(x: torch.Tensor, fmt) -> tuple[torch.Tensor, float]:
    """Tensorwise scaling in float64: s = max / amax; x*s rounded to the nearest value of the
    format (round half to even on its grid), saturated at +-max. Returns (values, 1/s)."""
    fmax, mbits = FORMATS[fmt]
    x = x.double()
    s = fmax / max(float(x.abs().max()), 1e-12)
    y = (x * s).clamp(-fmax, fmax)
    # the grid spacing at |y|: 2^(floor(log2|y|) - mbits), never below the subnormal step
    min_exp = -6 if fmt == torch.float8_e4m3fn else -14
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0**min_exp))).clamp_min(min_exp)
    step = torch.pow(2.0, e - mbits)
    return torch.round(y / step) * step, 1.0 / s


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantize_matches_float64_tensorwise_scaling(fmt):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    for scale in (1e-3, 1.0, 300.0):
        x = torch.randn(64, 48, generator=g) * scale
        x[3, 5] = -7 * scale  # a clear amax, negative
        q, inv = quantize(x, fmt)
        assert q.dtype == fmt and inv.dtype == torch.float32 and inv.ndim == 0
        want, want_inv = ref_quantize(x, fmt)
        assert float(inv) == pytest.approx(want_inv, rel=1e-6)
        torch.testing.assert_close(q.double(), want, rtol=0, atol=0)
        # the amax lands exactly on the format's max; dequantized values are within half an ulp
        assert float(q.double().abs().max()) == FORMATS[fmt][0]
        rel = (dequantize(q, inv).double() - x.double()).abs() / x.double().abs().clamp_min(1e-30)
        big = x.abs() > x.abs().max() * 2.0**-6  # normal range of the scaled values
        assert float(rel[big].max()) <= 2.0 ** -(FORMATS[fmt][1] + 1) * 1.0001


def test_quantize_all_zero_and_saturation():
    q, inv = quantize(torch.zeros(4, 4), torch.float8_e4m3fn)
    assert torch.equal(q.float(), torch.zeros(4, 4)) and torch.isfinite(inv)
    assert bool(torch.isfinite(q.float()).all())


def test_fp8_linear_forward_backward_equal_quantized_reference():
    """FP8Linear's three matmuls (on the CPU, the emulated FP8 product) equal float64 matmuls of
    the tensorwise-quantized operands: inputs and weights e4m3, the output gradient e5m2."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    lin = nn.Linear(128, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 128, generator=g) * 0.05)
    f8 = FP8Linear.from_linear(lin)
    assert f8.weight is lin.weight
    x = torch.randn(3, 5, 128, generator=g, requires_grad=True)
    out = f8(x)
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    xq, xi = ref_quantize(x.detach().reshape(-1, 128), torch.float8_e4m3fn)
    wq, wi = ref_quantize(lin.weight.detach(), torch.float8_e4m3fn)
    gq, gi = ref_quantize(go.reshape(-1, 256), torch.float8_e5m2)
    X, W, G = xq * xi, wq * wi, gq * gi
    torch.testing.assert_close(out.detach().double().reshape(-1, 256), X @ W.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().reshape(-1, 128), G @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad.double(), G.T @ X, rtol=1e-5, atol=1e-5)
    # and FP8 stays close to the exact product (a few percent: 3 mantissa bits)
    exact = x.detach().reshape(-1, 128) @ lin.weight.detach().T
    assert float((out.detach().reshape(-1, 256) - exact).norm() / exact.norm()) < 0.08
    f8.eval()  # evaluation runs the plain matmul
    with torch.no_grad():
        torch.testing.assert_close(f8(x), lin(x))


def test_convert_keeps_names_and_only_takes_large_multiples_of_16():
    model = GPT(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, arch="2026"))  # 128 wide
    names = list(model.state_dict())
    done, total = convert_to_fp8(model.transformer.h)
    assert list(model.state_dict()) == names
    eligible = [m for m in model.transformer.h.modules() if isinstance(m, FP8Linear)]
    assert done == len(eligible) > 0 and total > done  # the value-embedding gates (12 -> heads) are too small
    assert all(min(m.in_features, m.out_features) >= 128 for m in eligible)


def test_fp8_is_refused_off_fp8_gpus_in_one_line():
    why = fp8_refusal("cpu")
    assert why and "\n" not in why and "compute capability 8.9" in why and "cpu" in why
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=128))
    with pytest.raises(RustchatError, match="--fp8 needs"):
        enable_fp8(model, "cpu")
