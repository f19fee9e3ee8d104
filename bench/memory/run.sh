#!/usr/bin/env bash
# Issue 12's memory reproduction: the server's peak RSS (VmHWM) while
#   1. it indexes a --gallery folder holding a 40 MP 16-bit RGBA PNG and a GIF with a
#      40 MP canvas (start-up scan),
#   2. 16 concurrent GET /api/images/N/thumb of each (thumbnails not made yet: lazy path),
#   3. 8 concurrent POST /api/search with the PNG, then with the GIF,
#   4. POST /api/images of another 40 MP PNG, then 16 concurrent GETs of its thumbnail,
# with VmHWM and VmRSS read from /proc/PID/status after each step. Goal: VmHWM < 1 GB.
#
# usage: bench/memory/run.sh WEIGHTS
# env: PORT (18090), TARGET ($CARGO_TARGET_DIR/debug or target/debug), OUT (a new temp dir), SERVER_ARGS (extra flags)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WEIGHTS=${1:?usage: bench/memory/run.sh WEIGHTS}
PORT=${PORT:-18090}
TARGET=${TARGET:-${CARGO_TARGET_DIR:-target}/debug}
OUT=${OUT:-$(mktemp -d)}
cargo build -q -p search-server --bin search-server

python3 bench/memory/make_images.py "$OUT/images"
mkdir -p "$OUT/gallery/big"
cp "$OUT/images/big16.png" "$OUT/images/canvas.gif" "$OUT/gallery/big/"

# shellcheck disable=SC2086
"$TARGET/search-server" --data-dir "$OUT/data" --gallery "$OUT/gallery" --weights "$WEIGHTS" \
  --bind "127.0.0.1:$PORT" ${SERVER_ARGS:-} >"$OUT/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
until grep -q "listening on" "$OUT/server.log"; do
  kill -0 $PID 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
  sleep 0.5
done
URL="http://127.0.0.1:$PORT"

# Prints the peak RSS of the step just done and the RSS now, then resets the peak (writing 5
# to /proc/PID/clear_refs), so each line is that step's own peak; MAX is the whole run's.
MAX=0
mem() { # step name
  local hwm rss
  hwm=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
  rss=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
  ((hwm > MAX)) && MAX=$hwm
  printf '%-52s VmHWM %7.1f MB   VmRSS %7.1f MB\n' "$1" "$(echo "$hwm/1024" | bc -l)" "$(echo "$rss/1024" | bc -l)"
  echo 5 >"/proc/$PID/clear_refs" 2>/dev/null || true
}
statuses() { sort | uniq -c | awk '{printf "%s×%s ", $1, $2} END {print ""}'; }

mem "after start-up scan (PNG + GIF indexed)"

for id in 0 1; do
  t0=$(date +%s.%N)
  { for _ in $(seq 16); do
    curl -s -o /dev/null -w '%{http_code}\n' "$URL/api/images/$id/thumb" &
  done; wait; } | statuses
  mem "16 concurrent thumbs of item $id ($(printf '%.1f' "$(echo "$(date +%s.%N)-$t0" | bc)") s)"
done
for f in big16.png canvas.gif; do
  t0=$(date +%s.%N)
  { for _ in $(seq 8); do
    curl -s -o /dev/null -w '%{http_code}\n' -F "image=@$OUT/images/$f" "$URL/api/search?k=2" &
  done; wait; } | statuses
  mem "8 concurrent searches with $f ($(printf '%.1f' "$(echo "$(date +%s.%N)-$t0" | bc)") s)"
done
id=$(curl -s -F "image=@$OUT/images/big16-b.png" "$URL/api/images" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
mem "POST /api/images of another 40 MP PNG (id $id)"
{ for _ in $(seq 16); do
  curl -s -o /dev/null -w '%{http_code}\n' "$URL/api/images/$id/thumb" &
done; wait; } | statuses
mem "16 concurrent thumbs of the added image"
sleep 1
mem "idle 1 s later"
printf 'peak RSS over the whole run (VmHWM max): %.1f MB\n' "$(echo "$MAX/1024" | bc -l)"
kill $PID
wait $PID 2>/dev/null || true
echo "server log: $OUT/server.log"
