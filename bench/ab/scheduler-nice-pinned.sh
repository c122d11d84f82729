#!/usr/bin/env bash
# A pinned scheduler (engine.scheduler_on_runner_cores, the default) at engine.scheduler_nice=10
# against 0, alternately, a fresh agg deployment per run: 96 requests at c=1, then 384 at c=32
# (ab_one.sh). Run from anywhere: bash bench/ab/scheduler-nice-pinned.sh   (ROUNDS="1 2 3")
# docs/benchmarks.md, "Scheduler placement", has the recorded result.
export OUT=${OUT:-bench/out/scheduler-nice-pinned-ab-$(date -u +%Y%m%dT%H%M%SZ)} NUM1=${NUM1:-96}
source "$(dirname "${BASH_SOURCE[0]}")/ab_one.sh"
for r in ${ROUNDS:-1 2 3}; do
  one "nice10-$r" --set engine.scheduler_nice=10
  one "nice0-$r" --set engine.scheduler_nice=0
done
echo "$OUT/runs.txt"
