#!/usr/bin/env bash
# Old code against new, alternately, a fresh agg deployment per run (bench/ab_one.sh), c=32.
# old = 6e86f87 (before), new = ade8952 (merged chunks per choice + the one-line argsrepr).
# Needs `git worktree add /tmp/ab-old 6e86f87` with /tmp/ab-old/.venv linked to this .venv.
# Run from the repository root: bash bench/results/frontend-merge-ab/ab.sh
set -uo pipefail
export OUT="$(pwd)/bench/results/frontend-merge-ab"
NEW="$(pwd)"
for round in 1 2 3; do
  (source /tmp/ab-old/bench/ab_one.sh; one "old-$round")
  (source "$NEW/bench/ab_one.sh"; one "new-$round")
done
