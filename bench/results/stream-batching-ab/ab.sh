#!/bin/bash
# A/B: CPU seconds per process, old tree vs new tree, same venv, alternating.
cd /work/main
for round in 1 2; do
for tree in /tmp/old /work/main; do
  name=$(basename $tree)
  redis-cli -n 3 flushdb >/dev/null
  (cd $tree && setsid /work/main/.venv/bin/python -m launcher serve -f configs/agg.yaml --set redis_url=redis://127.0.0.1:6379/3 --set flower.enabled=false > /tmp/ab-$name-$round.log 2>&1 &)
  for i in $(seq 90); do grep -q "\[launcher\] ready" /tmp/ab-$name-$round.log && break; sleep 2; done
  /work/main/.venv/bin/python -m bench run --url http://127.0.0.1:8000/v1 --label w --model tiny-llama --concurrency 32 --num-requests 64 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 --seed 99 --out /tmp/ab-warm > /dev/null 2>&1
  echo "== $name round $round load $(cut -d' ' -f1 /proc/loadavg)"
  /work/main/.venv/bin/python /tmp/cpu.py /work/main/.venv/bin/python -m bench run --url http://127.0.0.1:8000/v1 --label $name --model tiny-llama --concurrency 32 --num-requests 512 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 --seed $round --out /tmp/ab-$name-$round | head -8
  grep "^| c=32" /tmp/ab-$name-$round/report.md | cut -d'|' -f2-8
  pkill -INT -f "launcher serve"; for i in $(seq 30); do pgrep -f "launcher serve" >/dev/null || break; sleep 1; done
  sleep 3
done
done
