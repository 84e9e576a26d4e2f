#!/usr/bin/env bash
# One device call that does everything a GPU session needs measured (issue 9), so that the
# 15 minutes of device time go to one start: the machine's description, scripts/gpu-check.sh
# (every GPU test, short benches), then bench/gpu_peers.py (Hugging Face on the GPU against
# t5rt, same random-init weights). Build first, here: scripts/build-gpu-bundle.sh; then run it
# there with carry ["gpu"]. At most 8 files come back from $OUT, so the small ones are packed
# into $OUT/all.tgz and the ones worth reading at once are left beside it.
#     PEER_MODELS=t5-base,t5-small,flan-t5-small PEER_TIMEOUT=300 scripts/gpu-session.sh
# (PEER_MODELS defaults to t5-base alone; each model runs with its own PEER_TIMEOUT.)
# PEER_VARIANTS="chain:T5RT_CUDA_CHAIN=1" adds t5rt rows run with those environment variables
# (space-separated NAME:VAR=VALUE[,VAR=VALUE]) to the same peer table. FLOOR=0 skips the
# launch-floor microbenchmark (bench/gpu_launch_floor.cu).
set -uo pipefail
cd "$(dirname "$0")/.."
# Every A/B run below, by name (AB picks some).
ALL_AB="graphs enc pdl fused chain gemv shared"
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

# The chained sublayers are left out of the peer rows and A/B runs below when their model
# tests failed in gpu-check while the default's passed (a broken kernel would only fail or
# stall there too).
if grep -q '"step": "model-tests-chain", "exit": [1-9]' "$OUT/check/steps.jsonl" 2>/dev/null \
   && grep -q '"step": "model-tests", "exit": 0' "$OUT/check/steps.jsonl"; then
  echo "model-tests-chain failed: no T5RT_CUDA_CHAIN runs below"
  PEER_VARIANTS=$(for v in ${PEER_VARIANTS:-}; do [[ $v == *T5RT_CUDA_CHAIN=* ]] || echo "$v"; done | xargs)
  AB=$(for a in ${AB:-$ALL_AB}; do [ "$a" = chain ] || echo "$a"; done | xargs)
  AB=${AB:-none}
fi

# The libraries gpu-check found, for the peer run's t5rt too.
export LD_LIBRARY_PATH=$(sed -n 's/^LD_LIBRARY_PATH=//p' "$OUT/check/gpu-check.log" | head -1)
# One model per run (its own timeout and report), t5-base first: the targets' model.
# PEERS=0: no Hugging Face run, only t5-base's weights for the t5rt A/B runs below.
: > "$OUT/peers.log"
if [ "${PEERS:-1}" = 0 ]; then
  timeout 120 python3 bench/gpu_peers.py --models t5-base --weights-only --work /tmp/gpu-peers-work \
    --out "$OUT/peers" 2>&1 | tee -a "$OUT/peers.log"
fi
for model in $( [ "${PEERS:-1}" = 0 ] || echo "${PEER_MODELS:-t5-base}" | tr ',' ' '); do
  variants=()
  for v in ${PEER_VARIANTS:-}; do variants+=(--variant "$v"); done
  timeout "${PEER_TIMEOUT:-300}" python3 bench/gpu_peers.py --models "$model" ${variants[@]+"${variants[@]}"} \
    --repeats "${PEER_REPEATS:-3}" --out "$OUT/peers/$model" --work /tmp/gpu-peers-work 2>&1 \
    | tee -a "$OUT/peers.log"
  echo "peers $model exit ${PIPESTATUS[0]}"
  cat "$OUT/peers/$model/gpu_peers.md" >> "$OUT/gpu_peers.md" 2>/dev/null
done

# `t5rt bench` on t5-base (f32, then bf16) with the switch VAR set to each of VALUES in turn:
#     ab PREFIX VAR "VALUES" BENCH-ARGS...   -> $OUT/graphs/PREFIX<value>-<dtype>.json
mkdir -p "$OUT/graphs"
ab() {
  local prefix=$1 var=$2 values=$3
  shift 3
  [ -d /tmp/gpu-peers-work/t5-base ] || return 0
  for v in $values; do
    for dt in f32 bf16; do
      env "$var=$v" timeout 120 gpu/t5rt bench --model /tmp/gpu-peers-work/t5-base --device cuda \
        --dtype "$dt" "$@" --repeats 3 --json "$OUT/graphs/$prefix$v-$dt.json" 2>&1 \
        | tee -a "$OUT/graphs.log"
    done
  done
}

