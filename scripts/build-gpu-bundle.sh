#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on the GPU machine (which has no Rust): the CLI and the
# CUDA test binaries, with --features cuda, stripped, into gpu/ (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu
cargo build --release -j2 -p t5rt-cli --features cuda
strip -o gpu/t5rt target/release/t5rt
for t in cuda kernels; do
  bin=$(cargo test --release -j2 -p t5rt --features cuda --test "$t" --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["executable"])' | tail -1)
  strip -o "gpu/test-$t" "$bin"
done
ls -la gpu/
