"""How the router weighs prefix overlap against load, and how it books its own choices.

The cost is Dynamo's newer formula with a balance term, per worker:

    cost = overlap_weight * prefill_blocks + decode_blocks + balance_weight * recent_work

``prefill_blocks`` are the prompt blocks the worker would have to compute (prompt blocks minus the
prefix it already holds); ``decode_blocks`` are the KV blocks it has in use, from its own last
report, plus what this router booked on it since. A higher ``overlap_weight`` favours cache hits
(TTFT); a lower one favours spreading load (ITL).

``recent_work`` is what this router's last ``balance_window`` decisions sent the worker: each
counts 1 for its request (the decode) plus the share of its prompt the worker had to compute (the
prefill), so a full hit counts 1 and a full miss 2. The first two terms are the load of the
moment, and at low load that is whichever worker the one or two other requests in flight happen
to be on. But where a new prefix lands decides where its later requests go, because they follow
its cache: a worker that took more of the recent work will take more of the next. The balance
term places new prefixes by that share, counting prefills as well as requests, so that the worker
holding a hot prefix (many requests, few prefills) and the one taking the new prefixes (fewer
requests, more prefills) even out on both. It also outweighs a cached prefix once the holder's
share runs far enough ahead, other things equal: at balance weight 8 and overlap weight 4 a full
hit counts two prompt blocks, so a worker 18 hits ahead of another loses a 34-block prefix to it
(18 x 8 > 4 x 34). The prefix is then computed on a second worker too, and its traffic splits.

With ``temperature`` 0 the cheapest worker wins (ties go to the one with fewer requests, then at
random); above 0 a worker is drawn with probability softmax(-cost / max_cost / temperature), so
near-equal workers share the traffic.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    overlap_blocks: int
    prefill_blocks: int
    decode_blocks: int
    num_requests: int
    cost: float
    recent_work: float = 0.0


def cost(prefill_blocks: int, decode_blocks: int, overlap_weight: float, recent_work: float = 0.0,
         balance_weight: float = 0.0) -> float:
    return overlap_weight * prefill_blocks + decode_blocks + balance_weight * recent_work


def decision_work(prefill_blocks: int, prompt_blocks: int) -> float:
    """One decision's share of the balance term: 1 for the request, plus the share of its prompt
    the worker computes."""
    return 1.0 + (prefill_blocks / prompt_blocks if prompt_blocks else 0.0)


def choose(candidates: list[Candidate], temperature: float, rng: random.Random) -> Candidate:
    if not candidates:
        raise ValueError("no candidate workers")
    if temperature <= 0:
        best = min((c.cost, c.num_requests) for c in candidates)
        return rng.choice([c for c in candidates if (c.cost, c.num_requests) == best])
    scale = max(c.cost for c in candidates) or 1.0
    weights = [math.exp(-(c.cost / scale) / temperature) for c in candidates]
    return rng.choices(candidates, weights=weights, k=1)[0]


@dataclass
class _Booking:
    booked_unix: float
    blocks: int


@dataclass
class Bookings:
    """Load the router has sent to a worker that the worker's own metrics may not show yet.

    A booking counts until the worker reports metrics taken ``lag_s`` after it was made: by then
    the request has reached the engine and is in the worker's own figures, so counting it twice
    would push traffic away from a worker for nothing.
    """

    lag_s: float
    _by_worker: dict[str, list[_Booking]] = field(default_factory=dict)

    def book(self, worker_id: str, blocks: int, now_unix: float) -> None:
        self._by_worker.setdefault(worker_id, []).append(_Booking(now_unix, blocks))

    def settle(self, worker_id: str, report_unix: float) -> None:
        pending = self._by_worker.get(worker_id)
        if pending:
            self._by_worker[worker_id] = [b for b in pending if b.booked_unix + self.lag_s > report_unix]

    def pending(self, worker_id: str) -> tuple[int, int]:
        """(blocks, requests) booked on the worker and not yet in its own metrics."""
        items = self._by_worker.get(worker_id, [])
        return sum(b.blocks for b in items), len(items)

    def forget(self, worker_id: str) -> None:
        self._by_worker.pop(worker_id, None)


class RecentDecisions:
    """The work this router's last ``window`` decisions sent each worker (the cost's balance term).
    A window holds a few dozen decisions, so summing it per candidate costs microseconds."""

    def __init__(self, window: int):
        self._picks: deque[tuple[str, float]] = deque(maxlen=window)

    def record(self, worker_id: str, work: float) -> None:
        self._picks.append((worker_id, work))

    def work(self, worker_id: str) -> float:
        return sum(w for worker, w in self._picks if worker == worker_id)

    def forget(self, worker_id: str) -> None:
        """A worker that left: its share no longer says anything about the others."""
        kept = [pick for pick in self._picks if pick[0] != worker_id]
        self._picks.clear()
        self._picks.extend(kept)
