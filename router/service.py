"""The router's decision: which live decode worker takes a request.

``RouterService`` makes it, and holds the router's other jobs, each a class of its own over one
shared index: ``events`` replays the KV event stream into the index (router/events.py),
``snapshots`` saves, trims and loads (router/snapshots.py), and ``members`` reads the workers'
leases, evicting the ones that left (router/membership.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import cast

import redis

from config import Settings
from router.events import KvEvents
from router.index import RadixIndex, SharedIndex
from router.membership import Membership
from router.policy import Bookings, Candidate, RecentDecisions, choose, cost, decision_work
from router.snapshots import IndexSnapshots
from tasks import keys
from tasks.registry import WorkerStatus


class NoCandidates(Exception):
    """No live decode worker to route to."""


@dataclass(frozen=True)
class Decision:
    worker_id: str
    mode: str
    overlap_blocks: int
    prompt_blocks: int
    candidates: tuple[Candidate, ...] = ()  # kv mode: every candidate with its cost, for the log


class RouterService:
    def __init__(self, settings: Settings, client: redis.Redis, rng: random.Random | None = None):
        self.settings = settings
        self.config = settings.router
        self.redis = client
        self.shared = SharedIndex(RadixIndex(settings.engine.block_size))
        self.bookings = Bookings(lag_s=self.config.booking_lag_s)
        self.recent = RecentDecisions(self.config.balance_window)
        self.snapshots = IndexSnapshots(client, self.shared, self.config.snapshot_every_events)
        self.events = KvEvents(client, self.shared, self.snapshots)
        self.members = Membership(client, self.shared, self.bookings, self.recent)
        self._rng = rng or random.Random()

    @property
    def index(self) -> RadixIndex:
        """The index as it stands; a snapshot load replaces it."""
        return self.shared.index

    def decide(self, prompt_token_ids: list[int], exclude: Collection[str] = ()) -> Decision:
        """``exclude``: workers a resubmitted request must not go back to (GenerateRequest's
        exclude_workers). With none left, NoCandidates, as with no worker at all: the frontend
        then waits for a live one."""
        # An empty cached view is read again before it turns into a 503: it may be from a moment
        # when a worker's lease was between renewals.
        workers = self._eligible(self.members.refresh(), exclude) or self._eligible(
            self.members.refresh(fresh=True), exclude)
        if not workers:
            raise NoCandidates("no live decode worker" + (f" other than {', '.join(sorted(exclude))}"
                                                          if exclude else ""))
        prompt_blocks = self.index.num_prompt_blocks(prompt_token_ids)
        mode = self.config.mode
        if mode == "random":
            return Decision(self._rng.choice(sorted(workers)), mode, 0, prompt_blocks)
        if mode == "round-robin":
            # redis-py types replies as `Awaitable[T] | T` for both of its clients; this one is sync.
            turn = cast(int, self.redis.incr(keys.ROUTER_ROUND_ROBIN))
            return Decision(sorted(workers)[turn % len(workers)], mode, 0, prompt_blocks)
        self.events.catch_up()
        with self.shared.lock:
            overlaps = self.index.overlaps(prompt_token_ids)
            candidates = [self._candidate(w, overlaps.get(w.worker_id, 0), prompt_blocks) for w in workers.values()]
            chosen = choose(candidates, self.config.temperature, self._rng)
            self.bookings.book(chosen.worker_id, chosen.prefill_blocks + 1, time.time())
            self.recent.record(chosen.worker_id, decision_work(chosen.prefill_blocks, prompt_blocks))
        self._count_hits(chosen.overlap_blocks, prompt_blocks)
        return Decision(chosen.worker_id, mode, chosen.overlap_blocks, prompt_blocks,
                        tuple(candidates))

    @staticmethod
    def _eligible(workers: dict[str, WorkerStatus], exclude: Collection[str]) -> dict[str, WorkerStatus]:
        return {w: status for w, status in workers.items() if w not in exclude} if exclude else workers

    def _candidate(self, status: WorkerStatus, overlap: int, prompt_blocks: int) -> Candidate:
        booked_blocks, booked_requests = self.bookings.pending(status.worker_id)
        prefill = prompt_blocks - overlap
        decode = status.kv_blocks_used + booked_blocks
        recent = self.recent.work(status.worker_id)
        return Candidate(status.worker_id, overlap, prefill, decode,
                         status.num_running + status.num_waiting + booked_requests,
                         cost(prefill, decode, self.config.overlap_weight, recent, self.config.balance_weight),
                         recent)

    def _count_hits(self, overlap_blocks: int, prompt_blocks: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(keys.ROUTER_OVERLAP_BLOCKS, overlap_blocks)
        pipe.incrby(keys.ROUTER_PROMPT_BLOCKS, prompt_blocks)
        pipe.execute()


def router_hit_rate(client: redis.Redis) -> float:
    overlap, prompt = cast("list[bytes | None]", client.mget(keys.ROUTER_OVERLAP_BLOCKS, keys.ROUTER_PROMPT_BLOCKS))
    return int(overlap or 0) / int(prompt) if prompt and int(prompt) else 0.0
