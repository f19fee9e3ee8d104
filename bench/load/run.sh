#!/usr/bin/env bash
# The search-server load goals, measured in one run on this machine:
#   1. the model alone: `trainer bench` (network only, batch 1 latency and batch $BATCH img/s;
#      batch 32 by default, the model's best throughput here, so the ratio is the strict one)
#   2. the server as the README starts it, on a gallery folder (indexed once into $DATA)
#   3. `load` with 1, 8, 16 and 32 clients posting real photos
#   4. the goals: 0 errors; QPS >= 90% of the batch embed throughput; single-client p50 <=
#      single-image embed + 5 ms. Peak RSS from the server's VmHWM.
#
# usage: bench/load/run.sh WEIGHTS GALLERY_DIR [QUERY_IMAGE...]
#   (default queries: the first image of 16 class folders of the gallery)
# env: SECONDS_PER_RUN (20), BATCH (32), DATA (/tmp/dm-load),
#      PORT (18080), TARGET (target/debug)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WEIGHTS=${1:?usage: bench/load/run.sh WEIGHTS GALLERY_DIR [QUERY_IMAGE...]}
GALLERY=${2:?usage: bench/load/run.sh WEIGHTS GALLERY_DIR [QUERY_IMAGE...]}
shift 2
T=${SECONDS_PER_RUN:-20}
BATCH=${BATCH:-32}
DATA=${DATA:-/tmp/dm-load}
PORT=${PORT:-18080}
TARGET=${TARGET:-target/debug}
OUT=$(mktemp -d)
cargo build -q -p trainer -p search-server --bins --example load

queries=("$@")
if [[ ${#queries[@]} -eq 0 ]]; then
  mapfile -t queries < <(find "$GALLERY" -mindepth 1 -maxdepth 1 -type d | sort | tail -16 |
    while read -r d; do find "$d" -maxdepth 1 -type f -name '*.jpg' | sort | head -1; done)
fi
args=()
for q in "${queries[@]}"; do args+=(--image "$q"); done

echo "== model alone (trainer bench, batch 1 and $BATCH)"
"$TARGET/trainer" bench --weights "$WEIGHTS" --iters 5 --batch "$BATCH" --json "$OUT/model.json" | tail -3

echo "== server (gallery $GALLERY, data dir $DATA)"
"$TARGET/search-server" --data-dir "$DATA" --gallery "$GALLERY" --weights "$WEIGHTS" \
  --bind "127.0.0.1:$PORT" >"$OUT/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
until grep -q "listening on" "$OUT/server.log"; do
  kill -0 $PID 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
  sleep 1
done
grep -E "gallery scan done" "$OUT/server.log" || true

: >"$OUT/load.jsonl"
for c in 1 8 16 32; do
  "$TARGET/examples/load" --addr "127.0.0.1:$PORT" --clients $c --seconds "$T" --pid $PID \
    "${args[@]}" --json | grep '^{' >>"$OUT/load.jsonl"
done
kill $PID; wait $PID 2>/dev/null || true

python3 - "$OUT/model.json" "$OUT/load.jsonl" "$BATCH" <<'PY'
import json, sys
model = json.load(open(sys.argv[1]))
ours = next(e for e in model["engines"] if e["engine"].startswith("trainer"))
latency, thru = ours["latency_ms"], ours["embed_img_s"]
rows = [json.loads(l) for l in open(sys.argv[2])]
print(f"model: single image {latency:.1f} ms, batch {sys.argv[3]} {thru:.1f} img/s")
print(f"{'clients':>7} {'QPS':>6} {'% of batch':>10} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'peak RSS MiB':>12}")
for r in rows:
    print(f"{r['clients']:>7} {r['qps']:>6.1f} {100*r['qps']/thru:>9.0f}% {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6} {r['server_vmhwm_kib']/1024:>12.0f}")
best = max(r["qps"] for r in rows)
one = next(r for r in rows if r["clients"] == 1)
errors = sum(r["errors"] for r in rows)
print(f"goal 0 errors: {'met' if errors == 0 else 'NOT met'} ({errors})")
print(f"goal QPS >= 90% of batch throughput: {'met' if best >= 0.9 * thru else 'NOT met'} ({best:.1f} vs {0.9*thru:.1f})")
print(f"goal 1-client p50 <= embed + 5 ms: {'met' if one['p50_ms'] <= latency + 5 else 'NOT met'} ({one['p50_ms']:.1f} vs {latency + 5:.1f})")
PY
