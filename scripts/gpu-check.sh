#!/usr/bin/env bash
# The GPU check: the one prepared script for a lent GPU machine (driver for CUDA 13, PyTorch
# installed, no Rust), run from the repository root with .cuda/dist made by
# scripts/cuda-build.sh. It fits the device tool's 10-minute command limit by itself: every
# step gets its own time limit, capped by what is left of BUDGET.
#
#   1. nvidia-smi: which GPU and driver
#   2. CPU/CUDA parity tests of our CUDA kernels (depthwise conv, max/avg pool, fwd + grads)
#   3. our `trainer bench --device cuda` (EfficientNet-Lite0, real weights: embed + train step)
#   4. the PyTorch peer (bench/peers/cuda_bench.py) in the same run: fp32 NCHW, fp32
#      channels-last, bf16-autocast channels-last
#   5. a short full-network fine-tune on cub100 with `trainer train --device cuda`
#   6. the table (printed last, also $OUT/table.md)
#
# Data and weights: shared/data/cub100/CUB_200_2011 and shared/models/efficientnet-lite0/ when
# the checkout has them, else the copies cuda-build.sh packed into .cuda/dist
# (cub100-mini.tar: every class, fewer images; efficientnet-lite0-57934424.pth).
#
# Results under $OUT (default /tmp/gpu-check; at most 4 files, so the device tool brings all
# back): gpu-check.log (everything), bench.jsonl, finetune-metrics.jsonl, table.md.
# Environment: BATCH (128), ITERS (10), EPOCHS (4), BUDGET (seconds, 560).
# Exit status: 0 only if every step passed; 2 if .cuda/dist is incomplete.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIST=.cuda/dist
OUT="${OUT:-/tmp/gpu-check}"
BATCH="${BATCH:-128}"
ITERS="${ITERS:-10}"
EPOCHS="${EPOCHS:-4}"
BUDGET="${BUDGET:-560}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
: >"$OUT/bench.jsonl"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
status=0
declare -A RESULT

say() { printf '\n=== %s (%ds elapsed)\n' "$*" "$SECONDS" | tee -a "$LOG"; }
# limit WANT: WANT seconds, or what is left of BUDGET (keeping 20 s for the table) if less.
limit() {
  local left=$((BUDGET - SECONDS - 20))
  ((left < 5)) && left=5
  echo $(($1 < left ? $1 : left))
}
# step NAME WANT CMD...: runs CMD under its time limit, logs it (also to $WORK/NAME.out),
# records PASS/FAIL/TIMEOUT. Not in a pipeline: RESULT and status must survive.
step() {
  local name="$1" want="$2"; shift 2
  timeout "$(limit "$want")" "$@" 2>&1 | tee "$WORK/$name.out" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) RESULT[$name]=PASS ;;
    124) RESULT[$name]="TIMEOUT"; status=1 ;;
    *) RESULT[$name]="FAIL (exit $rc)"; status=1 ;;
  esac
  return "$rc"
}

for f in trainer-cuda-tests trainer; do
  [[ -f "$DIST/$f.gz" ]] || { echo "error: $DIST/$f.gz missing: run scripts/cuda-build.sh here and carry .cuda/dist" >&2; exit 2; }
  gunzip -c "$DIST/$f.gz" >"$WORK/$f" && chmod +x "$WORK/$f"
done
WEIGHTS=shared/models/efficientnet-lite0/efficientnet-lite0-57934424.pth
[[ -f "$WEIGHTS" ]] || WEIGHTS="$DIST/efficientnet-lite0-57934424.pth"
CUB=shared/data/cub100/CUB_200_2011
if [[ ! -f "$CUB/images.txt" && -f "$DIST/cub100-mini.tar" ]]; then
  tar -xf "$DIST/cub100-mini.tar" -C "$WORK" && CUB="$WORK/CUB_200_2011"
fi
[[ -f "$WEIGHTS" ]] || { echo "error: no EfficientNet-Lite0 weights ($WEIGHTS): run scripts/cuda-build.sh with ../shared present" >&2; exit 2; }

say "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"

say "parity tests (CPU vs CUDA kernels)"
step parity 150 "$WORK/trainer-cuda-tests" ops::cuda_tests device:: --test-threads 2 --nocapture
if grep -q "skipping: no usable CUDA device" "$WORK/parity.out"; then
  echo "error: the parity tests found no CUDA device" | tee -a "$LOG"; RESULT[parity]="FAIL (no GPU)"; status=1
