"""FlashAttention-3 against SDPA on CUDA (run by scripts/gpu_check.sh; needs a GPU).

Attention alone (bf16, causal, with and without a sliding window, GQA) and a whole 2026-model
training step (loss and gradients) must agree between the FA3 path and the SDPA-with-mask path.
Prints "skipped" with the reason and exits 0 when FA3 cannot be loaded (no `kernels` package, no
cached build, no internet to fetch one: on a machine without a network, point kernels'
LOCAL_KERNELS at a copied build, e.g. LOCAL_KERNELS=varunneal/flash-attention-3=/path/to/build)."""

import sys

import torch

from rustchat import attention
from rustchat.model import GPT, GPTConfig


def main() -> int:
    if not torch.cuda.is_available():
        print("FA3 check: no CUDA; skipped")
        return 0
    if attention._load_fa3() is None:
        print(f"FA3 check: FlashAttention-3 cannot be loaded here ({attention._STATE['fa3_error']}); skipped")
        return 0
    print("attention backend:", attention.backend_name("cuda"))
    torch.manual_seed(0)
    worst = 0.0
    for B, T, H, Hkv, D in ((2, 1024, 8, 8, 128), (2, 1000, 8, 2, 64)):
        for window in (None, 256, 100):
            q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
            fa3 = attention.fa3_causal(q, k, v, window).float()
            sdpa = (
                attention.causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, H != Hkv)
                .transpose(1, 2)
                .float()
            )
            err = (fa3 - sdpa).abs().max().item()
            worst = max(worst, err)
            print(f"  B{B} T{T} H{H}/{Hkv} D{D} window {window}: max |FA3 - SDPA| = {err:.2e}")
    ok = worst < 2e-2  # bf16 outputs of two kernels with different summation orders

    cfg = GPTConfig.from_depth(4, vocab_size=4096, sequence_len=1024, head_dim=64, arch="2026")
    model = GPT(cfg).cuda()
    with torch.no_grad():  # every weight random, so every path carries signal
        for p in model.parameters():
            p.normal_(0, 0.5 * p.size(-1) ** -0.5)
    x = torch.randint(0, 4096, (2, 1024), device="cuda")
    y = torch.randint(0, 4096, (2, 1024), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    loss_fa3, g_fa3 = step()
    fa3_fn = attention._STATE["fa3"]
    attention._STATE["fa3"] = None  # the SDPA path, windows as masks
    loss_sdpa, g_sdpa = step()
    attention._STATE["fa3"] = fa3_fn
    rel = max(((g_fa3[n] - g_sdpa[n]).norm() / (g_sdpa[n].norm() + 1e-12)).item() for n in g_sdpa)
    print(f"2026 model step: loss FA3 {loss_fa3:.5f} vs SDPA {loss_sdpa:.5f}; worst relative grad difference {rel:.2e}")
    ok = ok and abs(loss_fa3 - loss_sdpa) < 1e-2 and rel < 5e-2
    print("FA3 check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