# Which A/B runs (AB: space-separated names of ALL_AB; default all).
want() { [[ " ${AB:-$ALL_AB} " == *" $1 "* ]]; }
# Decoding steps with and without CUDA graphs: same binary, same t5-base weights, alternated.
want graphs && ab r1-g T5RT_CUDA_GRAPHS "1 0" --case a --case 1:512:64 --case 32:512:64
# The encoder's attention: two batched products (gemm, the default), the decoding kernel
# (step), the first kernel (block), at 1 x 512 and 32 x 512.
want enc && ab enc- T5RT_CUDA_ENCODER_ATTENTION "gemm step block" --case 1:512:64 --case 32:512:64
# Programmatic dependent launches of gemv and attention_step (the default) or plain launches.
want pdl && ab pdl- T5RT_CUDA_PDL "1 0" --case a --case 1:512:64 --case 8:128:64 --case 32:128:64
# Decoding's RMSNorm and feed-forward activation fused into gemv (the default) or not.
want fused && ab fused- T5RT_CUDA_FUSED_GEMV "1 0" --case a --case 8:128:64
# Each decoding sublayer in one launch (off by default) or the separate kernels.
want chain && ab chain- T5RT_CUDA_CHAIN "0 1" --case a --case 1:512:64 --case 4:512:64 --case 8:128:64 --case 32:128:64
# gemv's columns per block: 8 (the default) against 4, at batch 1 and 8.
want gemv && ab gemv- T5RT_CUDA_GEMV_WARPS "8 4" --case a --case 8:128:64
# Products of one input in one gemv launch (the default) against one launch each.
want shared && ab shared- T5RT_CUDA_SHARED_GEMV "1 0" --case a --case 8:128:64

# Where a step's time goes: every operation synchronized and timed (graphs off), few steps.
if [ -d /tmp/gpu-peers-work/t5-base ]; then
  for spec in "f32 1:32:16" "bf16 1:32:16" "bf16 32:512:8" "f32 32:512:8"; do
    set -- $spec
    T5RT_CUDA_PROFILE=1 timeout 60 gpu/t5rt bench --model /tmp/gpu-peers-work/t5-base --device cuda \
      --dtype $1 --case $2 --repeats 1 --warmup 0 2>&1 | tee -a "$OUT/profile.log"
  done
fi

# The floor of ~100 dependent kernels (empty, and each reading 1.25 MiB), in a stream and in a
# graph, against one persistent kernel with as many grid-wide barriers (bench/gpu_launch_floor.cu,
# built here with nvcc): how much of a batch-1 step a persistent decoding kernel could save.
if [ "${FLOOR:-1}" = 1 ]; then
  { nvcc -O2 -arch=native -o /tmp/gpu_launch_floor bench/gpu_launch_floor.cu \
      && timeout 60 /tmp/gpu_launch_floor; } 2>&1 | tee "$OUT/graphs/launch_floor.txt"
fi

# The card's copy bandwidth (bytes read + written), for the floor of a decoding step.
python3 - <<'PY' 2>&1 | tee "$OUT/bandwidth.txt"
import torch
x = torch.randint(0, 255, (2**31,), dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
ts = []
for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); y.copy_(x); b.record(); b.synchronize()
    ts.append(a.elapsed_time(b) / 1000)
ts.sort()
print(f"device-to-device copy, 2 GiB: median {2 * x.numel() / ts[5] / 1e12:.2f} TB/s (read + write), {torch.cuda.get_device_name(0)}")
PY

mv "$OUT/bandwidth.txt" "$OUT/graphs/" 2>/dev/null
cp "$OUT/check/gpu-check.log" "$OUT/gpu-check.log" 2>/dev/null
tar czf "$OUT/all.tgz" -C "$OUT" check peers graphs 2>/dev/null && rm -rf "$OUT/check" "$OUT/peers" "$OUT/graphs"
ls -la "$OUT"
