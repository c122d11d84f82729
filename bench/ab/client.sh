#!/usr/bin/env bash
# The harness's two clients against one agg deployment, alternately: `--client openai` (the
# official client) and `--client http` (aiohttp, the default), 384 requests each at c=32, with
# output tok/s, TTFT, ITL and the client's own CPU seconds (user + system, /usr/bin/time).
# Run from anywhere: bash bench/ab/client.sh   (ROUNDS="1 2 3")
# docs/benchmarks.md, "The harness's client", has the recorded result.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-bench/out/client-ab-$(date -u +%Y%m%dT%H%M%SZ)}
PORT=${PORT:-8100}
REDIS_DB=${REDIS_DB:-5}
export REDIS_URL=redis://127.0.0.1:6379/$REDIS_DB PORT
mkdir -p "$OUT/logs"
redis-cli -n "$REDIS_DB" flushdb >/dev/null
.venv/bin/python -m launcher serve -f configs/agg.yaml --set flower.enabled=false > "$OUT/logs/serve.log" 2>&1 &
LAUNCHER=$!
trap 'kill -INT $LAUNCHER; wait $LAUNCHER' EXIT
for _ in $(seq 1 180); do grep -q "ready: http" "$OUT/logs/serve.log" && break; sleep 1; done
echo "| run | ok | output tok/s | TTFT p50 ms | ITL p50 ms | client CPU s |" | tee "$OUT/runs.md"
echo "| --- | --- | ---: | ---: | ---: | ---: |" | tee -a "$OUT/runs.md"
for round in ${ROUNDS:-1 2 3}; do
  for client in openai http; do
    label="$client-$round"
    /usr/bin/time -f "%U %S" -o "$OUT/logs/$label.cpu" .venv/bin/python -m bench run --client "$client" \
      --url "http://127.0.0.1:$PORT/v1" --label "$label" --workload synthetic --mode closed --concurrency 32 \
      --num-requests 384 --input-len-mean 100 --input-len-std 0 --output-len-mean 64 --output-len-std 0 \
      --warmup-sessions 4 --seed 0 --out "$OUT/runs/$label" > "$OUT/logs/runs-$label.log" 2>&1
    python3 - "$OUT" "$label" <<'PY' | tee -a "$OUT/runs.md"
import json, sys
out, label = sys.argv[1:]
s = json.load(open(f"{out}/runs/{label}/results.json"))["summaries"][0]
user, system = map(float, open(f"{out}/logs/{label}.cpu").read().split())
print(f"| {label} | {s['num_ok']}/{s['num_requests']} | {s['output_tok_per_s']:,.0f} | {s['ttft_ms']['p50']:.1f} "
      f"| {s['itl_ms']['p50']:.2f} | {user + system:.1f} |")
PY
  done
done
