#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (driver for CUDA 13, PyTorch installed),
# from the repository root, with .cuda/dist built by scripts/cuda-build.sh. No Rust needed.
#
#   1. CPU/CUDA parity tests of our CUDA kernels (depthwise conv, max/avg pool, fwd + grads)
#   2. EfficientNet-Lite0 embed + train-step throughput of our build (cuda_bench example)
#   3. the same with PyTorch (bench/peers/cuda_bench.py), NCHW and channels-last
#   4. a table of the throughputs (printed last)
#
# Each step has its own time limit; the whole check fits in ~10 minutes on an H100/H200.
# Results are also written under $OUT (or /tmp/gpu-check), so the device tool brings them back.
# Environment: BATCH (default 128), ITERS (default 10).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIST=.cuda/dist
OUT="${OUT:-/tmp/gpu-check}"
BATCH="${BATCH:-128}"
ITERS="${ITERS:-10}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0

say() { printf '\n=== %s\n' "$*"; }
for f in trainer-cuda-tests cuda-bench; do
  [[ -f "$DIST/$f.gz" ]] || { echo "error: $DIST/$f.gz missing: run scripts/cuda-build.sh and carry .cuda/dist" >&2; exit 2; }
  gunzip -c "$DIST/$f.gz" >"$WORK/$f" && chmod +x "$WORK/$f"
done

say "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"

say "parity tests (CPU vs CUDA kernels)"
timeout 300 "$WORK/trainer-cuda-tests" ops::cuda_tests device:: --test-threads 2 --nocapture 2>&1 | tee "$OUT/parity.txt"
parity=${PIPESTATUS[0]}
if grep -q "skipping: no usable CUDA device" "$OUT/parity.txt"; then
  echo "error: the parity tests found no CUDA device" >&2; parity=1
fi
[[ $parity -eq 0 ]] || status=1

: >"$OUT/bench.jsonl"
say "deep-metric cuda_bench (batch $BATCH)"
timeout 240 "$WORK/cuda-bench" --device cuda --batch "$BATCH" --iters "$ITERS" 2>&1 | tee "$OUT/ours.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
grep '^{' "$OUT/ours.txt" >>"$OUT/bench.jsonl"

for extra in "" --channels-last; do
  say "PyTorch peer ${extra:-NCHW} (batch $BATCH)"
  timeout 150 python3 bench/peers/cuda_bench.py --batch "$BATCH" --iters "$ITERS" $extra 2>&1 | tee "$OUT/torch$extra.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  grep '^{' "$OUT/torch$extra.txt" >>"$OUT/bench.jsonl"
done

say "summary"
echo "parity tests: $([[ $parity -eq 0 ]] && echo PASSED || echo FAILED)"
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'implementation':<40} {'batch':>5} {'embed img/s':>12} {'train img/s':>12}")
for r in rows:
    print(f"{r['impl']:<40} {r['batch']:>5} {r['embed_images_per_sec']:>12.0f} {r['train_images_per_sec']:>12.0f}")
PY
rm -rf "$WORK"
exit $status
