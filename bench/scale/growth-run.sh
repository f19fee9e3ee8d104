#!/bin/bash
# Growth points for issue 15: for each N:TAG, our int8 index (build process, then a separate
# search process on the committed index), then hnswlib on the same exported vectors and
# queries. Every process runs under `/usr/bin/time -v` for its peak RSS. Run it on a quiet
# machine; then `python3 bench/scale/growth.py collect DIR --out …` and `… plot …`.
#
#   bench/scale/growth-run.sh DIR [INDEXER] -- 250000:250k 500000:500k 1000000:1m 2000000:2m
#
# KEEP=1 keeps DIR/v-TAG.npy and saves hnswlib's index as DIR/hnswlib-TAG.bin: what
# bench/scale/qps-side-by-side.sh needs afterwards.
set -u
B=$1; shift
BIN=indexer
if [ "${1:-}" != "--" ]; then BIN=$1; shift; fi
[ "${1:-}" = "--" ] && shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT=$B/json
mkdir -p "$OUT"
point() { # N TAG
  local N=$1 TAG=$2 D=$B/idx-$2
  rm -rf "$D"
  echo "$(date -u +%T) start ours-$TAG" >> "$B/progress"
  /usr/bin/time -v "$BIN" bench-synthetic --n "$N" --dim 512 --classes 1000 --queries 1000 --quantize int8 \
    --dir "$D" --ef-search 16,32,64,128,256 --json "$OUT/synthetic-$TAG-512d-mmap.json" \
    > "$B/ours-$TAG.log" 2> "$B/ours-$TAG.err"
  echo "$(date -u +%T) start reuse-$TAG" >> "$B/progress"
  /usr/bin/time -v "$BIN" bench-synthetic --n "$N" --dim 512 --classes 1000 --queries 1000 --quantize int8 \
    --dir "$D" --reuse --ef-search 32,64,128 --json "$OUT/synthetic-$TAG-512d-mmap-reuse.json" \
    > "$B/reuse-$TAG.log" 2> "$B/reuse-$TAG.err"
  "$BIN" export-vectors --index "$D" --out "$B/v-$TAG.npy" > /dev/null
  echo "$(date -u +%T) start hnswlib-$TAG" >> "$B/progress"
  local save=()
  [ -n "${KEEP:-}" ] && save=(--save-index "$B/hnswlib-$TAG.bin")
  /usr/bin/time -v python3 "$ROOT/bench/peers/hnsw_peer.py" "$B/v-$TAG.npy" --queries-file "$D/queries.npy" \
    --threads 2 --ef-search 16,32,64,128,256 --json "$OUT/synthetic-$TAG-512d-hnswlib.json" "${save[@]}" \
    > "$B/hnswlib-$TAG.log" 2> "$B/hnswlib-$TAG.err"
  [ -n "${KEEP:-}" ] || rm -f "$B/v-$TAG.npy"
  echo "$(date -u +%T) end $TAG" >> "$B/progress"
}
for spec in "$@"; do point "${spec%%:*}" "${spec##*:}"; done
echo "$(date -u +%T) all done" >> "$B/progress"
