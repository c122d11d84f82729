# Sourced by the A/B scripts in this folder (bench/ab/*.sh); not run on its own.
#
# `one LABEL [--set k=v ...]` starts configs/agg.yaml (or $CONFIG) with those overrides and
# whatever environment the call carries, warms it with 64 requests at c=32, runs the harness at
# c=32 ($NUM requests, default 384; 100 tokens in, 64 out) into $OUT/LABEL, appends the load
# average and the report's c=32 row to $OUT/runs.txt, and stops the deployment. With $NUM1 set it
# first runs that many requests at c=1 into $OUT/LABEL-c1, for low-load latency. Each run gets a
# fresh deployment, because settings read at start (engine placement, gunicorn's shape) need one.
#
# $OUT is relative to the repository root; the calling script gives it a default under bench/out/
# (ignored by git). The deployment listens on $PORT (8100) with Redis database $REDIS_DB (5),
# which is flushed before each start. Server logs go to $OUT/logs/LABEL.log. The deployment runs
# from $TREE (default: this repository; another worktree to measure other code), the harness
# always from this repository, so both sides are measured alike.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${OUT:?set OUT before sourcing ab_one.sh}"
PORT=${PORT:-8100}
REDIS_DB=${REDIS_DB:-5}
export REDIS_URL=redis://127.0.0.1:6379/$REDIS_DB PORT
mkdir -p "$OUT/logs"
one() {  # $1 label, rest: --set flags
  local label=$1 log pid
  shift
  log="$OUT/logs/$label.log"
  redis-cli -n "$REDIS_DB" flushdb >/dev/null
  (cd "${TREE:-.}" && exec .venv/bin/python -m launcher serve -f "${CONFIG:-configs/agg.yaml}" \
     --set flower.enabled=false "$@") > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 180); do grep -q "ready: http" "$log" && break; sleep 1; done
  local bench=(.venv/bin/python -m bench run --url "http://127.0.0.1:$PORT/v1" --concurrency 32
               --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0)
  "${bench[@]}" --label warm --num-requests 64 --seed 9 --out "$OUT/warm" >/dev/null 2>&1
  echo "$label $* load=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/runs.txt"
  if [ -n "${NUM1:-}" ]; then
    "${bench[@]}" --label "$label" --concurrency 1 --num-requests "$NUM1" --out "$OUT/$label-c1" >/dev/null 2>&1
    grep "^| c=1 " "$OUT/$label-c1/report.md" >> "$OUT/runs.txt"
  fi
  "${bench[@]}" --label "$label" --num-requests "${NUM:-384}" --out "$OUT/$label" >/dev/null 2>&1
  grep "^| c=32" "$OUT/$label/report.md" >> "$OUT/runs.txt"
  kill -INT "$pid"
  wait "$pid"
}
