#!/bin/bash
# A/B of the frontend's process/thread split, frontend.workers x threads 2 x 160 against 4 x 80,
# a deployment per run, alternating. Usage: ROUNDS="1 2 3" ./ab.sh
OUT=${OUT:-bench/results/frontend-workers-ab}
source "$(dirname "$0")/../../ab_one.sh"
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then one two-$r --set frontend.workers=2 --set frontend.threads=160; one four-$r --set frontend.workers=4 --set frontend.threads=80
  else one four-$r --set frontend.workers=4 --set frontend.threads=80; one two-$r --set frontend.workers=2 --set frontend.threads=160; fi
done
