#!/bin/bash
# A/B of vLLM's shared-memory queue busy-loop (SpinCondition.busy_loop_s, 1 s stock, 0 = always
# wait on the zmq notification): each run starts configs/agg.yaml with LLMQ_SHM_BUSY_LOOP_S set,
# warms it, runs the harness at c=32, and stops it. Alternating order. Usage: ROUNDS="1 2 3" ./ab.sh
cd "$(dirname "$0")/../../.."
OUT=${OUT:-bench/results/shm-spin-ab}
mkdir -p $OUT
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
one() {  # $1 label, $2 busy_loop_s
  L=$1
  redis-cli -n 5 flushdb >/dev/null
  LLMQ_SHM_BUSY_LOOP_S=$2 .venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false > /tmp/ab-$L.log 2>&1 &
  LPID=$!
  for i in $(seq 1 180); do grep -q "ready: http" /tmp/ab-$L.log && break; sleep 1; done
  B=".venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --concurrency 32 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0"
  $B --label warm --num-requests 64 --seed 9 --out /tmp/ab-warm >/dev/null 2>&1
  echo "$L busy_loop_s=$2 load=$(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/runs.txt
  $B --label $L --num-requests 256 --out $OUT/$L >/dev/null 2>&1
  grep "^| c=32" $OUT/$L/report.md >> $OUT/runs.txt
  kill -INT $LPID; wait $LPID
}
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then one spin-$r 1; one nospin-$r 0
  else one nospin-$r 0; one spin-$r 1; fi
done
