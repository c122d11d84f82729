"""How the router weighs prefix overlap against load, and how it books its own choices.

The cost is Dynamo's newer formula, per worker:

    cost = overlap_weight * prefill_blocks + decode_blocks

``prefill_blocks`` are the prompt blocks the worker would have to compute (prompt blocks minus the
prefix it already holds); ``decode_blocks`` are the KV blocks it has in use, from its own last
report, plus what this router booked on it since. A higher ``overlap_weight`` favours cache hits
(TTFT); a lower one favours spreading load (ITL). With ``temperature`` 0 the cheapest worker wins
(ties go to the one with fewer requests, then at random); above 0 a worker is drawn with
probability softmax(-cost / max_cost / temperature), so near-equal workers share the traffic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    overlap_blocks: int
    prefill_blocks: int
    decode_blocks: int
    num_requests: int
    cost: float


def cost(prefill_blocks: int, decode_blocks: int, overlap_weight: float) -> float:
    return overlap_weight * prefill_blocks + decode_blocks


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
