#!/bin/bash
# Query-only QPS of our index and hnswlib's on the same vectors and queries, the two searchers
# running AT THE SAME TIME, one pinned to each core: this VM's pace drifts by up to 1.4× from
# minute to minute, which back-to-back runs cannot separate from the engines' difference.
#
#   bench/scale/qps-side-by-side.sh DIR TAG N [INDEXER] [EF_LIST]
#
# Needs, from bench/scale/growth-run.sh DIR … and one hnsw_peer.py --save-index run:
#   DIR/idx-TAG (our committed index, with queries.npy), DIR/v-TAG.npy (indexer export-vectors),
#   DIR/hnswlib-TAG.bin (hnsw_peer.py --save-index on that file).
# Writes DIR/sbs-TAG-{ours,hnswlib}-R.{log,json} for R in 1 2 (the cores swapped in round 2).
set -eu
B=$1 TAG=$2 N=$3 BIN=${4:-indexer}
EF=${5:-$(printf "128,256,%.0s" $(seq 12) | sed "s/,$//")}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
for r in 1 2; do
  if [ $r = 1 ]; then a=0 b=1; else a=1 b=0; fi
  taskset -c $a "$BIN" bench-synthetic --n "$N" --dim 512 --classes 1000 --queries 1000 --quantize int8 \
    --dir "$B/idx-$TAG" --reuse --ef-search "$EF" --json "$B/sbs-$TAG-ours-$r.json" > "$B/sbs-$TAG-ours-$r.log" 2>&1 &
  taskset -c $b python3 "$ROOT/bench/peers/hnsw_peer.py" "$B/v-$TAG.npy" --queries-file "$B/idx-$TAG/queries.npy" \
    --load-index "$B/hnswlib-$TAG.bin" --ef-search "$EF" --json "$B/sbs-$TAG-hnswlib-$r.json" > "$B/sbs-$TAG-hnswlib-$r.log" 2>&1 &
  wait
done
grep -H -E "^\| [0-9]+ \|" "$B"/sbs-"$TAG"-*.log
