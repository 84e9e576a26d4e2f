#!/usr/bin/env bash
# Per-kernel GPU time of t5rt's decoding (Nsight Compute's gpu__time_duration, one pass, clocks
# left alone; graph nodes profiled one by one), for finding where a step goes when every
# operation is already one launch. Runs on the GPU machine after scripts/build-gpu-bundle.sh
# (carry ["gpu"]); writes $OUT/ncu-*.csv (one row per kernel launch).
#     NCU_CASES="bf16:1:32:8 f32:1:32:8" scripts/gpu-ncu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-ncu}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 120 python3 bench/gpu_peers.py --models t5-base --weights-only --work /tmp/gpu-peers-work \
  --out /tmp/gpu-ncu-peers
for spec in ${NCU_CASES:-bf16:1:32:8 f32:1:32:8}; do
  dt=${spec%%:*}
  case=${spec#*:}
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --csv --page raw \
    --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size ${NCU_ARGS:-} \
    gpu/t5rt bench --model /tmp/gpu-peers-work/t5-base --device cuda --dtype "$dt" --case "$case" \
    --repeats 1 --warmup 0 > "$OUT/ncu-$dt-${case//:/x}.csv" 2> "$OUT/ncu-$dt-${case//:/x}.err"
  echo "$spec: exit $? $(wc -l < "$OUT/ncu-$dt-${case//:/x}.csv") lines"
done
