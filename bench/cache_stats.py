"""Prefix-cache hit rates from what the deployment itself counts: the engines' own counters in
the decode workers' leases, and the router's overlap counters. Snapshots are read from Redis; the
arithmetic on them is pure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tasks import keys
from tasks.registry import WorkerStatus, live_workers


@dataclass(frozen=True)
class CacheCounters:
    """Prefix-cache lookups, in tokens, as vLLM counts them (PrefixCacheStats queries / hits)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    def __add__(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(self.queries + other.queries, self.hits + other.hits)


@dataclass(frozen=True)
class RouterCounters:
    """The router's own running totals: prompt blocks it routed, and how many of them the chosen
    worker already held. Only the kv mode counts them (router/service.py)."""

    overlap_blocks: int = 0
    prompt_blocks: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.overlap_blocks / self.prompt_blocks if self.prompt_blocks else None

    def __sub__(self, earlier: RouterCounters) -> RouterCounters:
        return RouterCounters(self.overlap_blocks - earlier.overlap_blocks, self.prompt_blocks - earlier.prompt_blocks)


def engine_deltas(before: Sequence[WorkerStatus], after: Sequence[WorkerStatus],
                  role: str = "decode") -> dict[str, CacheCounters]:
    """Per worker in `after`: its counters minus those it had in `before`. A worker that was not
    there before, or that restarted in between (another pid or start time, or counters that went
    down), counts from zero."""
    earlier = {w.worker_id: w for w in before if w.role == role}
    deltas = {}
    for w in after:
        if w.role != role:
            continue
        old = earlier.get(w.worker_id)
        if old is None or _restarted(old, w):
            deltas[w.worker_id] = CacheCounters(w.prefix_cache_queries, w.prefix_cache_hits)
        else:
            deltas[w.worker_id] = CacheCounters(w.prefix_cache_queries - old.prefix_cache_queries,
                                                w.prefix_cache_hits - old.prefix_cache_hits)
    return deltas


def _restarted(old: WorkerStatus, new: WorkerStatus) -> bool:
    return (old.pid, old.started_unix) != (new.pid, new.started_unix) or (
        new.prefix_cache_queries < old.prefix_cache_queries or new.prefix_cache_hits < old.prefix_cache_hits)


def total(deltas: dict[str, CacheCounters]) -> CacheCounters:
    return sum(deltas.values(), CacheCounters())


# -- reading them from Redis ------------------------------------------------------------------


def read_router_counters(client) -> RouterCounters:
    overlap, prompt = client.mget(keys.ROUTER_OVERLAP_BLOCKS, keys.ROUTER_PROMPT_BLOCKS)
    return RouterCounters(int(overlap or 0), int(prompt or 0))


class LeaseTimeout(TimeoutError):
    """The decode workers' leases did not show what was waited for in time."""


def fresh_leases(client, num_workers: int, since_unix: float, timeout_s: float = 15.0,
                 role: str = "decode") -> list[WorkerStatus]:
    """The leases of `num_workers` workers, each renewed after `since_unix`, so their counters
    include everything the engines did before that moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = live_workers(client, role=role)
        if len(workers) >= num_workers and all(w.updated_unix > since_unix for w in workers):
            return workers
        if time.monotonic() > deadline:
            seen = {w.worker_id: round(w.updated_unix - since_unix, 2) for w in workers}
            raise LeaseTimeout(f"wanted {num_workers} {role} leases renewed after the mark; saw {seen}")
        time.sleep(0.2)
