#!/bin/bash
# A/B of engine.scheduler_on_runner_cores (vLLM's scheduler process pinned to its model runner's
# core, or free), a deployment per run, alternating. Usage: ROUNDS="1 2 3" ./ab.sh
OUT=${OUT:-bench/results/scheduler-placement-ab}
source "$(dirname "$0")/../../ab_one.sh"
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then one free-$r --set engine.scheduler_on_runner_cores=false; one pinned-$r
  else one pinned-$r; one free-$r --set engine.scheduler_on_runner_cores=false; fi
done
