#!/usr/bin/env bash
# Old code against new: a deployment from another worktree (OLD, e.g. made with
# `git worktree add /tmp/ab-old <commit>`, with a .venv of its own or linked to this one's)
# against one from this tree, alternately, a fresh agg deployment per run: 384 requests at c=32.
# The harness is this tree's for both (ab_one.sh).
# Run from anywhere: OLD=/tmp/ab-old bash bench/ab/trees.sh   (ROUNDS="1 2 3")
: "${OLD:?OLD=path of the worktree with the old code}"
export OUT=${OUT:-bench/out/trees-ab-$(date -u +%Y%m%dT%H%M%SZ)}
source "$(dirname "${BASH_SOURCE[0]}")/ab_one.sh"
OLD=$(cd "$OLD" && pwd)
for r in ${ROUNDS:-1 2 3}; do
  TREE=$OLD one "old-$r"
  TREE=. one "new-$r"
done
echo "$OUT/runs.txt"
