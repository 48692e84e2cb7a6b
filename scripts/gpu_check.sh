#!/usr/bin/env bash
# Every GPU-side check and benchmark in one call (for a lent H100/H200: Python 3.12, torch,
# Triton, no Rust, no internet). Prepare on the dev machine first:
#   bash scripts/gpu_check.sh --prepare      # builds dist/*.whl (abi3) + wheelhouse/ for py3.12
# then run on the GPU box from the repo root, carrying dist and wheelhouse:
#   OUT=/some/dir bash scripts/gpu_check.sh
# Results (text + JSON) land in $OUT: gpu.txt, kernels.{txt,json}, train.{txt,json}, speedrun.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  rm -rf dist wheelhouse
  maturin build --release -o dist
  # Pure-Python / binary wheels the GPU box may lack (torch and triton are there already).
  pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --no-deps -d wheelhouse tqdm safetensors english-words numpy liger-kernel
  ls -la dist wheelhouse
  exit 0
fi

OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
python -m pip install --quiet --no-index --no-deps dist/rustchat-*.whl 2>&1 | tail -3
# only what the box lacks (never replace its torch/numpy)
for w in wheelhouse/*.whl; do
  name=$(basename "$w" | cut -d- -f1 | tr _ -)
  python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null || python -m pip install --quiet --no-index --no-deps "$w"
done
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# 1. kernels: correctness on CUDA vs float64, then time / GB/s / peak memory vs eager, compile, Liger
timeout 300 python scripts/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
# 2. training step: ours vs plain PyTorch, tokens/s and MFU for d10 and d20
timeout 240 python scripts/bench_train.py --device cuda --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"
# 3. the whole pipeline on CUDA at tiny size (kernels inside the model, packed attention, eval)
RUSTCHAT_BASE_DIR=$(mktemp -d) timeout 300 rustchat speedrun --preset tiny --device cuda --quiet 2>&1 | tail -40 | tee "$OUT/speedrun.txt"
echo "gpu_check done: $OUT"
