#!/bin/bash
# A/B of the scheduler's niceness inside ONE deployment: renice vLLM's EngineCore process between
# harness runs (0, 10, alternating; FIRST=10 swaps the order). Usage: ROUNDS="1 2 3" ./ab.sh
# The deployment starts with engine.scheduler_nice=0 so that this script alone sets it.
cd /work/main
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
redis-cli -n 5 flushdb >/dev/null
.venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false --set engine.scheduler_nice=0 > /tmp/exp/launcher3.log 2>&1 &
LPID=$!
for i in $(seq 1 120); do grep -q "ready: http" /tmp/exp/launcher3.log && break; sleep 1; done
setnice() { for p in $(pgrep -f "VLLM::EngineCore"); do for t in /proc/$p/task/*; do renice -n $1 -p $(basename $t) >/dev/null; done; done; }
bench() { .venv/bin/python /work/main/bench/results/stream-batching-ab/cpu.py .venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --label $1 --concurrency 32 --num-requests 256 \
   --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 --out /tmp/exp/$1 | head -7 > /tmp/exp/$1.cpu; }
.venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --label warm --concurrency 32 --num-requests 64 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 --seed 9 --out /tmp/exp/warm >/dev/null 2>&1
for r in $ROUNDS; do
  if [ "${FIRST:-0}" = 10 ]; then setnice 10; bench nice10-$r; setnice 0; bench nice0-$r
  else setnice 0; bench nice0-$r; setnice 10; bench nice10-$r; fi
done
kill -INT $LPID; wait $LPID
