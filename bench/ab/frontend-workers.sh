#!/usr/bin/env bash
# gunicorn's shape, frontend.workers x frontend.threads, A (default 4 x 80, the config's default)
# against B (default 8 x 40), alternately, a fresh agg deployment per run: 384 requests at c=32
# (ab_one.sh). Other shapes: A="2 160" B="4 80" bash bench/ab/frontend-workers.sh
# docs/benchmarks.md, "The frontend's shape", has the recorded results.
read -r A_WORKERS A_THREADS <<< "${A:-4 80}"
read -r B_WORKERS B_THREADS <<< "${B:-8 40}"
export OUT=${OUT:-bench/out/frontend-workers-ab-$(date -u +%Y%m%dT%H%M%SZ)}
source "$(dirname "${BASH_SOURCE[0]}")/ab_one.sh"
for r in ${ROUNDS:-1 2 3}; do
  one "w${A_WORKERS}x${A_THREADS}-$r" --set frontend.workers="$A_WORKERS" --set frontend.threads="$A_THREADS"
  one "w${B_WORKERS}x${B_THREADS}-$r" --set frontend.workers="$B_WORKERS" --set frontend.threads="$B_THREADS"
done
echo "$OUT/runs.txt"
