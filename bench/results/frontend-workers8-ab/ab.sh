#!/usr/bin/env bash
# frontend.workers x threads 4 x 80 (the default) against 8 x 40, alternately, a fresh agg
# deployment per run: 384 requests at c=32 (bench/ab_one.sh).
# Run from the repository root: bash bench/results/frontend-workers8-ab/ab.sh
set -uo pipefail
export OUT=bench/results/frontend-workers8-ab
source bench/ab_one.sh
for round in 1 2 3; do
  one "w4x80-$round" --set frontend.workers=4 --set frontend.threads=80
  one "w8x40-$round" --set frontend.workers=8 --set frontend.threads=40
done
