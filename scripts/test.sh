#!/usr/bin/env bash
# The test command: the tree's habits (ruff lint + format, rustfmt, clippy), the Rust unit tests,
# then pytest (kernels run under TRITON_INTERPRET=1 there). Arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow and not e2e"     # the quick loop
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check python tests scripts kernels
python3 -m ruff format --check python tests scripts kernels
cargo fmt --check
cargo clippy --quiet --all-targets --features python -- -D warnings
cargo test --release --quiet
python3 -m pytest -q tests "$@"
