"""Each engine's NIXL side channel, in Redis with a lease: the part etcd plays in Dynamo.

A prefill worker checks that the decode worker it serves is still registered before it computes
anything for it, and a decode worker checks the prefill engine named in kv_transfer_params before
it pulls. An entry expires with its worker's lease, so nobody transfers to or from a dead peer.
"""

from __future__ import annotations

from typing import cast

import msgspec
import redis

from tasks import keys


class NixlEndpoint(msgspec.Struct, frozen=True):
    engine_id: str
    worker_id: str
    role: str
    host: str
    port: int
    connector: str


def register(client: redis.Redis, endpoint: NixlEndpoint, lease_s: float) -> None:
    client.set(keys.nixl_endpoint(endpoint.engine_id), msgspec.json.encode(endpoint), px=int(lease_s * 1000))


def unregister(client: redis.Redis, engine_id: str) -> None:
    client.delete(keys.nixl_endpoint(engine_id))


def _decode(raw: bytes | None) -> NixlEndpoint | None:
    return msgspec.json.decode(raw, type=NixlEndpoint) if raw else None


def lookup(client: redis.Redis, engine_id: str) -> NixlEndpoint | None:
    # redis-py types replies as `Awaitable[T] | T` for both of its clients; this one is sync and
    # returns bytes (no decode_responses), hence the cast.
    return _decode(cast("bytes | None", client.get(keys.nixl_endpoint(engine_id))))


async def alookup(client, engine_id: str) -> NixlEndpoint | None:
    """The same, with a redis.asyncio client, for code on the engine's event loop."""
    return _decode(await client.get(keys.nixl_endpoint(engine_id)))
