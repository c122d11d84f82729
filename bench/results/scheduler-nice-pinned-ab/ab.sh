#!/usr/bin/env bash
# vLLM's scheduler niceness 10 (the default so far) against 0, with the scheduler pinned to its
# runner's core (engine.scheduler_on_runner_cores, the default), alternately, a fresh agg
# deployment per run: 96 requests at c=1, then 384 at c=32 (bench/ab_one.sh).
# Run from the repository root: bash bench/results/scheduler-nice-pinned-ab/ab.sh
set -uo pipefail
export OUT=bench/results/scheduler-nice-pinned-ab NUM1=96
source bench/ab_one.sh
for round in 1 2 3; do
  one "nice10-$round" --set engine.scheduler_nice=10
  one "nice0-$round" --set engine.scheduler_nice=0
done
