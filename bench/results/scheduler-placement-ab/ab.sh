#!/bin/bash
# A/B of engine.scheduler_on_runner_cores (vLLM's scheduler process pinned to its model runner's core, or free):
# each run starts configs/agg.yaml with the given --set flags, warms it, runs the harness at c=32,
# and stops it. Usage: ROUNDS="1 2 3" ./ab.sh
cd "$(dirname "$0")/../../.."
OUT=${OUT:-bench/results/scheduler-placement-ab}
mkdir -p $OUT
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
one() {  # $1 label, rest: --set flags
  L=$1; shift
  redis-cli -n 5 flushdb >/dev/null
  .venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false "$@" > /tmp/ab-$L.log 2>&1 &
  LPID=$!
  for i in $(seq 1 180); do grep -q "ready: http" /tmp/ab-$L.log && break; sleep 1; done
  B=".venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --concurrency 32 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0"
  $B --label warm --num-requests 64 --seed 9 --out /tmp/ab-warm >/dev/null 2>&1
  echo "$L $* load=$(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/runs.txt
  $B --label $L --num-requests 384 --out $OUT/$L >/dev/null 2>&1
  grep "^| c=32" $OUT/$L/report.md >> $OUT/runs.txt
  kill -INT $LPID; wait $LPID
}
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then one free-$r --set engine.scheduler_on_runner_cores=false; one pinned-$r
  else one pinned-$r; one free-$r --set engine.scheduler_on_runner_cores=false; fi
done
