"""What the push connector needs beyond vLLM 0.32's NixlPushConnector, as plain functions.

In push mode the decode engine (D) allocates blocks for a prompt, registers them with the prefill
engine (P), and P WRITEs the KV into them. vLLM's D-side watchdog notices a registration that no
WRITE answered (P died, or never prefilled), but only logs it: the request then waits for ever and
keeps its blocks (scripts/push_probe.py). kvtransfer/nixl_agents.py closes that gap with these:

- D's scheduler half lists the registrations that expired; its worker half reports each as a
  failed receive, which vLLM's kv_load_failure_policy="recompute" turns into a local prefill that
  frees the blocks first.
- A registration carries the wall-clock time after which P must not start its WRITE, so a slow
  (not dead) P never writes into blocks D has already given back and handed to another request.
- D's engine loop naps 1 ms after every step that ran no model while requests wait, including
  the step that reports a receive, so the received request's first forward waited out that nap:
  ``EngineLoopClock`` skips the nap after such a step.
- A D request's final kv_transfer_params say whether the KV arrived or the engine recomputed it,
  so the decode worker can count the outcome (kvtransfer/transfer.py).

Only the engine processes import vllm; this module does not, so it is tested without one.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

# In D's registration (sent to P over NIXL): P starts no WRITE after this Unix time.
WRITE_BY_KEY = "llmq_write_by_unix"
# On the connector metadata D's scheduler half hands its worker half: receives to fail.
EXPIRED_ATTR = "llmq_expired_push_recvs"
# D's writer thread polls NIXL's notifications this often while a receive is pending
# (nixl_agents._PollWhilePending).
RECV_POLL_S = 0.0005
# In a D request's kv_transfer_params: how many of its prompt's tokens P computed, when fewer
# than all (its prompt ends with the first token, which P sampled and D computes).
PREFILLED_KEY = "llmq_prefilled_tokens"
# In a D request's final kv_transfer_params: how its prompt's KV got there.
OUTCOME_KEY = "llmq_push"
RECEIVED = "received"
RECOMPUTED = "recomputed"


def expired(deadlines: dict[str, float], now: float) -> list[str]:
    """Request ids whose deadline has passed. The whole dict is scanned: deadlines of requests
    that ended while waiting are kept, so they are not in insertion order."""
    return [rid for rid, deadline in deadlines.items() if deadline <= now]


def write_by(registered_unix: float, registration_timeout_s: float) -> float:
    """P may start its WRITE in the first half of D's wait; the second half is for the WRITE
    itself to land before D gives the blocks back."""
    return registered_unix + registration_timeout_s / 2


def may_write(registration: dict, now_unix: float) -> bool:
    deadline = registration.get(WRITE_BY_KEY)
    return deadline is None or now_unix <= deadline


def outcomes(finished_recving: Iterable[str] | None, failed_recving: Iterable[str] | None) -> dict[str, str]:
    """One step's receive results by request id. vLLM lists a failed receive as finished too."""
    failed = set(failed_recving or ())
    return {rid: RECOMPUTED if rid in failed else RECEIVED for rid in set(finished_recving or ()) | failed}


def pushed_tokens(matched: int, num_computed_tokens: int, prefilled: int | None) -> int:
    """How many tokens D takes from P's push, of the ``matched`` vLLM would take (its whole prompt
    beyond D's own ``num_computed_tokens``): no more than P computed. D then allocates exactly as
    many blocks as P WRITEs (P's request ends on its prompt: no block holds its sampled token),
    and computes the rest of its prompt itself, the first token among it."""
    if prefilled is None:
        return matched
    return max(0, min(matched, prefilled - num_computed_tokens))


def outcome_of(final_kv_transfer_params: dict | None) -> str | None:
    """RECEIVED or RECOMPUTED for a D request that waited for a push; None if it ended before
    its KV arrived (aborted) or never waited."""
    if not isinstance(final_kv_transfer_params, dict):
        return None
    value = final_kv_transfer_params.get(OUTCOME_KEY)
    return value if value in (RECEIVED, RECOMPUTED) else None


class EngineLoopClock:
    """Stands in for the ``time`` module in vLLM's engine-core module, whose one ``sleep`` is the
    1 ms nap after a step that ran no model while requests wait (for a push, say). A receive that
    such a step reported makes its request schedulable on the next step, so the nap after it only
    delays the request's first forward: set ``skip_next_nap`` and that one nap is skipped.
    Everything else is ``time``'s. The scheduler half sets the flag and the loop naps on the same
    thread, the engine core's."""

    def __init__(self, real: ModuleType):
        self._real = real
        self.skip_next_nap = False

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if self.skip_next_nap:
            self.skip_next_nap = False
            return
        self._real.sleep(seconds)


def engine_loop_clock(engine_core: Any) -> EngineLoopClock | None:
    """The clock of vLLM's engine-core module (``vllm.v1.engine.core``), put in place once per
    process; None where that module is not loaded (a scheduler outside vLLM's engine core)."""
    if engine_core is None:
        return None
    if not isinstance(engine_core.time, EngineLoopClock):
        engine_core.time = EngineLoopClock(engine_core.time)
    return engine_core.time
