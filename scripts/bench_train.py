#!/usr/bin/env python
"""Training-step throughput: rustchat (kernels) vs the same model + optimizers in plain PyTorch.

One step = forward + backward + all optimizer steps. "plain" is the eager reference: full fp32
logits + softcap + F.cross_entropy, rotary by torch ops, Muon Newton-Schulz in bf16 (as
nanochat 48abd7d). Both run in the same process with the same weights and batches, steps alternating
so a noisy machine slows both alike.

  python scripts/bench_train.py                      # CPU: d4, vocab 65536, 4x512, half ignored
  python scripts/bench_train.py --device cuda        # d10 and d20, tokens/s and MFU (H100 bf16)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rustchat.runtime import autocast_ctx, autodetect_device, device_type, setup_cpu_math, synchronize
from rustchat.model import GPT, GPTConfig
from rustchat.optim import build_optimizers

H100_BF16_PEAK = 989e12


def make_batch(B, T, vocab, ignore_frac, device, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[:, : int(T * ignore_frac)] = -1  # like a prompt that is not trained on
    return idx.to(device), targets.to(device)


def build(cfg, device, use_kernels, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(cfg, use_kernels=use_kernels)
    # plain = the reference's bf16 orthogonalisation; ours = per-device default (fp32 on CPU)
    opts = build_optimizers(model, ortho_dtype=None if use_kernels else torch.bfloat16)
    return model, opts


def train_step(model, opts, idx, targets, device):
    with autocast_ctx(device):
        loss = model(idx, targets)
    loss.backward()
    for opt in opts:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def bench_depth(args, depth, device):
    cfg = GPTConfig.from_depth(depth, vocab_size=args.vocab, sequence_len=args.seq)
    B, T = args.batch, args.seq
    runs = {}
    for name, use_kernels in (("ours", True), ("plain", False)):
        if args.only in (None, name):
            runs[name] = build(cfg, device, use_kernels)
    n_params = next(iter(runs.values()))[0].num_params()
    flops_per_token = next(iter(runs.values()))[0].estimate_flops(T)
    print(
        f"d{depth}: {n_params / 1e6:.1f}M params, n_embd {cfg.n_embd}, heads {cfg.n_head}, "
        f"vocab {cfg.vocab_size}, batch {B}x{T}, {args.ignore_frac:.0%} targets ignored, device {device}"
    )
    times = {name: [] for name in runs}
    first_loss = {}
    for step in range(args.warmup + args.steps):
        idx, targets = make_batch(B, T, cfg.vocab_size, args.ignore_frac, device, seed=step)
        for name, (model, opts) in list(runs.items()):
            synchronize(device)
            t0 = time.perf_counter()
            try:
                loss = train_step(model, opts, idx, targets, device)
            except torch.OutOfMemoryError:
                print(f"  {name}: out of memory at batch {B}x{T}; try a smaller --batch")
                model.zero_grad(set_to_none=True)
                del runs[name], times[name]
                continue
            synchronize(device)
            dt = time.perf_counter() - t0
            if step == 0:
                first_loss[name] = loss.item()
            if step >= args.warmup:
                times[name].append(dt)
    tps = {}
    for name, ts in times.items():
        if not ts:
            continue
        t = statistics.median(ts)
        tps[name] = B * T / t
        line = (
            f"  {name:5s} {tps[name]:12,.0f} tokens/s  ({t * 1e3:8.1f} ms/step median of {len(ts)}, "
            f"first loss {first_loss[name]:.4f})"
        )
        if device_type(device) == "cuda":
            line += f"  MFU {tps[name] * flops_per_token / H100_BF16_PEAK:.1%} (of H100 bf16 989 TFLOP/s)"
        print(line)
    if "ours" in tps and "plain" in tps:
        print(f"  ratio ours/plain: {tps['ours'] / tps['plain']:.2f}x")
    return tps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    ap.add_argument(
        "--depth", type=int, action="append", help="model depth (repeatable); default 4 on CPU, 10 and 20 on CUDA"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 4 CPU, 16 CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 512 CPU, 2048 CUDA)")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--ignore-frac", type=float, default=0.5, help="fraction of targets set to -1")
    ap.add_argument("--only", choices=["ours", "plain"], default=None, help="run one side only")
    ap.add_argument("--json", default=None, help="write tokens/s per depth and side to this file")
    args = ap.parse_args(argv)

    device = autodetect_device(args.device)
    cuda = device_type(device) == "cuda"
    args.depth = args.depth or ([10, 20] if cuda else [4])
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.batch = args.batch or (16 if cuda else 4)
    args.seq = args.seq or (2048 if cuda else 512)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        setup_cpu_math()  # flush denormals, for both sides (as the trainers do on CPU)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {}
    for depth in args.depth:
        results[f"d{depth}"] = bench_depth(args, depth, device)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "tokens_per_s": results}, f, indent=1)


if __name__ == "__main__":
    main()
