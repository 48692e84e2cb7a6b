#!/usr/bin/env bash
# The test command: Rust unit tests, then pytest (kernels run under TRITON_INTERPRET=1 there).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --quiet
python3 -m pytest -q tests "$@"
