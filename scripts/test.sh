#!/usr/bin/env bash
# Every test: the Rust workspace (cargo test), then the Python package, built with maturin into
# .venv-py (git-ignored, made here), with pytest (Ray's test starts a local Ray instance).
# Needs Rust, Python >= 3.10 with pip, and the network for the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -j2 --workspace
if [ ! -x .venv-py/bin/python ]; then
  python3 -m venv .venv-py
fi
.venv-py/bin/pip install --quiet --upgrade pip
.venv-py/bin/pip install --quiet pytest numpy "ray[data]"
CARGO_BUILD_JOBS=2 .venv-py/bin/pip install --quiet ./crates/t5rt-py
.venv-py/bin/python -m pytest -q crates/t5rt-py/tests
