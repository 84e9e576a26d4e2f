#!/usr/bin/env bash
# Every test: the Rust workspace (cargo test), then the Python package, built with maturin into
# .venv-py (git-ignored, made here), with pytest (Ray's test starts a local Ray instance).
# Needs Rust, Python >= 3.10 with pip, and the network for the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -j2 --workspace
# The server end to end (the CLI binary the tests above built): concurrent and streamed
# requests answer as `t5rt generate` does (gpu-check.sh runs the same script on CUDA).
python3 scripts/serve-check.py --binary target/release/t5rt --device cpu
if [ ! -x .venv-py/bin/python ]; then
  python3 -m venv .venv-py
fi
.venv-py/bin/pip install --quiet --upgrade pip
.venv-py/bin/pip install --quiet pytest numpy "ray[data]"
CARGO_BUILD_JOBS=2 .venv-py/bin/pip install --quiet ./crates/t5rt-py
.venv-py/bin/python -m pytest -q crates/t5rt-py/tests

# The CUDA backend without a GPU: the library's unit tests, the CUDA tests and the kernel tests
# with --features cuda (the GPU tests say SKIPPED; the other test files do not change with the
# feature and ran above), the CLI builds with it, and NVRTC (from PyPI, pinned to CUDA 13.0 like
# the GPU machine's driver) compiles every kernel for sm_80 and sm_90.
.venv-py/bin/pip install --quiet "nvidia-cuda-nvrtc==13.0.*"
NVRTC_LIB=$(dirname "$(find "$PWD/.venv-py" -name 'libnvrtc.so.13' | head -1)")
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" T5RT_REQUIRE_NVRTC=1 \
  cargo test --release -j2 -p t5rt --features cuda --lib --test cuda --test kernels
cargo check --release -j2 -p t5rt-cli --features cuda
