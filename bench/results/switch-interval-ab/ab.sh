#!/bin/bash
# A/B of the frontend's GIL switch interval: each run starts configs/agg.yaml with gunicorn's
# workers at 5 ms (Python's default) or 0.5 ms (LLMQ_EXP_SWITCH, read by app/gunicorn_conf.py's
# post_fork while this A/B ran), loads it with the harness, and stops it. Order A B B A per pair
# of rounds, so a drift over time favours neither. Usage: ROUNDS="1 2 3" ./ab.sh
cd "$(dirname "$0")/../../.."
OUT=bench/results/switch-interval-ab
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
one() {  # $1 switch interval (s), $2 label
  redis-cli -n 5 flushdb >/dev/null
  LLMQ_EXP_SWITCH=$1 .venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false > /tmp/ab-$2.log 2>&1 &
  LPID=$!
  for i in $(seq 1 180); do grep -q "ready: http" /tmp/ab-$2.log && break; sleep 1; done
  B=".venv/bin/python -m bench run --url http://127.0.0.1:8100/v1 --concurrency 32 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0"
  $B --label warm --num-requests 64 --seed 9 --out /tmp/ab-warm >/dev/null 2>&1
  echo "$2 switch=$1 load=$(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/runs.txt
  $B --label $2 --num-requests 384 --out $OUT/$2 >/dev/null 2>&1
  grep "^| c=32" $OUT/$2/report.md >> $OUT/runs.txt
  kill -INT $LPID; wait $LPID
}
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then one 0.005 default-$r; one 0.0005 short-$r; else one 0.0005 short-$r; one 0.005 default-$r; fi
done
