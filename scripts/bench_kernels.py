#!/usr/bin/env python
"""Benchmark rustchat's Triton kernels against PyTorch eager, torch.compile and Liger-Kernel.

    python scripts/bench_kernels.py [--json OUT] [--reps 20] [--no-compile] [--no-liger]

On a CUDA machine it
  1. checks correctness on CUDA (ours vs a float64 reference, small shapes) and stops if that fails;
  2. measures the card's device-to-device copy bandwidth (the roofline for memory-bound kernels);
  3. times fwd+bwd (median of --reps runs, CUDA events) and peak memory
     (torch.cuda.max_memory_allocated minus what was allocated before) for
       cross_entropy         logits [16384, 65536] bf16, softcap 15, half of the targets ignored
       linear_cross_entropy  hidden [16384, 1280] bf16, weight [65536, 1280] bf16, same targets
       apply_rotary          q, k [8, 2048, 10, 128] bf16
     for ours / eager (logits fp32 -> softcap -> F.cross_entropy) / torch.compile of the same /
     Liger-Kernel (only if `import liger_kernel` works);
  4. prints the target ratios: CE fwd+bwd >= 80% of copy bandwidth (and its share of the
     3.35 TB/s H100 HBM peak, target >= 85%), linear CE peak memory <= 1/8 of eager at time <=
     eager, rotary fwd+bwd >= 80% of copy bandwidth. scripts/kernel_cost.py predicts the same
     figures statically; scripts/gpu_check.sh prints both side by side.
Without CUDA it runs a tiny CPU sanity check, says so, and exits 0. Never downloads anything.

Byte accounting ("bytes it must move"):
  CE fwd+bwd: read the logits of the trained rows once (n_valid*V*2) + write the gradient of every
    row once (N*V*2). Loss and gradient are computed in the same pass (the backward only scales).
  rotary fwd+bwd: read q, k and write q_out, k_out (forward), read dq_out, dk_out and write dq, dk
    (backward): 8 * numel(q) * 2 bytes for q and k of equal shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from rustchat.kernels import apply_rotary, cross_entropy, linear_cross_entropy, rotary_tables
except ImportError:  # running from a source checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kernels import apply_rotary, cross_entropy, linear_cross_entropy, rotary_tables  # type: ignore

SOFTCAP = 15.0
DEV = "cuda"  # "cpu" only for --dry-run-cpu (exercises this script without a GPU)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def eager_ce(logits, targets, softcap=SOFTCAP):
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=-1)


def eager_linear_ce(hidden, weight, targets, softcap=SOFTCAP):
    return eager_ce(hidden @ weight.t(), targets, softcap)


def eager_rotary(q, k, cos, sin):
    return apply_rotary(q, k, cos, sin, backend="torch")


def ref64_ce(logits, targets, softcap, reduction="mean"):
    x = logits.detach().double().requires_grad_()
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)
    if reduction == "mean" and not bool((targets != -1).any()):
        loss = z.sum() * 0
    return loss, x


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() if b.numel() else 0.0


# --------------------------------------------------------------------------------------------
# correctness (small shapes) -- on CUDA, or on the CPU for the sanity check
# --------------------------------------------------------------------------------------------


def check_correctness(device, backend, log=print, vocabs=(1000, 32768 + 17)):
    """Returns a list of (name, rel_err, tol) and whether all passed."""
    results = []
    g = torch.Generator(device="cpu").manual_seed(int(time.time()) % (2**31))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def targets_for(N, V, n_ign):
        t = torch.randint(0, V, (N,), generator=g)
        t[0], t[1] = 0, V - 1
        t[torch.randperm(N - 2, generator=g)[:n_ign] + 2] = -1
        return t.to(device)

    # cross entropy
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for V in vocabs:
            for softcap in (None, SOFTCAP):
                for red in ("mean", "sum", "none"):
                    N = 64
                    logits = rnd(N, V, scale=4).to(dtype).requires_grad_()
                    t = targets_for(N, V, 20)
                    loss = cross_entropy(logits, t, softcap=softcap, reduction=red, backend=backend)
                    go = torch.randn_like(loss) if red == "none" else torch.tensor(1.7, device=device)
                    (gx,) = torch.autograd.grad(loss, (logits,), go)
                    rl, x64 = ref64_ce(logits, t, softcap, red)
                    (gr,) = torch.autograd.grad(rl, (x64,), go.double())
                    name = f"cross_entropy {str(dtype)[6:]} V={V} softcap={softcap} {red}"
                    results.append((name + " loss", rel_err(loss, rl), tol))
                    results.append((name + " grad", rel_err(gx, gr), tol))
    # all ignored
    logits = rnd(8, 1000).to(torch.bfloat16).requires_grad_()
    t = torch.full((8,), -1, device=device)
    loss = cross_entropy(logits, t, softcap=SOFTCAP, backend=backend)
    loss.backward()
    ok = loss.item() == 0.0 and bool((logits.grad == 0).all())
    results.append(("cross_entropy all-ignored -> 0 loss, 0 grad", 0.0 if ok else float("inf"), 0.0))

    # linear cross entropy
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for red in ("mean", "none"):
            N, D, V = 64, 64, 1000
            h = rnd(N, D).to(dtype).requires_grad_()
            w = rnd(V, D, scale=0.25).to(dtype).requires_grad_()
            t = targets_for(N, V, 20)
            loss = linear_cross_entropy(h, w, t, softcap=SOFTCAP, reduction=red, backend=backend)
            go = torch.randn_like(loss) if red == "none" else torch.tensor(0.7, device=device)
            gh, gw = torch.autograd.grad(loss, (h, w), go)
            h64 = h.detach().double().requires_grad_()
            w64 = w.detach().double().requires_grad_()
            z = SOFTCAP * torch.tanh((h64 @ w64.t()) / SOFTCAP)
            rl = F.cross_entropy(z, t, ignore_index=-1, reduction=red)
            rgh, rgw = torch.autograd.grad(rl, (h64, w64), go.double())
            name = f"linear_cross_entropy {str(dtype)[6:]} {red}"
            results.append((name + " loss", rel_err(loss, rl), tol))
            results.append((name + " grad_hidden", rel_err(gh, rgh), tol))
            results.append((name + " grad_weight", rel_err(gw, rgw), tol))

    # rotary (GQA, offset, position_ids)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        B, T, Hq, Hkv, D = 2, 16, 4, 2, 64
        cos, sin = rotary_tables(64, D, device=device)
        for kw in ({"offset": 5}, {"position_ids": torch.randint(0, 64, (B, T), generator=g).to(device)}):
            q = rnd(B, T, Hq, D).to(dtype).requires_grad_()
            k = rnd(B, T, Hkv, D).to(dtype).requires_grad_()
            qo, ko = apply_rotary(q, k, cos, sin, backend=backend, **kw)
            gq, gk = torch.autograd.grad((qo, ko), (q, k), (qo.detach(), ko.detach()))
            rq, rk = _rotary64(q, k, cos, sin, kw)
            name = f"rotary {str(dtype)[6:]} {list(kw)[0]}"
            results.append((name + " q", rel_err(qo, rq), tol))
            results.append((name + " k", rel_err(ko, rk), tol))
            results.append((name + " inverse(q)", rel_err(gq, q), 2 * tol))
            results.append((name + " inverse(k)", rel_err(gk, k), 2 * tol))

    ok = True
    for name, err, tol in results:
        good = err <= tol
        ok &= good
        if not good:
            log(f"  FAIL {name}: rel err {err:.2e} > {tol:.0e}")
    log(f"  {sum(e <= t for _, e, t in results)}/{len(results)} correctness checks passed")
    return results, ok


def _rotary64(q, k, cos, sin, kw):
    c, s = cos.double(), sin.double()
    T = q.shape[1]
    if "position_ids" in kw:
        pos = kw["position_ids"]
        c, s = c[pos][:, :, None, :], s[pos][:, :, None, :]
    else:
        o = kw.get("offset", 0)
        c, s = c[o : o + T][None, :, None, :], s[o : o + T][None, :, None, :]

    def rot(x):
        x = x.detach().double()
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], -1)

    return rot(q), rot(k)


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------


def time_cuda(fn, reps, warmup=3):
    if DEV == "cpu":  # --dry-run-cpu
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mem(fn, clear):
    if DEV == "cpu":  # --dry-run-cpu: no allocator statistics
        fn()
        clear()
        return 0
    clear()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear()
    return peak


def copy_bandwidth(reps):
    """Device-to-device copy of a 1 GiB tensor: bytes read + written per second."""
    n = 1 << 29 if DEV == "cuda" else 1 << 20  # bf16 elements -> 1 GiB
    x = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x), reps)
    x = y = None  # free before empty_cache (the closures above are done with them)
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 2 / (ms * 1e-3) / 1e9, ms


def run_variants(variants, reps, clear, log, bytes_moved=None, flops=None):
    out = {}
    for name, fn in variants:
        try:
            ms = time_cuda(fn, reps)
            mem = peak_mem(fn, clear)
        except Exception as e:  # one failing baseline must not stop the benchmark
            log(f"    {name:<14} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            clear()
            torch.cuda.empty_cache() if DEV == "cuda" else None
            continue
        rec = {"ms": ms, "peak_mem_bytes": mem}
        line = f"    {name:<14} {ms:9.3f} ms   peak mem {mem / 2**30:7.3f} GiB"
        if bytes_moved:
            rec["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
            line += f"   {rec['gbps']:8.1f} GB/s"
        if flops:
            rec["tflops"] = flops / (ms * 1e-3) / 1e12
            line += f"   {rec['tflops']:7.1f} TFLOP/s"
        log(line)
        out[name] = rec
    return out


def liger_modules():
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return None, None
    ce = flce = None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        try:
            ce = LigerCrossEntropyLoss(ignore_index=-1, softcap=SOFTCAP)
        except TypeError:
            ce = None
    except Exception:
        ce = None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        try:
            flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-1, softcap=SOFTCAP)
        except TypeError:
            flce = None
    except Exception:
        flce = None
    return ce, flce


def _loss_of(x):
    if isinstance(x, (tuple, list)):
        return x[0]
    return getattr(x, "loss", x)


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


def bench_cross_entropy(args, copy_gbps, log):
    N, V = args.tokens, args.vocab
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device=DEV) * 3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[torch.randperm(N, device=DEV)[: N // 2]] = -1
    n_valid = int((targets != -1).sum())
    bytes_moved = n_valid * V * 2 + N * V * 2

    def clear():
        logits.grad = None

    def step(f):
        def run():
            logits.grad = None
            f(logits, targets).backward()

        return run

    variants = [("ours", step(lambda x, t: cross_entropy(x, t, softcap=SOFTCAP))), ("eager", step(eager_ce))]
    # the gradient written into the logits buffer (no [N, V] gradient buffer at all): own copy,
    # overwritten every run (by gradients: small finite values, the same work)
    ix = logits.detach().clone().requires_grad_()

    def run_inplace():
        ix.grad = None
        cross_entropy(ix, targets, softcap=SOFTCAP, grad_in_logits=True).backward()

    variants.append(("ours, grad_in_logits", run_inplace))
    if args.compile:
        variants.append(("torch.compile", step(torch.compile(eager_ce))))
    liger_ce, _ = liger_modules() if args.liger else (None, None)
    if liger_ce is not None:
        # Liger writes the gradient into the logits buffer: give it its own copy
        lx = logits.detach().clone().requires_grad_()

        def run_liger():
            lx.grad = None
            _loss_of(liger_ce(lx, targets)).backward()

        variants.append(("liger", run_liger))
    log(
        f"\n[cross_entropy fwd+bwd] logits [{N}, {V}] bf16, softcap {SOFTCAP}, {N - n_valid} of {N} targets ignored;"
        f" bytes = read trained rows + write grad = {bytes_moved / 1e9:.2f} GB"
    )
    res = run_variants(variants, args.reps, clear, log, bytes_moved=bytes_moved)
    logits = None  # free before the next case (the closures above are done with it)
    return {"shape": [N, V], "bytes": bytes_moved, "results": res}


def bench_linear_cross_entropy(args, log):
    N, V, D = args.tokens, args.vocab, args.dim
    torch.manual_seed(0)
    hidden = torch.randn(N, D, device=DEV).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, device=DEV) / math.sqrt(D)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[torch.randperm(N, device=DEV)[: N // 2]] = -1
    n_valid = int((targets != -1).sum())
    flops = 6 * n_valid * V * D  # fwd + bwd matmuls over the rows that are trained

    def clear():
        hidden.grad = None
        weight.grad = None

    def step(f):
        def run():
            clear()
            f(hidden, weight, targets).backward()

        return run

    variants = [
        ("ours", step(lambda h, w, t: linear_cross_entropy(h, w, t, softcap=SOFTCAP))),
        ("eager", step(eager_linear_ce)),
    ]
    if args.compile:
        variants.append(("torch.compile", step(torch.compile(eager_linear_ce))))
    _, liger_flce = liger_modules() if args.liger else (None, None)
    if liger_flce is not None:
        variants.append(("liger", step(lambda h, w, t: _loss_of(liger_flce(w, h, t)))))
    log(
        f"\n[linear_cross_entropy fwd+bwd] hidden [{N}, {D}] @ weight [{V}, {D}]^T bf16, softcap {SOFTCAP},"
        f" {N - n_valid} of {N} targets ignored; TFLOP/s counts 6*n_valid*V*D"
    )
    res = run_variants(variants, args.reps, clear, log, flops=flops)
    hidden = weight = None  # free before the next case
    return {"shape": [N, D, V], "flops": flops, "results": res}


def bench_rotary(args, log):
    B, T, H, D = (8, 2048, 10, 128) if DEV == "cuda" else (2, 64, 4, 32)
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=DEV).to(torch.bfloat16).requires_grad_()
    k = torch.randn(B, T, H, D, device=DEV).to(torch.bfloat16).requires_grad_()
    gq = torch.randn_like(q)
    gk = torch.randn_like(k)
    cos, sin = rotary_tables(T, D, device=DEV)
    bytes_moved = 8 * q.numel() * 2

    def clear():
        q.grad = None
        k.grad = None

    def step(f):
        def run():
            clear()
            qo, ko = f(q, k, cos, sin)
            torch.autograd.backward((qo, ko), (gq, gk))

        return run

    variants = [("ours", step(lambda q, k, c, s: apply_rotary(q, k, c, s))), ("eager", step(eager_rotary))]
    if args.compile:
        variants.append(("torch.compile", step(torch.compile(eager_rotary))))
    if args.liger:
        try:
            from liger_kernel.ops.rope import LigerRopeFunction

            # Liger's native layout [B, H, T, D] and HF rotate_half convention (sin sign flipped);
            # same bytes moved, so its time is comparable
            lq = q.detach().transpose(1, 2).contiguous().requires_grad_()
            lk = k.detach().transpose(1, 2).contiguous().requires_grad_()
            lcos = torch.cat([cos, cos], -1)[None].to(torch.bfloat16)
            lsin = torch.cat([-sin, -sin], -1)[None].to(torch.bfloat16)
            lgq, lgk = gq.transpose(1, 2).contiguous(), gk.transpose(1, 2).contiguous()

            def run_liger():
                lq.grad = None
                lk.grad = None
                qo, ko = LigerRopeFunction.apply(lq, lk, lcos, lsin)
                torch.autograd.backward((qo, ko), (lgq, lgk))

            variants.append(("liger", run_liger))
        except Exception:
            pass
    log(
        f"\n[apply_rotary fwd+bwd] q, k [{B}, {T}, {H}, {D}] bf16; bytes = 8 * numel(q) * 2 = {bytes_moved / 1e9:.3f} GB"
    )
    res = run_variants(variants, args.reps, clear, log, bytes_moved=bytes_moved)
    return {"shape": [B, T, H, D], "bytes": bytes_moved, "results": res}


# --------------------------------------------------------------------------------------------


def cpu_sanity(log):
    """Tiny CPU check of the torch backend (and of the Triton interpreter when enabled)."""
    backends = ["torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    ok = True
    for be in backends:
        log(f"  backend={be}:")
        _, good = check_correctness_small_cpu(be, log)
        ok &= good
    return ok


def check_correctness_small_cpu(backend, log):
    # same checks on CPU tensors, small vocab only (the interpreter is slow)
    return check_correctness("cpu", backend, log, vocabs=(1000,))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    ap.add_argument("--reps", type=int, default=20, help="timed runs per variant (median is reported)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines")
    ap.add_argument("--no-liger", dest="liger", action="store_false", help="skip Liger-Kernel baselines")
    ap.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)  # test this script on a CPU
    args = ap.parse_args(argv)
    global DEV
    if args.dry_run_cpu:
        DEV = "cpu"
        return dry_run(args)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    report = {"torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None

    if not torch.cuda.is_available():
        log(
            "CUDA is not available: no GPU benchmark. Running a tiny CPU sanity check instead "
            "(torch backend; set TRITON_INTERPRET=1 to include the Triton interpreter)."
        )
        ok = cpu_sanity(log)
        log("CPU sanity check: " + ("OK" if ok else "FAILED"))
        report["cuda"] = False
        report["cpu_sanity_ok"] = ok
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return 0

    props = torch.cuda.get_device_properties(0)
    log(f"device: {props.name}, torch {torch.__version__}, triton {report['triton']}")
    report.update(cuda=True, device=props.name)

    log("\n[correctness on CUDA] ours (backend='triton') vs float64 reference")
    results, ok = check_correctness("cuda", "triton", log)
    report["correctness"] = [{"name": n, "rel_err": e, "tol": t} for n, e, t in results]
    report["correctness_ok"] = ok
    if not ok:
        log("correctness FAILED: not benchmarking")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return 1

    copy_gbps, copy_ms = copy_bandwidth(args.reps)
    log(f"\n[copy] device-to-device copy of 1 GiB: {copy_ms:.3f} ms -> {copy_gbps:.1f} GB/s (read + write)")
    report["copy_gbps"] = copy_gbps

    ce = bench_cross_entropy(args, copy_gbps, log)
    lce = bench_linear_cross_entropy(args, log)
    rot = bench_rotary(args, log)
    report.update(cross_entropy=ce, linear_cross_entropy=lce, rotary=rot)

    log("\n[targets]")
    summary = {}
    r = ce["results"].get("ours")
    if r:
        frac = r["gbps"] / copy_gbps
        summary["ce_copy_fraction"] = frac
        log(
            f"  cross_entropy fwd+bwd: {r['gbps']:.0f} GB/s = {100 * frac:.0f}% of copy bandwidth"
            f" (target >= 80%): {'PASS' if frac >= 0.8 else 'MISS'}; {r['gbps'] / 3350:.0%} of H100 HBM peak 3.35 TB/s"
        )
        ri = ce["results"].get("ours, grad_in_logits")
        if ri:
            summary["ce_inplace_gbps"] = ri["gbps"]
            log(
                f"    grad_in_logits: {ri['gbps']:.0f} GB/s, peak mem {ri['peak_mem_bytes'] / 2**30:.2f} GiB"
                f" (default {r['peak_mem_bytes'] / 2**30:.2f} GiB)"
            )
        for other in ("eager", "torch.compile", "liger"):
            if other in ce["results"]:
                log(f"    vs {other}: {ce['results'][other]['ms'] / r['ms']:.2f}x faster")
    r, e = lce["results"].get("ours"), lce["results"].get("eager")
    if r and e:
        mem_ratio = r["peak_mem_bytes"] / max(e["peak_mem_bytes"], 1)
        time_ratio = r["ms"] / e["ms"]
        summary.update(lce_mem_ratio=mem_ratio, lce_time_ratio=time_ratio)
        good = mem_ratio <= 0.125 and time_ratio <= 1.0
        log(
            f"  linear_cross_entropy: peak mem ours/eager = {mem_ratio:.3f} (target <= 1/8 = 0.125;"
            f" {r['peak_mem_bytes'] / 2**30:.2f} vs {e['peak_mem_bytes'] / 2**30:.2f} GiB),"
            f" time ours/eager = {time_ratio:.2f} (target <= 1.0): {'PASS' if good else 'MISS'}"
        )
        for other in ("torch.compile", "liger"):
            if other in lce["results"]:
                o = lce["results"][other]
                log(
                    f"    vs {other}: time {r['ms'] / o['ms']:.2f}x, peak mem {r['peak_mem_bytes'] / max(o['peak_mem_bytes'], 1):.2f}x"
                )
    r = rot["results"].get("ours")
    if r:
        frac = r["gbps"] / copy_gbps
        summary["rotary_copy_fraction"] = frac
        log(
            f"  apply_rotary fwd+bwd: {r['gbps']:.0f} GB/s = {100 * frac:.0f}% of copy bandwidth"
            f" (target >= 80%): {'PASS' if frac >= 0.8 else 'MISS'}"
        )
    report["summary"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"\nwrote {args.json}")
    return 0


def dry_run(args):
    """Run every benchmark path at tiny sizes on the CPU (wall-clock timing, no memory stats)."""
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    args.tokens, args.vocab, args.dim, args.reps = min(args.tokens, 64), min(args.vocab, 512), min(args.dim, 32), 1
    results, ok = check_correctness("cpu", "torch", log, vocabs=(1000,))
    copy_gbps, _ = copy_bandwidth(1)
    ce = bench_cross_entropy(args, copy_gbps, log)
    lce = bench_linear_cross_entropy(args, log)
    rot = bench_rotary(args, log)
    assert ok and all("ours" in r["results"] for r in (ce, lce, rot)), "dry run failed"
    log("dry run OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
