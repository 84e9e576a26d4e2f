#!/usr/bin/env bash
# One device call that does everything a GPU session needs measured (issue 9), so that the
# 15 minutes of device time go to one start: the machine's description, scripts/gpu-check.sh
# (every GPU test, short benches), then bench/gpu_peers.py (Hugging Face on the GPU against
# t5rt, same random-init weights). Build first, here: scripts/build-gpu-bundle.sh; then run it
# there with carry ["gpu"]. At most 8 files come back from $OUT, so the small ones are packed
# into $OUT/all.tgz and the ones worth reading at once are left beside it.
#     PEER_MODELS=t5-base PEER_TIMEOUT=300 scripts/gpu-session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  uname -a
  head -2 /etc/os-release
  nproc
  ldd gpu/t5rt | grep -i 'not found' && echo "MISSING LIBRARIES"
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

GPU_STEP_TIMEOUT=${GPU_STEP_TIMEOUT:-150} OUT="$OUT/check" scripts/gpu-check.sh > "$OUT/check.stdout" 2>&1
check=$?
echo "gpu-check exit $check"
tail -5 "$OUT/check.stdout"

# The libraries gpu-check found, for the peer run's t5rt too.
export LD_LIBRARY_PATH=$(sed -n 's/^LD_LIBRARY_PATH=//p' "$OUT/check/gpu-check.log" | head -1)
timeout "${PEER_TIMEOUT:-300}" python3 bench/gpu_peers.py --models "${PEER_MODELS:-t5-base}" \
  --repeats "${PEER_REPEATS:-3}" --out "$OUT/peers" --work /tmp/gpu-peers-work 2>&1 | tee "$OUT/peers.log"
echo "peers exit ${PIPESTATUS[0]}"

cp "$OUT/check/gpu-check.log" "$OUT/gpu-check.log" 2>/dev/null
cp "$OUT/peers/gpu_peers.md" "$OUT/gpu_peers.md" 2>/dev/null
tar czf "$OUT/all.tgz" -C "$OUT" check peers 2>/dev/null && rm -rf "$OUT/check" "$OUT/peers"
ls -la "$OUT"
