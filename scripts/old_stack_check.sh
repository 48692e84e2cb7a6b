#!/usr/bin/env bash
# The kernel interpreter tests on the GPU box's stack: Python 3.12, torch 2.11, Triton 3.6, and a
# numpy below 2.4 (Triton < 3.7's interpreter breaks on numpy >= 2.4: int() of a 1-element array
# in `range(0, V, BLOCK)` loops, "only 0-dimensional arrays can be converted to Python scalars").
# Builds (once) a second venv with those versions and the abi3 wheel, then runs tests/test_kernels.py
# under TRITON_INTERPRET=1 only (no GPU needed). CI's stack is the normal test run.
# kernels/_backend.py also works around that interpreter bug, so NUMPY="numpy>=2.4" passes too.
#   bash scripts/old_stack_check.sh            # VENV=/path PY312=/path/to/python3.12 NUMPY=spec
set -euo pipefail
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
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# from a scratch dir so `import rustchat` is the installed wheel, not python/ of the checkout
TESTS=$(pwd)/tests
cd "$(mktemp -d)"
TRITON_INTERPRET=1 RUSTCHAT_KERNELS_INTERP_CHILD=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  "$TESTS/test_kernels.py" -k "not sm90 and not subprocess" "$@"
