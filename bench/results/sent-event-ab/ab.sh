#!/usr/bin/env bash
# Celery's task-sent event on and off (tasks/celery_app.py task_send_sent_event), alternately,
# each in a fresh agg deployment: 48 requests at concurrency 1 (100-in/64-out synthetic), twice
# per deployment. Run from the repository root: bash bench/results/sent-event-ab/ab.sh
set -euo pipefail
OUT=bench/results/sent-event-ab
PORT=8310
for round in 1 2 3; do
  for sent in True False; do
    sed -i "s/        task_send_sent_event=.*,/        task_send_sent_event=$sent,/" tasks/celery_app.py
    REDIS_URL=redis://127.0.0.1:6379/3 PORT=$PORT .venv/bin/python -m launcher serve -f configs/agg.yaml \
      --set flower.enabled=false > /tmp/sent-ab.log 2>&1 &
    pid=$!
    for _ in $(seq 1 180); do grep -q "\[launcher\] ready" /tmp/sent-ab.log && break; sleep 1; done
    for rep in 1 2; do
      .venv/bin/python -m bench run --url http://127.0.0.1:$PORT/v1 --model tiny-llama --workload synthetic \
        --mode closed --concurrency 1 --num-requests 48 --seed $rep --out $OUT/raw/sent-$sent-r$round-$rep > /dev/null 2>&1
      echo "sent=$sent round=$round rep=$rep $(grep '^| c=1' $OUT/raw/sent-$sent-r$round-$rep/report.md | cut -d'|' -f6,8)"
    done
    kill -INT $pid; wait $pid || true
  done
done
sed -i "s/        task_send_sent_event=.*,/        task_send_sent_event=False,/" tasks/celery_app.py
