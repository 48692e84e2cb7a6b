#!/usr/bin/env bash
# The kernel interpreter tests on the GPU box's stack: Python 3.12, torch 2.11, Triton 3.6, and a
# numpy below 2.4 (Triton < 3.7's interpreter breaks on numpy >= 2.4: int() of a 1-element array
# in `range(0, V, BLOCK)` loops, "only 0-dimensional arrays can be converted to Python scalars").
# Builds (once) a second venv with those versions and the abi3 wheel, then runs tests/test_kernels.py
# under TRITON_INTERPRET=1 only (no GPU needed). CI's stack is the normal test run.
# kernels/_backend.py also works around that interpreter bug, so NUMPY="numpy>=2.4" passes too.
# --all installs the wheel's dependencies and test extras on that stack as well and runs the
# whole test suite (any further arguments go to pytest): what the GPU box's Python would meet
# outside the kernels (numpy < 2.4 once warned on every command's stderr, for one).
#   bash scripts/old_stack_check.sh            # VENV=/path PY312=/path/to/python3.12 NUMPY=spec
#   bash scripts/old_stack_check.sh --all -m "not slow and not e2e"
set -euo pipefail
ALL=0
if [ "${1:-}" = "--all" ]; then ALL=1; shift; fi
cd "$(dirname "$0")/.."
# the first python3.12 that runs (a pyenv shim can exist and refuse to run)
if [ -z "${PY312:-}" ]; then
  for p in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$p" -V >/dev/null 2>&1; then PY312=$p; break; fi
  done
fi
: "${PY312:?no Python 3.12 found: set PY312=/path/to/python3.12}"
VENV=${VENV:-/tmp/rustchat-oldstack}
WHEELDIR=${WHEELDIR:-$(mktemp -d)}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet "torch==2.11.*" "triton==3.6.*" "${NUMPY:-numpy<2.4}" pytest
ls "$WHEELDIR"/rustchat-*.whl >/dev/null 2>&1 || maturin build --release -o "$WHEELDIR"
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$WHEELDIR"/rustchat-*.whl
if [ "$ALL" = 1 ]; then  # the dependencies too, without moving torch, Triton or numpy (no +cu130 label: pip
  # would look for that build on PyPI instead of keeping the installed one)
  CONSTRAINTS=$(mktemp)
  "$VENV/bin/python" -c "import torch, triton, numpy; v = lambda m: m.__version__.split('+')[0]; print(f'torch=={v(torch)}\ntriton=={v(triton)}\nnumpy=={v(numpy)}')" > "$CONSTRAINTS"
  WHEEL=$(ls "$WHEELDIR"/rustchat-*.whl | head -1)
  "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" "rustchat[test] @ file://$WHEEL"
fi
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# from a scratch dir so `import rustchat` is the installed wheel, not python/ of the checkout
TESTS=$(pwd)/tests
cd "$(mktemp -d)"
if [ "$ALL" = 1 ]; then  # as scripts/test.sh runs it in CI
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$TESTS" "$@"
  exit
fi
TRITON_INTERPRET=1 RUSTCHAT_KERNELS_INTERP_CHILD=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  "$TESTS/test_kernels.py" -k "not sm90 and not subprocess" "$@"