fi
PARITY_LINE="$(grep -E '^test result:' "$WORK/parity.out" | tail -n1)"

say "ours: trainer bench --device cuda (batch $BATCH)"
step ours 150 "$WORK/trainer" bench --device cuda --weights "$WEIGHTS" --batch "$BATCH" \
  --iters "$ITERS" --json "$WORK/ours.json"
if [[ -f "$WORK/ours.json" ]]; then
  python3 - "$WORK/ours.json" "$GPU" >>"$OUT/bench.jsonl" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["engines"][0]
print(json.dumps({"impl": e["engine"], "device": sys.argv[2], "batch": r["batch"], "size": r["size"],
                  "embed_images_per_sec": e["embed_img_s"], "train_images_per_sec": e["train_img_s"],
                  "latency_ms": e["latency_ms"]}))
PY
fi

for extra in "" "--channels-last" "--channels-last --bf16"; do
  name="torch${extra// /}"
  say "PyTorch peer ${extra:-NCHW} (batch $BATCH)"
  # shellcheck disable=SC2086  # $extra is a list of flags
  step "$name" 60 python3 bench/peers/cuda_bench.py --batch "$BATCH" --iters "$ITERS" $extra
  grep '^{' "$WORK/$name.out" >>"$OUT/bench.jsonl"
done

say "full-network fine-tune on cub100 ($CUB), $EPOCHS epochs, --device cuda"
if [[ -f "$CUB/images.txt" ]]; then
  step finetune 240 "$WORK/trainer" train --device cuda --dataset cub --data "$CUB" \
    --weights "$WEIGHTS" --out "$WORK/finetune" --freeze-until 0 --loss multi-similarity \
    --embedding-dim 1280 --head-init identity --lr 2e-5 --head-lr 2e-4 --epochs "$EPOCHS" \
    --eval-every 2 --eval-batch-size 128
  cp "$WORK/finetune/metrics.jsonl" "$OUT/finetune-metrics.jsonl" 2>/dev/null
else
  echo "error: no cub100 data (shared/data/cub100 or $DIST/cub100-mini.tar)" | tee -a "$LOG"
  RESULT[finetune]="FAIL (no data)"; status=1
fi

say "summary"
{
  echo "## GPU check: ${GPU:-unknown GPU}, batch $BATCH, ${ITERS} iterations, $(date -u +%Y-%m-%d)"
  echo
  echo "| step | result |"
  echo "| --- | --- |"
  for s in parity ours torch torch--channels-last torch--channels-last--bf16 finetune; do
    echo "| $s | ${RESULT[$s]:-not run} |"
  done
  echo
  echo "Parity tests: ${PARITY_LINE:-no result line}"
  echo
  python3 - "$OUT/bench.jsonl" "$OUT/finetune-metrics.jsonl" "$CUB" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| implementation (EfficientNet-Lite0, 224²) | batch | embed img/s | train img/s |")
print("| --- | ---: | ---: | ---: |")
for r in rows:
    f = lambda k: f"{r[k]:,.0f}" if isinstance(r.get(k), (int, float)) else "—"
    print(f"| {r['impl']} | {r['batch']} | {f('embed_images_per_sec')} | {f('train_images_per_sec')} |")
ours = next((r for r in rows if r["impl"].startswith("trainer")), None)
ref = next((r for r in rows if r["impl"].endswith("channels-last-bf16")), None)
if ours and ref:
    for k, what in (("embed_images_per_sec", "embed"), ("train_images_per_sec", "train")):
        if ours.get(k) and ref.get(k):
            print(f"\nours / PyTorch bf16 channels-last, {what}: {ours[k] / ref[k]:.2f}×", end="")
    print()
print()
if os.path.exists(sys.argv[2]):
    lines = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
    base = next((l for l in lines if l.get("model") == "pretrained"), None)
    last = [l for l in lines if l.get("model") != "pretrained"]
    data = "cub100" if "shared" in sys.argv[3] else "cub100-mini (every class, fewer images)"
    print(f"Full-network fine-tune on {data}, --device cuda:")
    if base:
        print(f"pretrained R@1 {100 * base['recall@1']:.2f}", end="")
    for l in last:
        print(f"; epoch {l['epoch']} R@1 {100 * l['recall@1']:.2f}"
              f" ({l.get('train_images_per_sec', float('nan')):.0f} train img/s)", end="")
    print()
else:
    print("Full-network fine-tune: no metrics (see gpu-check.log)")
PY
} | tee "$OUT/table.md" | tee -a "$LOG"
exit $status
