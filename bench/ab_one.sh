# Sourced by the A/B scripts under bench/results/*/ab.sh. `one LABEL [--set k=v ...]` starts
# configs/agg.yaml (or $CONFIG) with those flags and whatever environment the call carries, warms
# it with 64 requests, runs the harness at c=32 ($NUM requests, 100 in / 64 out) into $OUT/LABEL,
# appends the load average and the report's c=32 row to $OUT/runs.txt, and stops it. With $NUM1
# set it first runs that many requests at c=1 into $OUT/LABEL-c1, for low-load latency. A fresh
# deployment per run: settings read at start (engine placement, gunicorn's shape) need one.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
one() {  # $1 label, rest: --set flags
  L=$1; shift
  redis-cli -n 5 flushdb >/dev/null
  .venv/bin/python -m launcher serve -f "${CONFIG:-configs/agg.yaml}" --set flower.enabled=false "$@" > /tmp/ab-$L.log 2>&1 &
  LPID=$!
  for i in $(seq 1 180); do grep -q "ready: http" /tmp/ab-$L.log && break; sleep 1; done
  B=".venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --concurrency 32 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0"
  $B --label warm --num-requests 64 --seed 9 --out /tmp/ab-warm >/dev/null 2>&1
  echo "$L $* load=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/runs.txt"
  if [ -n "${NUM1:-}" ]; then
    $B --label "$L" --concurrency 1 --num-requests "$NUM1" --out "$OUT/$L-c1" >/dev/null 2>&1
    grep "^| c=1 " "$OUT/$L-c1/report.md" >> "$OUT/runs.txt"
  fi
  $B --label "$L" --num-requests "${NUM:-384}" --out "$OUT/$L" >/dev/null 2>&1
  grep "^| c=32" "$OUT/$L/report.md" >> "$OUT/runs.txt"
  kill -INT $LPID; wait $LPID
}
