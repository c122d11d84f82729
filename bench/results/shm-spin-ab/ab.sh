#!/bin/bash
# A/B of vLLM's shared-memory busy-loop (SpinCondition.busy_loop_s, 1 s stock, 0 = always wait
# on the zmq notification), read from LLMQ_SHM_BUSY_LOOP_S by a local edit of vLLM's
# shm_broadcast.py (README.md). A deployment per run, alternating. Usage: ROUNDS="1 2" ./ab.sh
OUT=${OUT:-bench/results/shm-spin-ab}
NUM=256
source "$(dirname "$0")/../../ab_one.sh"
for r in $ROUNDS; do
  if [ $((r % 2)) = 1 ]; then LLMQ_SHM_BUSY_LOOP_S=1 one spin-$r; LLMQ_SHM_BUSY_LOOP_S=0 one nospin-$r
  else LLMQ_SHM_BUSY_LOOP_S=0 one nospin-$r; LLMQ_SHM_BUSY_LOOP_S=1 one spin-$r; fi
done
