#!/usr/bin/env bash
# Creates .venv (git-ignored) with the pinned reference stack used by the scripts in tools/.
# Only needed to regenerate fixtures or retrain the bundled model; tests and CI never need it.
# Note: torch from PyPI brings ~3 GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r tools/requirements.txt
.venv/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
