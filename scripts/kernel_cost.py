#!/usr/bin/env python3
"""Static cost report of the Triton kernels on an H100 (sm_90), without a GPU.

Every kernel variant the launchers use is compiled for sm_90 (triton.compile + GPUTarget, the same
toolchain a GPU run uses: Triton's bundled ptxas); cuobjdump reads the cubin. Per kernel/config:

  instr/elt  SASS instructions per element (logit, or rotary element) on a thread's path: each
             innermost loop that loads from global memory costs body / (elements per thread per
             iteration); the rest of the kernel (per-row set-up, reductions, target fix, and the
             code of branches not taken, so an upper bound) is spread over the elements of a row
             (V = 65536) or of a program (rotary)
  sfu/elt    the same for MUFU (special-function unit: ex2, rcp, ...) instructions
  regs       registers per thread; spill = stack/local bytes (0 = no spills)
  HBM B/elt  bytes per element that must come from or go to HBM given the passes and the L2
             model below (the floor for CE fwd+bwd in bf16 is 2 read + 2 write)

Roofline model (stated here, printed with the report): H100 SXM, 3.35 TB/s HBM, 989 TFLOP/s
dense bf16 = 132 SMs x 4096 FLOP/clk x 1.83 GHz, so clk = 1.83 GHz. Per SM and clock: 4 warp
instructions issued (128 thread-instructions) and 16 MUFU results. A kernel's time per element is
max(bytes/HBM, instr/(132*128*clk), sfu/(132*16*clk)) (perfect overlap, no latency limits: an
upper bound), and its predicted fraction of HBM bandwidth = (floor bytes/HBM) / that time, so
both extra HBM traffic and compute limits lower it. L2 model: the persistent CE kernel keeps
`programs x row bytes` in flight; if that fits in half the 50 MB L2 the second sweep over a row
hits L2, otherwise it is charged to HBM again.

  python scripts/kernel_cost.py            # the table (markdown), ~1-2 min on 2 cores
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:
    from rustchat.kernels import _backend  # the installed package (a wheel, or an editable install)
except ImportError:  # a bare source checkout: the kernels need only torch and triton
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from rustchat.kernels import _backend

ce_mod = sys.modules["rustchat.kernels.cross_entropy"]
rot_mod = sys.modules["rustchat.kernels.rotary"]

HBM = 3.35e12
SMS = 132
CLK = 989e12 / (SMS * 4096)
ISSUE = SMS * 128 * CLK  # thread-instructions per second
SFU = SMS * 16 * CLK  # MUFU results per second
L2 = 50 * 2**20
V = 65536
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(lazy, sig, consts, num_warps, div16=()):
    """Compile for sm_90. div16: integer args that are multiples of 16 at run time (strides, V);
    with the pointers (16-byte aligned from PyTorch's allocator) they get the divisibility hint the
    JIT would give them, so loads and stores vectorise as in a real launch."""
    jf = JITFunction(lazy.get(interp=False).fn)
    attrs = {(jf.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n in div16}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(jf, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    return k.asm["cubin"]


def sass_and_resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    instrs = []  # (address, opcode, text)
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            text = m.group(2).strip()
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            instrs.append((int(m.group(1), 16), op, text))
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    return instrs, regs, stack + local


def loops(instrs):
    """(start, end) index ranges of loops: a branch back to an earlier address."""
    addr_to_idx = {a: i for i, (a, _, _) in enumerate(instrs)}
    out = []
    for i, (a, op, text) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in addr_to_idx:
                out.append((addr_to_idx[int(m.group(1), 16)], i))
    return out


def cost(instrs, elems_per_iter_thread, elems_per_row_thread):
    """(instr/elt, sfu/elt, n streaming loops): innermost loops with a global load are the
    element sweeps; everything else is per-row (or per-program) overhead."""
    real = [(a, op, t) for a, op, t in instrs if op not in ("NOP",)]
    lp = loops(real)
    inner = [(s, e) for s, e in lp if not any(s < s2 and e2 < e for s2, e2 in lp if (s2, e2) != (s, e))]
    sweeps = [(s, e) for s, e in inner if any(real[i][1].startswith("LDG") for i in range(s, e + 1))]
    in_sweep = set()
    ins = sfu = 0.0
    for s, e in sweeps:
        body = real[s:e + 1]
        ins += len(body) / elems_per_iter_thread
        sfu += sum(op.startswith("MUFU") for _, op, _ in body) / elems_per_iter_thread
        in_sweep.update(range(s, e + 1))
    rest = [real[i] for i in range(len(real)) if i not in in_sweep and real[i][1] != "EXIT"]
    ins += len(rest) / elems_per_row_thread
    sfu += sum(op.startswith("MUFU") for _, op, _ in rest) / elems_per_row_thread
    return ins, sfu, len(sweeps)


def roofline(hbm_bytes, floor_bytes, ins, sfu):
    t = max(hbm_bytes / HBM, ins / ISSUE, sfu / SFU)
    bound = "HBM" if t == hbm_bytes / HBM else ("issue" if t == ins / ISSUE else "SFU")
    return (floor_bytes / HBM) / t, bound


CE_SIG = dict(X="*bf16", stride_x="i64", TGT="*i64", LOSS="*fp32", G="*bf16", stride_g="i64", SCALE="*fp32",
              stride_scale="i32", R="i32", V="i32", ignore_index="i32", cap="fp32", k_sig="fp32")
TY = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16"}


def ce_rows(dtype, inplace):
    """(name, consts, grad dtype, passes reading X) for the CE variants the launchers use."""
    return [
        ("CE fwd+bwd, softcap 15", dict(HAS_CAP=True, FIXED_MAX=True, WRITE_GRAD=True,
                                          RESCALE=dtype != torch.float16)),
        ("CE fwd only (no_grad), softcap 15", dict(HAS_CAP=True, FIXED_MAX=True, WRITE_GRAD=False, RESCALE=False)),
        ("CE fwd+bwd, no softcap", dict(HAS_CAP=False, FIXED_MAX=False, WRITE_GRAD=True, RESCALE=False)),
        ("CE fwd+bwd, softcap 50 (online max)", dict(HAS_CAP=True, FIXED_MAX=False, WRITE_GRAD=True, RESCALE=False)),
    ]


def report(dtypes=(torch.bfloat16, torch.float32)):
    dev = torch.device("cuda")
    _backend._DEVICE_PROPS[0] = (SMS, L2)  # the H100 the launcher would see
    rows = []
    for dtype in dtypes:
        for inplace in (True, False):
            es = torch.tensor([], dtype=dtype).element_size()
            for name, c in ce_rows(dtype, inplace):
                grad = c["WRITE_GRAD"]
                if not grad and not inplace:
                    continue
                block, warps, progs = ce_mod.ce_launch_config(V, es, es if grad else 0, inplace or not grad, _FakeDev())
                consts = dict(c, FAST=True, RNE_FIX=False, BLOCK=block, TAIL=V % block != 0)
                sig = dict(CE_SIG, X=TY[dtype], G=TY[dtype])
                cubin = compile_sm90(ce_mod._CE_KERNEL, sig, consts, warps, div16=("stride_x", "stride_g", "V"))
                instrs, regs, spill = sass_and_resources(cubin)
                threads = 32 * warps
                ins, sfu, nsw = cost(instrs, block / threads, V / threads)
                # bytes: one read of X; the gradient written once; the second sweep (X re-read
                # or G read-modify-write) hits L2 only if the rows in flight fit in half of it
                row_bytes = V * es * (1 if (inplace or not grad) else 2)
                fits = min(progs, 1 << 30) * row_bytes <= ce_mod.L2_SHARE * L2
                floor = es * (2 if grad else 1)
                hbm = floor
                if grad and not fits:
                    hbm += es * (2 if c["RESCALE"] else 1)  # the 2nd sweep's reads (+ rewrite) again
                frac, bound = roofline(hbm, floor, ins, sfu)
                mode = "in place" if inplace else "separate grad"
                rows.append((f"{name} [{str(dtype)[6:]}, {mode if grad else '-'}]", f"BLOCK={block} w={warps} P={progs}",
                             ins, sfu, regs, spill, hbm, floor, fits, frac, bound))
    # backward scale when grad_output != 1 (e.g. reduction="none"): one more read+write of G
    es = 2
    block, warps, progs = ce_mod.ce_launch_config(V, es, 0, True, _FakeDev())
    cubin = compile_sm90(ce_mod._CE_SCALE_KERNEL, dict(G="*bf16", stride_g="i64", GO="*fp32", stride_go="i32", R="i32", V="i32"),
                         dict(RNE_FIX=False, BLOCK=block), warps, div16=("stride_g", "V"))
    instrs, regs, spill = sass_and_resources(cubin)
    ins, sfu, _ = cost(instrs, block / (32 * warps), V / (32 * warps))
    frac, bound = roofline(4, 4, ins, sfu)
    rows.append(("CE bwd scale (grad_output != 1 only) [bfloat16]", f"BLOCK={block} w={warps} P={progs}", ins, sfu, regs, spill, 4, 4, True, frac, bound))
    # rotary: D = 128 (head_dim of the d20 model), bf16, forward and the backward (inverse)
    rot_sig = dict(Q="*bf16", K="*bf16", QO="*bf16", KO="*bf16", COS="*fp32", SIN="*fp32", POS="*i64",
                   sq_b="i64", sq_t="i64", sq_h="i64", sk_b="i64", sk_t="i64", sk_h="i64", sp_b="i64", sp_t="i64",
                   stride_tab="i64", T="i32", HQ="i32", HKV="i32", n_q="i32", n_rows="i32", offset="i32", max_pos="i32")
    D = 128
    block_d = D // 2
    block_r = 4096 // block_d
    for name, pos, inv in (("rotary fwd (q+k, one launch)", False, False), ("rotary bwd (inverse rotation)", False, True),
                           ("rotary fwd, position_ids", True, False)):
        cubin = compile_sm90(rot_mod._ROTARY_KERNEL, rot_sig, dict(HALF=D // 2, BLOCK_D=block_d, BLOCK_R=block_r, HAS_POS=pos,
                                                                    INVERSE=inv, ALIGNED=True, RNE_FIX=False), 4,
                               div16=("sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "stride_tab"))
        instrs, regs, spill = sass_and_resources(cubin)
        per_thread = block_r * D / 128
        ins, sfu, _ = cost(instrs, per_thread, per_thread)
        # 2 B read + 2 B write per element; cos/sin (fp32, T x D/2 each) are shared by the
        # B*(Hq+Hkv) rows of a position: 4/(B*(Hq+Hkv)) B/elt, ~0.01 for B=32, 10+10 heads
        hbm = 4 + 4 / (32 * 20)
        frac, bound = roofline(hbm, 4, ins, sfu)
        rows.append((f"{name} [bfloat16]", f"D={D} BLOCK_R={block_r} w=4", ins, sfu, regs, spill, hbm, 4, True, frac, bound))
    return rows


class _FakeDev:
    """The launcher's view of an H100 (ce_launch_config only reads .type and device_props)."""
    type = "cuda"
    index = 0


def linear_ce_model(N=16384, D=1280, Vv=65536):
    """Linear CE per logit element, and peak extra memory, bf16 chunk logits vs fp32 ones."""
    C = ce_mod_chunk_rows(N, Vv)
    flops = 3 * 2 * D  # logits, dh = g W, dW += g^T h
    out = []
    for name, logit_b, bytes_ in (("bf16 chunk logits, grad in place", 2, 2 + 2 + 2 + 2 + 2),
                                  ("fp32 chunk logits, separate bf16 grad (before)", 4, 4 + 4 + 2 + 2 + 2)):
        t_mm = flops / 989e12
        t_mem = bytes_ / HBM
        peak = C * Vv * logit_b + (0 if logit_b == 2 else C * Vv * 2) + N * D * 4 + Vv * D * 4
        out.append((name, bytes_, t_mem / (t_mm + t_mem), peak))
    # eager: bf16 logits, fp32 upcast, softcapped fp32, fp32 grad, bf16 grad -> peak ~ N*V*(2+4+4+4+2)
    eager = N * Vv * (2 + 4 + 4 + 4 + 2)
    return C, out, eager


def ce_mod_chunk_rows(n, v):
    return sys.modules["rustchat.kernels.linear_cross_entropy"]._chunk_rows(n, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON (gpu_check.sh pairs them with measurements)")
    args = ap.parse_args()
    rows = report()
    if args.json:
        import json

        keys = ("kernel", "config", "instr_per_elt", "sfu_per_elt", "regs", "spill_bytes", "hbm_bytes_per_elt",
                "floor_bytes_per_elt", "second_sweep_in_l2", "predicted_hbm_fraction", "bound")
        with open(args.json, "w") as f:
            json.dump([dict(zip(keys, r)) for r in rows], f, indent=1)
    print(f"Kernels: static cost on sm_90 (H100 SXM model), V = {V}. {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, "
          f"{platform.node() or 'host'} ({os.cpu_count()} CPUs, no GPU); python {platform.python_version()}, "
          f"torch {torch.__version__}, triton {triton.__version__}; command: python scripts/kernel_cost.py")
    print(f"Model: HBM {HBM / 1e12:.2f} TB/s, {SMS} SMs, clk {CLK / 1e9:.2f} GHz (from 989 TFLOP/s bf16), "
          f"issue {ISSUE / 1e12:.1f} T instr/s, SFU {SFU / 1e12:.2f} T/s, L2 {L2 >> 20} MiB (half for rows in flight)")
    print()
    print("| kernel [dtype, gradient] | config | instr/elt | sfu/elt | regs | spill B | HBM B/elt (floor) | 2nd sweep in L2 | bound | predicted % HBM |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---:|")
    for name, cfg, ins, sfu, regs, spill, hbm, floor, fits, frac, bound in rows:
        print(f"| {name} | {cfg} | {ins:.1f} | {sfu:.2f} | {regs} | {spill} | {hbm:.2f} ({floor}) | {'yes' if fits else 'no'} | {bound} | {100 * frac:.0f}% |")
    C, lin, eager = linear_ce_model()
    print()
    print(f"Linear CE, N=16384, D=1280, V={V}: chunk of {C} rows; matmuls 3 x 2D = {6 * 1280} FLOP per logit.")
    print("| chunk logits | HBM B/logit (mm write, CE read+write, 2 mm reads) | elementwise share of time | peak extra memory | vs eager |")
    print("|---|---:|---:|---:|---:|")
    for name, b, share, peak in lin:
        print(f"| {name} | {b} | {100 * share:.0f}% | {peak / 2**30:.2f} GiB | 1/{eager / peak:.0f} |")
    print(f"(eager: bf16 logits + fp32 upcast + softcapped fp32 + fp32 and bf16 gradients = {eager / 2**30:.1f} GiB; "
          "bench_kernels.py measures both on a GPU)")


if __name__ == "__main__":
    main()
