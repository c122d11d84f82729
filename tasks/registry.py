"""Worker leases in Redis: who is alive, in which role, and how loaded.

Each worker renews one key with a TTL. A worker that dies stops renewing, and its key expires:
that is the whole failure detector, with no separate bookkeeping to go stale.

Readers find the leases through one set of their key names (``keys.WORKER_LEASES``), not a SCAN
of the keyspace, which grows with every open output stream. The set
only says where to look: a member whose key expired (or was deleted, as the launcher does when a
worker dies) reads as nothing and is dropped, in the same script that reads it, so a worker
renewing at that moment is never dropped with it.
"""

from __future__ import annotations

from typing import cast

import msgspec
import redis

from tasks import keys


class WorkerStatus(msgspec.Struct, frozen=True):
    worker_id: str
    role: str
    queues: list[str]
    hostname: str
    pid: int
    started_unix: float
    updated_unix: float
    metrics_address: str = ""  # host:port of this worker's /metrics
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    # Largest number of requests the engine ran in one step since start: proof of batching.
    max_running_seen: int = 0
    num_batched_steps: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Disaggregation: decode workers count remote prefills, local fallbacks and long prompts kept
    # local by the prefill backlog; prefill workers count prefills served and dropped; both count
    # KV moved over NIXL.
    num_remote_prefills: int = 0
    num_local_fallbacks: int = 0
    num_local_by_backlog: int = 0
    num_prefills_served: int = 0
    num_prefills_dropped: int = 0
    num_prefill_done_notices: int = 0  # PrefillDone messages a decode worker got over pub/sub
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    # Routers only: how many blocks their index holds for each worker, and events applied.
    index_blocks: dict[str, int] = {}
    num_events_applied: int = 0


_decoder = msgspec.json.Decoder(WorkerStatus)


# Every live lease's value, in one round trip; members whose lease is gone are dropped here, and
# only here, atomically with the read (a renew between a read and a separate SREM would be lost).
_READ_LEASES_LUA = """
local found = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', key)
  if value then
    found[#found + 1] = value
  else
    redis.call('SREM', KEYS[1], key)
  end
end
return found
"""


def renew_lease(client: redis.Redis, status: WorkerStatus, lease_s: float) -> None:
    key = keys.worker_lease(status.worker_id)
    pipe = client.pipeline(transaction=False)
    pipe.set(key, msgspec.json.encode(status), px=int(lease_s * 1000))
    pipe.sadd(keys.WORKER_LEASES, key)
    pipe.execute()


def drop_lease(client: redis.Redis, worker_id: str) -> None:
    key = keys.worker_lease(worker_id)
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    pipe.srem(keys.WORKER_LEASES, key)
    pipe.execute()


def _statuses(raws: list, role: str | None) -> list[WorkerStatus]:
    found = [_decoder.decode(raw) for raw in raws if raw is not None]
    return sorted((w for w in found if role is None or w.role == role), key=lambda w: w.worker_id)


def live_workers(client: redis.Redis, role: str | None = None) -> list[WorkerStatus]:
    # redis-py types replies as `Awaitable[T] | T` for both of its clients; this one is sync and
    # returns bytes (no decode_responses), hence the cast.
    return _statuses(cast("list[bytes]", client.register_script(_READ_LEASES_LUA)(keys=[keys.WORKER_LEASES])), role)


async def alive_workers(client, role: str | None = None) -> list[WorkerStatus]:
    """The same, with a redis.asyncio client, for code on an event loop."""
    return _statuses(await client.register_script(_READ_LEASES_LUA)(keys=[keys.WORKER_LEASES]), role)


def is_alive(client: redis.Redis, worker_id: str) -> bool:
    return bool(client.exists(keys.worker_lease(worker_id)))

