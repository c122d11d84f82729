#!/usr/bin/env bash
# engine.scheduler_on_runner_cores false (`free`) against true (`pinned`, the default): vLLM's
# scheduler process free to run anywhere, or pinned to its model runner's core. A fresh agg
# deployment per run, the order alternating per round; 384 requests at c=32 (ab_one.sh).
# Run from anywhere: bash bench/ab/scheduler-placement.sh   (ROUNDS="1 2 3" by default)
# docs/benchmarks.md, "Scheduler placement", has the recorded result.
export OUT=${OUT:-bench/out/scheduler-placement-ab-$(date -u +%Y%m%dT%H%M%SZ)}
source "$(dirname "${BASH_SOURCE[0]}")/ab_one.sh"
for r in ${ROUNDS:-1 2 3}; do
  if [ $((r % 2)) = 1 ]; then
    one "free-$r" --set engine.scheduler_on_runner_cores=false; one "pinned-$r"
  else
    one "pinned-$r"; one "free-$r" --set engine.scheduler_on_runner_cores=false
  fi
done
echo "$OUT/runs.txt"
