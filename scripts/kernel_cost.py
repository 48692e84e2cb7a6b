#!/usr/bin/env python3
"""Static cost report of the Triton kernels on an H100 SXM and an H200 (sm_90), without a GPU.

Every kernel variant the launchers use is compiled for sm_90 (triton.compile + GPUTarget, the same
toolchain a GPU run uses: Triton's bundled ptxas); cuobjdump reads the cubin. Per kernel/config:

  instr/elt  SASS instructions per element (logit, or rotary element) on a thread's path: each
             innermost loop that loads from global memory (a sweep) costs body / its elements
             per thread per iteration, read from the SASS: the loop's LDG widths over the element
             size (ptxas's unrolling included); the rest of the kernel (per-row set-up,
             reductions, target fix, and the code of branches not taken, so an upper bound) is
             spread over the elements of a row (V = 65536) or of a program (rotary: no loop, its
             elements are what it stores)
  sfu/elt    the same for MUFU (special-function unit: ex2, rcp, ...) instructions
  regs       registers per thread; spill = stack/local bytes (0 = no spills)
  in flight  bytes of loads a thread has issued before the first instruction that uses one, x
             threads per SM, against what the sweep needs at full bandwidth (share of HBM
             bandwidth per SM x latency)
  HBM B/elt  bytes per element that must come from or go to HBM given the passes and the L2
             model below (the floor for CE fwd+bwd in bf16 is 2 read + 2 write)

Model (printed with the report): 132 SMs, 1.98 GHz (67 TFLOP/s FP32), 128 thread-instructions
and 16 MUFU results per SM per clock; HBM 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200); time per
element = max(bytes/HBM, instr/issue, sfu/SFU, latency), latency = sum over a row's sweeps of
bytes read x loaded latency (700 ns HBM, 350 ns L2 hit) / (132 x bytes in flight per SM); divided
by the SM balance (busiest SM's rows over the average: programs per SM, last partial round of
rows; rotary: last partial wave). Predicted fraction of HBM peak = (floor bytes / HBM) / that
time. L2 model: the persistent CE kernel keeps `programs x row bytes` of sweep 2's row in
flight; the share of it that fits in half the 50 MB L2 hits there, the rest is charged to HBM.

  python scripts/kernel_cost.py            # the table (markdown), ~15-40 s on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import math
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

# the two GPUs the project runs on: GH100 parts with the same SMs, clock and L2; they differ in HBM
GPUS = (("H100 SXM", 3.35e12), ("H200", 4.8e12))
SMS = 132
# FP32 67 TFLOP/s = 132 SMs x 128 FMA/clk x 2 x clk (both parts' spec) -> 1.98 GHz, the
# max boost clock; the 989 TFLOP/s tensor-core figure implies 1.83 GHz, but these kernels use no
# tensor cores
CLK = 67e12 / (SMS * 128 * 2)
ISSUE = SMS * 128 * CLK  # thread-instructions per second (4 warp-instructions per SM per clock)
SFU = SMS * 16 * CLK  # MUFU results per second (16 per SM per clock)
L2 = 50 * 2**20
# loaded latency of a global load: from HBM under a full-bandwidth stream, and an L2 hit
LAT_HBM = 700e-9
LAT_L2 = 350e-9
REGS_PER_SM = 65536
V = 65536
# the training path's row count per launch: linear CE's chunk at V = 65536
ROWS = 2048
# rotary: d20's shapes, B = 32, T = 2048, 10 q + 10 kv heads of 128
ROT_ROWS = 32 * 2048 * 20
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(lazy, sig, consts, num_warps, div16=()):
    """Compile for sm_90. div16: integer args that are multiples of 16 at run time (strides, V);
    with the pointers (16-byte aligned from PyTorch's allocator) they get the divisibility hint the
    JIT would give them, so loads and stores vectorise as in a real launch."""
    jf = JITFunction(lazy.get(interp=False).fn)
    attrs = {
        (jf.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*") or n in div16
    }
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(
        ASTSource(jf, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    return k.asm["cubin"]


def sass_and_resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run(
            [str(TOOLS / "cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [str(TOOLS / "cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
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


LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def load_bytes(text):
    """Bytes one thread moves with an LDG/STG (LDG.E.128 = 16, LDG.E.64 = 8, LDG.E = 4, ...)."""
    mods = text.split()[0].split(".")[1:] if not text.startswith("@") else text.split()[1].split(".")[1:]
    for m in mods:
        if m in LOAD_BYTES:
            return LOAD_BYTES[m]
    return 4


def _regs(operand):
    """Registers an operand names (R4 -> {4}; R4.64 -> {4, 5}; in desc[..][R2.64+0x10] too)."""
    out = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?", operand):
        r = int(m.group(1))
        out.update((r, r + 1) if m.group(2) else (r,))
    return out


def in_flight_before_use(body):
    """Bytes of global loads a thread has issued in a loop body before the first instruction that
    reads one of their results (in program order, from the top of the body): what is in flight
    while the math waits for the first load."""
    pending = set()
    issued = 0
    for _, op, text in body:
        t = re.sub(r"^@!?U?P\w+\s+", "", text)
        operands = [o.strip() for o in t.split(None, 1)[1].split(",")] if " " in t else []
        if op.startswith("LDG"):
            nbytes = load_bytes(t)
            d = int(re.match(r"R(\d+)", operands[0]).group(1))
            pending.update(range(d, d + max(1, nbytes // 4)))
            issued += nbytes
            continue
        srcs = operands if op.startswith("ST") else operands[1:]
        if any(_regs(o) & pending for o in srcs):
            break
    return issued


def sweeps(instrs, elt_bytes):
    """The element sweeps of a kernel: innermost loops with a global load. Per sweep: (start,
    end) index range, instructions, MUFU, bytes loaded per thread per iteration (the LDG widths;
    ptxas's unrolling shows up as more LDGs), elements per thread per iteration (= those bytes /
    the element size: every load in a sweep reads the swept row), bytes in flight before use."""
    real = [i for i in instrs if i[1] != "NOP"]
    lp = loops(real)
    inner = [(s, e) for s, e in lp if not any(s < s2 and e2 < e for s2, e2 in lp if (s2, e2) != (s, e))]
    out = []
    for s, e in inner:
        body = real[s : e + 1]
        ldg = sum(load_bytes(re.sub(r"^@!?U?P\w+\s+", "", t)) for _, op, t in body if op.startswith("LDG"))
        if not ldg:
            continue
        out.append(
            dict(
                range=(s, e),
                instrs=len(body),
                mufu=sum(op.startswith("MUFU") for _, op, _ in body),
                load_bytes=ldg,
                elems=ldg / elt_bytes,
                in_flight=in_flight_before_use(body),
            )
        )
    return real, out


def cost(instrs, elt_bytes, elems_per_row_thread, whole_kernel_elems=None):
    """(instr/elt, sfu/elt, sweeps, in-flight bytes per thread). Each sweep costs body / its
    elements per iteration; the rest of the kernel (per-row set-up, reductions, target fix, and
    the code of branches not taken, so an upper bound) is spread over a row's elements per thread.
    whole_kernel_elems: a kernel without sweeps (rotary): all its code over that many elements."""
    real, sw = sweeps(instrs, elt_bytes)
    if whole_kernel_elems is not None:
        body = [i for i in real if i[1] != "EXIT"]
        return (
            len(body) / whole_kernel_elems,
            sum(op.startswith("MUFU") for _, op, _ in body) / whole_kernel_elems,
            [],
            in_flight_before_use(body),
        )
    in_sweep = set()
    ins = sfu = 0.0
    for w in sw:
        ins += w["instrs"] / w["elems"]
        sfu += w["mufu"] / w["elems"]
        in_sweep.update(range(w["range"][0], w["range"][1] + 1))
    rest = [real[i] for i in range(len(real)) if i not in in_sweep and real[i][1] != "EXIT"]
    ins += len(rest) / elems_per_row_thread
    sfu += sum(op.startswith("MUFU") for _, op, _ in rest) / elems_per_row_thread
    return ins, sfu, sw, (sw[0]["in_flight"] if sw else 0)


def store_bytes(instrs):
    return sum(load_bytes(re.sub(r"^@!?U?P\w+\s+", "", t)) for _, op, t in instrs if op.startswith("STG"))


def predict(hbm_bw, hbm, floor, lat_terms, ins, sfu, balance):
    """Predicted fraction of HBM peak and its bound.

    Time per element = max of: HBM bytes / bandwidth; instructions / issue rate; MUFU / SFU rate;
    and the latency bound: a sweep whose loads keep `in_flight_sm` bytes outstanding per SM
    streams at most SMs x in_flight / latency, and a row's sweeps run one after the other
    (lat_terms: (bytes read per element, latency, in_flight_sm) per sweep). Divided by
    `balance` (the busiest SM's work over the average: uneven programs per SM and the last
    partial round of rows)."""
    t = {
        "HBM": hbm / hbm_bw,
        "issue": ins / ISSUE,
        "MUFU": sfu / SFU,
        "latency": sum(b * lat / (SMS * max(fly, 1)) for b, lat, fly in lat_terms),
    }
    bound = max(t, key=t.get)
    return (floor / hbm_bw) / (t[bound] * balance), bound + ("+tail" if balance > 1.005 else "")


CE_SIG = dict(
    X="*bf16",
    stride_x="i64",
    TGT="*i64",
    LOSS="*fp32",
    G="*bf16",
    stride_g="i64",
    SCALE="*fp32",
    stride_scale="i32",
    R="i32",
    V="i32",
    ignore_index="i32",
    cap="fp32",
    k_sig="fp32",
)
TY = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float16: "*fp16"}


def ce_rows(dtype, inplace):
    """(name, consts) for the CE variants the launchers use."""
    return [
        ("CE fwd+bwd, softcap 15", dict(HAS_CAP=True, FIXED_MAX=True, WRITE_GRAD=True, RESCALE=dtype != torch.float16)),
        ("CE fwd only (no_grad), softcap 15", dict(HAS_CAP=True, FIXED_MAX=True, WRITE_GRAD=False, RESCALE=False)),
        ("CE fwd+bwd, no softcap", dict(HAS_CAP=False, FIXED_MAX=False, WRITE_GRAD=True, RESCALE=False)),
        ("CE fwd+bwd, softcap 50 (online max)", dict(HAS_CAP=True, FIXED_MAX=False, WRITE_GRAD=True, RESCALE=False)),
    ]


def ce_latency(sw, threads_sm, es, hit):
    """Latency terms of a CE kernel: sweep 1 reads the logits from HBM; sweep 2 (hit: its L2 hit
    fraction; None without a sweep 2) reads the row again, from L2 where it hits."""
    terms = [(es, LAT_HBM, sw[0]["in_flight"] * threads_sm)]
    if hit is not None and len(sw) > 1:
        fly = sw[1]["in_flight"] * threads_sm
        terms += [(es * hit, LAT_L2, fly), (es * (1 - hit), LAT_HBM, fly)]
    return terms


def ce_balance(progs, per_sm, rows=ROWS):
    """Busiest SM's rows over the average: programs take rows round-robin, `per_sm` per SM."""
    p = min(rows, progs)
    return per_sm * math.ceil(rows / p) / (rows / SMS)


def variants():
    """Every kernel variant the launchers use: compiled for sm_90, with its launch and traffic."""
    _backend._DEVICE_PROPS[0] = (SMS, L2)  # the launcher's view of an H100/H200 (same SMs and L2)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        for inplace in (True, False):
            for name, c in ce_rows(dtype, inplace):
                grad = c["WRITE_GRAD"]
                if not grad and not inplace:
                    continue
                reread = es if grad else 0
                elems = ce_mod.ce_elems_per_thread(grad, es)
                block, warps, progs = ce_mod.ce_launch_config(V, reread, _FakeDev(), elems)
                # bf16 rows of even length (V = 65536): the launcher reads them as uint32 pairs
                consts = dict(
                    c,
                    FAST=True,
                    RNE_FIX=False,
                    BLOCK=block,
                    TAIL=V % block != 0,
                    TAIL2=V % (2 * block) != 0,
                    WORDS=c["FIXED_MAX"] and dtype == torch.bfloat16,
                )
                sig = dict(CE_SIG, X=TY[dtype], G=TY[dtype])
                cubin = compile_sm90(ce_mod._CE_KERNEL, sig, consts, warps, div16=("stride_x", "stride_g", "V"))
                instrs, regs, spill = sass_and_resources(cubin)
                threads = 32 * warps
                ins, sfu, sw, fly = cost(instrs, es, V / threads)
                # HBM: one read of X; the gradient written once; sweep 2 (G read-modify-write, or
                # X re-read) hits L2 for the share of the rows in flight that fits in L2_SHARE
                rows_in_flight = progs * V * reread
                hit = min(1.0, ce_mod.L2_SHARE * L2 / rows_in_flight) if grad else 1.0
                floor = es * (2 if grad else 1)
                miss = (1 - hit) * es * (2 if c["RESCALE"] else 1) if grad else 0.0
                mode = "in place" if inplace else "separate grad"
                out.append(
                    dict(
                        kernel=f"{name} [{str(dtype)[6:]}, {mode if grad else '-'}]",
                        config=f"BLOCK={block} w={warps} P={progs}",
                        block=block,
                        threads=threads,
                        elt_bytes=es,
                        sweeps=sw,
                        instrs=instrs,
                        instr_per_elt=ins,
                        sfu_per_elt=sfu,
                        regs=regs,
                        spill_bytes=spill,
                        hbm_bytes_per_elt=floor + miss,
                        floor_bytes_per_elt=floor,
                        l2_hit=hit,
                        in_flight_sm=fly * threads * progs // SMS,
                        balance=ce_balance(progs, progs // SMS),
                        lat_terms=ce_latency(sw, threads * progs // SMS, es, hit if grad else None),
                    )
                )
    # backward scale when grad_output != 1 (e.g. reduction="none"): one more read+write of G
    es = 2
    block, warps, progs = ce_mod.ce_launch_config(V, 0, _FakeDev(), per_sm=2)
    cubin = compile_sm90(
        ce_mod._CE_SCALE_KERNEL,
        dict(G="*bf16", stride_g="i64", GO="*fp32", stride_go="i32", R="i32", V="i32"),
        dict(RNE_FIX=False, BLOCK=block),
        warps,
        div16=("stride_g", "V"),
    )
    instrs, regs, spill = sass_and_resources(cubin)
    ins, sfu, sw, fly = cost(instrs, es, V / (32 * warps))
    out.append(
        dict(
            kernel="CE bwd scale (grad_output != 1 only) [bfloat16]",
            config=f"BLOCK={block} w={warps} P={progs}",
            block=block,
            threads=32 * warps,
            elt_bytes=es,
            sweeps=sw,
            instrs=instrs,
            instr_per_elt=ins,
            sfu_per_elt=sfu,
            regs=regs,
            spill_bytes=spill,
            hbm_bytes_per_elt=4,
            floor_bytes_per_elt=4,
            l2_hit=1.0,
            in_flight_sm=fly * 32 * warps * progs // SMS,
            balance=ce_balance(progs, progs // SMS),
            lat_terms=ce_latency(sw, 32 * warps * progs // SMS, es, None),
        )
    )
    # rotary: D = 128 (head_dim of the d20 model), bf16, forward and the backward (inverse)
    rot_sig = dict(
        Q="*bf16",
        K="*bf16",
        QO="*bf16",
        KO="*bf16",
        COS="*fp32",
        SIN="*fp32",
        POS="*i64",
        sq_b="i64",
        sq_t="i64",
        sq_h="i64",
        sk_b="i64",
        sk_t="i64",
        sk_h="i64",
        sp_b="i64",
        sp_t="i64",
        stride_tab="i64",
        T="i32",
        HQ="i32",
        HKV="i32",
        n_q="i32",
        n_rows="i32",
        offset="i32",
        max_pos="i32",
    )
    D = 128
    block_d, block_r, warps = rot_mod.rotary_launch_config(D, ROT_ROWS)
    for name, pos, inv in (
        ("rotary fwd (q+k, one launch)", False, False),
        ("rotary bwd (inverse rotation)", False, True),
        ("rotary fwd, position_ids", True, False),
    ):
        cubin = compile_sm90(
            rot_mod._ROTARY_KERNEL,
            rot_sig,
            dict(HALF=D // 2, BLOCK_D=block_d, BLOCK_R=block_r, HAS_POS=pos, INVERSE=inv, ALIGNED=True, RNE_FIX=False),
            warps,
            div16=("sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "stride_tab"),
        )
        instrs, regs, spill = sass_and_resources(cubin)
        threads = 32 * warps
        # no loop: a program is one pass; its elements per thread are what it stores (bf16 out)
        per_thread = store_bytes(instrs) / 2
        ins, sfu, sw, fly = cost(instrs, 2, per_thread, whole_kernel_elems=per_thread)
        # 2 B read + 2 B write per element; cos/sin (fp32, T x D/2 each) are shared by the
        # B*(Hq+Hkv) rows of a position: 4/(B*(Hq+Hkv)) B/elt, ~0.01 for B=32, 10+10 heads
        hbm = 4 + 4 / (32 * 20)
        resident = max(1, min(32, 2048 // threads, REGS_PER_SM // (threads * (-(-regs // 8) * 8))))
        progs = -(-ROT_ROWS // block_r)
        waves = progs / (SMS * resident)
        out.append(
            dict(
                kernel=f"{name} [bfloat16]",
                config=f"D={D} BLOCK_R={block_r} w={warps} ({resident}/SM)",
                block=block_r * D,
                threads=threads,
                elt_bytes=2,
                sweeps=sw,
                instrs=instrs,
                instr_per_elt=ins,
                sfu_per_elt=sfu,
                regs=regs,
                spill_bytes=spill,
                hbm_bytes_per_elt=hbm,
                floor_bytes_per_elt=4,
                l2_hit=1.0,
                in_flight_sm=fly * threads * resident,
                lat_terms=[(2 + 4 / (32 * 20), LAT_HBM, fly * threads * resident)],
                balance=math.ceil(waves) / waves,
                elems_per_thread=per_thread,
            )
        )
    return out


def report(rows):
    """Adds per GPU: predicted fraction of HBM peak, bound, bytes in flight needed per SM."""
    for r in rows:
        r["gpus"] = {}
        for gpu, bw in GPUS:
            frac, bound = predict(
                bw,
                r["hbm_bytes_per_elt"],
                r["floor_bytes_per_elt"],
                r["lat_terms"],
                r["instr_per_elt"],
                r["sfu_per_elt"],
                r["balance"],
            )
            # sweep 1 at full speed: its share of the HBM bandwidth per SM x HBM latency
            b1, lat1, _ = r["lat_terms"][0]
            need = bw * b1 / r["hbm_bytes_per_elt"] / SMS * lat1
            r["gpus"][gpu] = dict(predicted_hbm_fraction=frac, bound=bound, in_flight_needed_sm=need)
    return rows


TARGETS = {
    "CE fwd+bwd, softcap 15 [bfloat16, in place]": 0.85,
    "CE fwd+bwd, softcap 15 [bfloat16, separate grad]": 0.85,
    "CE fwd only (no_grad), softcap 15 [bfloat16, -]": 0.75,
    "rotary fwd (q+k, one launch) [bfloat16]": 0.85,
    "rotary bwd (inverse rotation) [bfloat16]": 0.85,
}


class _FakeDev:
    """The launcher's view of an H100 (ce_launch_config only reads .type and device_props)."""

    type = "cuda"
    index = 0


def linear_ce_model(N=16384, D=1280, Vv=65536):
    """Linear CE per logit element, and peak extra memory, bf16 chunk logits vs fp32 ones."""
    C = ce_mod_chunk_rows(N, Vv)
    flops = 3 * 2 * D  # logits, dh = g W, dW += g^T h
    out = []
    for name, logit_b, bytes_ in (
        ("bf16 chunk logits, grad in place", 2, 2 + 2 + 2 + 2 + 2),
        ("fp32 chunk logits, separate bf16 grad (before)", 4, 4 + 4 + 2 + 2 + 2),
    ):
        t_mm = flops / 989e12
        t_mem = bytes_ / GPUS[0][1]
        peak = C * Vv * logit_b + (0 if logit_b == 2 else C * Vv * 2) + N * D * 4 + Vv * D * 4
        out.append((name, bytes_, t_mem / (t_mm + t_mem), peak))
    # eager: bf16 logits, fp32 upcast, softcapped fp32, fp32 grad, bf16 grad -> peak ~ N*V*(2+4+4+4+2)
    eager = N * Vv * (2 + 4 + 4 + 4 + 2)
    return C, out, eager


def ce_mod_chunk_rows(n, v):
    return sys.modules["rustchat.kernels.linear_cross_entropy"]._chunk_rows(n, v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--json", metavar="OUT", help="also write the rows as JSON (gpu_check.sh pairs them with measurements)"
    )
    args = ap.parse_args()
    rows = report(variants())
    if args.json:
        import json

        keys = (
            "kernel",
            "config",
            "instr_per_elt",
            "sfu_per_elt",
            "regs",
            "spill_bytes",
            "hbm_bytes_per_elt",
            "floor_bytes_per_elt",
            "l2_hit",
            "in_flight_sm",
            "balance",
            "gpus",
        )
        with open(args.json, "w") as f:
            json.dump([{k: r[k] for k in keys} for r in rows], f, indent=1)
    print(
        f"Kernels: static cost on sm_90 (H100 SXM and H200 models), V = {V}. {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, "
        f"{platform.node() or 'host'} ({os.cpu_count()} CPUs, no GPU); python {platform.python_version()}, "
        f"torch {torch.__version__}, triton {triton.__version__}; command: python scripts/kernel_cost.py"
    )
    print(
        f"Model: {SMS} SMs, clk {CLK / 1e9:.2f} GHz (from 67 TFLOP/s FP32), issue {ISSUE / 1e12:.1f} T instr/s, "
        f"SFU {SFU / 1e12:.2f} T/s, L2 {L2 >> 20} MiB (half for rows in flight), loaded latency {LAT_HBM * 1e9:.0f} ns "
        f"HBM / {LAT_L2 * 1e9:.0f} ns L2; HBM "
        + ", ".join(f"{g} {bw / 1e12:.2f} TB/s" for g, bw in GPUS)
        + f"; CE over {ROWS} rows (linear CE's chunk), rotary over B*T*H = {ROT_ROWS} rows"
    )
    print()
    g1, g2 = (g for g, _ in GPUS)
    print(
        f"| kernel [dtype, gradient] | config | instr/elt | sfu/elt | elts/iter | regs | spill B | HBM B/elt (floor) "
        f"| L2 hit | in flight KB/SM (needed {g1}/{g2}) | SM balance | {g1}: bound, predicted | {g2}: bound, predicted |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        el = "/".join(f"{w['elems']:g}" for w in r["sweeps"]) or f"{r['elems_per_thread']:g} (1 pass)"
        need = "/".join(f"{r['gpus'][g]['in_flight_needed_sm'] / 1024:.1f}" for g, _ in GPUS)
        cells = " | ".join(
            f"{r['gpus'][g]['bound']}, {100 * r['gpus'][g]['predicted_hbm_fraction']:.0f}%" for g, _ in GPUS
        )
        print(
            f"| {r['kernel']} | {r['config']} | {r['instr_per_elt']:.1f} | {r['sfu_per_elt']:.2f} | {el} | {r['regs']} "
            f"| {r['spill_bytes']} | {r['hbm_bytes_per_elt']:.2f} ({r['floor_bytes_per_elt']}) | {100 * r['l2_hit']:.0f}% "
            f"| {r['in_flight_sm'] / 1024:.1f} ({need}) | {r['balance']:.3f} | {cells} |"
        )
    print()
    misses = [
        f"{r['kernel']} on {g}: {100 * r['gpus'][g]['predicted_hbm_fraction']:.0f}% < {100 * TARGETS[r['kernel']]:.0f}%"
        for r in rows
        if r["kernel"] in TARGETS
        for g, _ in GPUS
        if r["gpus"][g]["predicted_hbm_fraction"] < TARGETS[r["kernel"]]
    ]
    print(
        "Targets (>= 85% CE fwd+bwd softcap 15 bf16 and rotary, >= 75% CE forward-only, both GPUs): "
        + ("all met" if not misses else "MISSED: " + "; ".join(misses))
    )
    C, lin, eager = linear_ce_model()
    print()
    print(
        f"Linear CE, N=16384, D=1280, V={V}: chunk of {C} rows; matmuls 3 x 2D = {6 * 1280} FLOP per logit (H100 SXM)."
    )
    print(
        "| chunk logits | HBM B/logit (mm write, CE read+write, 2 mm reads) | elementwise share of time | peak extra memory | vs eager |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, b, share, peak in lin:
        print(f"| {name} | {b} | {100 * share:.0f}% | {peak / 2**30:.2f} GiB | 1/{eager / peak:.0f} |")
    print(
        f"(eager: bf16 logits + fp32 upcast + softcapped fp32 + fp32 and bf16 gradients = {eager / 2**30:.1f} GiB; "
        "bench_kernels.py measures both on a GPU)"
    )


if __name__ == "__main__":
    main()
