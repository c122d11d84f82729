#!/usr/bin/env bash
# The harness's two clients against one agg deployment, alternately: output tok/s, TTFT and the
# client's own CPU seconds at c=32. Run from the repository root: bash bench/results/client-ab/ab.sh
set -euo pipefail
OUT=bench/results/client-ab
export REDIS_URL=redis://127.0.0.1:6379/5 PORT=8100
mkdir -p "$OUT/logs"
redis-cli -n 5 flushdb >/dev/null
.venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false > "$OUT/logs/serve.log" 2>&1 &
LAUNCHER=$!
trap 'kill -INT $LAUNCHER; wait $LAUNCHER' EXIT
for _ in $(seq 1 120); do grep -q "decode0@.* ready" "$OUT/logs/serve.log" && break; sleep 1; done
for round in 1 2 3; do
  for client in openai http; do
    label="$client-$round"
    /usr/bin/time -f "%U %S" -o "$OUT/logs/$label.cpu" .venv/bin/python -m bench run --client "$client" \
      --url http://127.0.0.1:8100/v1 --label "$label" --workload synthetic --mode closed --concurrency 32 \
      --num-requests 384 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 \
      --warmup-sessions 4 --seed 0 --out "$OUT/runs/$label" > "$OUT/logs/runs-$label.log" 2>&1
    python3 - "$OUT" "$label" <<'PY'
import json, sys
out, label = sys.argv[1:]
s = json.load(open(f"{out}/runs/{label}/results.json"))["summaries"][0]
user, system = map(float, open(f"{out}/logs/{label}.cpu").read().split())
print(f"| {label} | {s['num_ok']}/{s['num_requests']} | {s['output_tok_per_s']:,.0f} | {s['ttft_ms']['p50']:.1f} "
      f"| {s['itl_ms']['p50']:.2f} | {user + system:.1f} |")
PY
  done
done
