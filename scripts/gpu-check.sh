#!/usr/bin/env bash
# The one prepared GPU check (CUDA backend). Runs on the GPU machine, which has the NVIDIA
# driver, CUDA 13 libraries and Python but no Rust: build its inputs here first with
#     scripts/build-gpu-bundle.sh          # gpu/t5rt, gpu/test-cuda, gpu/test-kernels
# then run it there with gpu/ carried along (device tool: carry ["gpu"]):
#     scripts/gpu-check.sh
# It finds the CUDA libraries, runs every GPU test with T5RT_REQUIRE_GPU=1 (a missing GPU
# fails instead of skipping), a short `t5rt bench --device cuda`, and `t5rt serve --device cuda`
# against `t5rt generate` (scripts/serve-check.py). Everything it prints goes
# to $OUT/gpu-check.log, and a JSON summary to $OUT/gpu-check.json. Under 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: > "$LOG"
log() { echo "$@" | tee -a "$LOG"; }

# The CUDA libraries: cuBLAS(Lt) and NVRTC, wherever this machine keeps them (the toolkit, a
# PyTorch wheel's nvidia/ packages, ...).
libdirs=""
for lib in libcublasLt.so libcublas.so libnvrtc.so; do
  p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 ~ "^"l {print $NF; exit}')
  if [ -z "$p" ]; then
    p=$(find / -xdev \( -name "$lib.13*" -o -name "$lib" \) 2>/dev/null | head -1)
  fi
  [ -n "$p" ] && libdirs="$libdirs:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

export T5RT_REPO=$PWD T5RT_REQUIRE_GPU=1 T5RT_REQUIRE_NVRTC=1
status=0
run() {
  local name=$1; shift
  local t0=$(date +%s.%N)
  log "== $name: $*"
  timeout "${GPU_STEP_TIMEOUT:-240}" "$@" >>"$LOG" 2>&1
  local rc=$?
  local dt=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  log "== $name: exit $rc in ${dt}s"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $dt}" >> "$OUT/steps.jsonl"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/steps.jsonl"
run kernels gpu/test-kernels --test-threads=1 cuda --nocapture
T5RT_CUDA_GEMV_WARPS=2 run kernels-gemv-2-warps gpu/test-kernels --test-threads=1 cuda --nocapture
run model-tests gpu/test-cuda --test-threads=1 --nocapture
# The encoder's attention through the decoding kernel (the default is two batched products).
T5RT_CUDA_ENCODER_ATTENTION=step run model-tests-encoder-step gpu/test-cuda --test-threads=1 --nocapture
# Each decoding sublayer in one launch (off by default: measured slower; the kernel test
# above checks the chained kernels bit for bit against the separate launches).
T5RT_CUDA_CHAIN=1 run model-tests-chain gpu/test-cuda --test-threads=1 --nocapture
# Without programmatic dependent launches (the default on sm_90 and later).
T5RT_CUDA_PDL=0 run model-tests-no-pdl gpu/test-cuda --test-threads=1 --nocapture
# Decoding's sublayers without the fused norm/activation in gemv (the default fuses them).
T5RT_CUDA_FUSED_GEMV=0 run model-tests-unfused gpu/test-cuda --test-threads=1 --nocapture
# q/k/v (and other products of one input) one gemv launch each (the default shares one launch;
# the kernel test above checks it bit for bit against separate launches).
T5RT_CUDA_SHARED_GEMV=0 run model-tests-separate-gemv gpu/test-cuda --test-threads=1 --nocapture
for dtype in f32 bf16 f16; do
  run "bench-$dtype" gpu/t5rt bench --device cuda --dtype "$dtype" --case a --case 8:128:64 --case 32:128:64 \
      --repeats 3 --json "$OUT/bench-$dtype.json"
done
run generate gpu/t5rt generate --device cuda "spell: 1984" "spell: 42"
# The server on the GPU: concurrent requests (continuous batching) answer as `generate` does.
for dtype in f32 bf16; do
  run "serve-$dtype" python3 scripts/serve-check.py --binary gpu/t5rt --device cuda --dtype "$dtype"
done
python3 - "$OUT" <<'EOF' | tee -a "$LOG"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
bench = {}
for f in out.glob("bench-*.json"):
    rep = json.loads(f.read_text())
    bench[f.stem] = {c["name"]: round(c["tokens_per_s"]["median"], 1) for c in rep["cases"]}
    bench[f.stem]["device"] = rep["device"]
summary = {"passed": all(s["exit"] == 0 for s in steps), "steps": steps, "bench_tokens_per_s": bench}
(out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
EOF
exit $status
