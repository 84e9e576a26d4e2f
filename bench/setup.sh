#!/usr/bin/env bash
# Creates .venv-bench (git-ignored) with the peer systems of the benchmark, pinned.
# torch from PyPI brings ~3 GB of CUDA wheels: fine for a benchmark venv, never used by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet -r bench/requirements.txt
