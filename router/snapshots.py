"""Snapshots of the router's index in Redis, which keep the KV event stream bounded.

Every router replica starts from the newest snapshot and replays the stream after it. Replicas save
a snapshot every ``router.snapshot_every_events`` events and trim the stream up to a margin before
it, so nothing a new router needs is lost. A replica that fell further behind than the margin finds
the gap (``XINFO STREAM``'s first entry is past its cursor) and reloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import redis

from router.index import RadixIndex, SharedIndex
from tasks import keys
from tasks.messages import KvIndexSnapshot, decode_kv_index_snapshot, encode_kv_index_snapshot

logger = logging.getLogger(__name__)


def stream_id(entry_id: str | bytes) -> tuple[int, int]:
    """A Redis Stream entry id as a comparable (ms, seq)."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class IndexSnapshots:
    """Saves the shared index with its cursor, trims the stream up to it, and loads it back."""

    # The trim keeps this much of the stream before the snapshot: replicas read the stream at
    # their own pace, and one that is behind by less than this loses nothing. One further behind
    # finds the gap (``reload_if_trimmed``) and reloads from the snapshot.
    trim_margin_s = 60.0

    def __init__(self, client: redis.Redis, shared: SharedIndex, every_events: int):
        self.redis = client
        self.shared = shared
        self.every_events = every_events  # 0: never saves one by itself
        self._warned_incomplete = False

    def load(self) -> bool:
        """Starts the index from the newest snapshot, if there is one this router can use."""
        # redis-py types replies as `Awaitable[T] | T` for both of its clients; this one is sync and
        # returns bytes (no decode_responses), hence the cast.
        raw = cast("bytes | None", self.redis.hget(keys.KV_INDEX_SNAPSHOT, "index"))
        if raw is None:
            return False
        snapshot = decode_kv_index_snapshot(raw)
        shared = self.shared
        if snapshot.block_size != shared.index.block_size:
            logger.error("the index snapshot uses block size %d, this router %d: not loaded",
                         snapshot.block_size, shared.index.block_size)
            return False
        with shared.lock:
            shared.index = RadixIndex.restore(snapshot.block_size, snapshot.nodes, snapshot.held)
            shared.cursor = snapshot.cursor
            shared.events_since_snapshot = 0
        logger.info("index snapshot loaded: %d blocks as of KV event %s", shared.index.num_blocks, snapshot.cursor)
        return True

    def save_if_due(self) -> bool:
        """Saves a snapshot once ``every_events`` events were applied since the last one."""
        return bool(self.every_events) and self.shared.events_since_snapshot >= self.every_events and self.save()

    def save(self) -> bool:
        """Saves the index and trims the event stream up to it, unless another replica has
        already saved a newer one. Returns whether this one was saved."""
        shared = self.shared
        with shared.lock:
            nodes, held = shared.index.state()
            snapshot = KvIndexSnapshot(shared.cursor, shared.index.block_size, nodes, held)
            shared.events_since_snapshot = 0
        raw = encode_kv_index_snapshot(snapshot)

        def publish(pipe) -> bool:
            newest = pipe.hget(keys.KV_INDEX_SNAPSHOT, "cursor")
            # An older snapshot must never replace a newer one: the stream is already trimmed
            # past it, so a router loading it would miss the events in between.
            if newest is not None and stream_id(newest) >= stream_id(snapshot.cursor):
                return False
            pipe.multi()
            pipe.hset(keys.KV_INDEX_SNAPSHOT, mapping={"cursor": snapshot.cursor, "index": raw})
            ms, _ = stream_id(snapshot.cursor)
            pipe.xtrim(keys.KV_EVENTS, minid=f"{max(0, ms - int(self.trim_margin_s * 1000))}-0", approximate=False)
            return True

        # With value_from_callable=True, transaction() returns what publish returned; redis-py's
        # stubs type it as returning None whatever the flag.
        transaction = cast("Callable[..., bool]", self.redis.transaction)
        saved = transaction(publish, keys.KV_INDEX_SNAPSHOT, value_from_callable=True)
        if saved:
            logger.info("index snapshot saved: %d blocks as of KV event %s (%d bytes); stream trimmed to %.0fs "
                        "before it", len(nodes), snapshot.cursor, len(raw), self.trim_margin_s)
        return saved

    def reload_if_trimmed(self) -> bool:
        """Reloads from the newest snapshot if the stream was trimmed past events this router
        had not read yet (it fell behind another replica's trim). Returns whether it reloaded."""
        try:
            info = cast("dict[str, Any]", self.redis.xinfo_stream(keys.KV_EVENTS))
        except redis.ResponseError:  # no stream yet: no worker has written an event
            return False
        first = info.get("recorded-first-entry-id") or (info.get("first-entry") or (None,))[0]
        trimmed = info.get("entries-added", 0) > info.get("length", 0)
        if not trimmed or first is None or stream_id(first) <= stream_id(self.shared.cursor):
            return False
        newest = cast("bytes | None", self.redis.hget(keys.KV_INDEX_SNAPSHOT, "cursor"))
        # The snapshot trim keeps the entries from a margin before the snapshot on, so a
        # snapshot that covers the gap is at or after the first entry left.
        if newest is not None and stream_id(newest) >= stream_id(first) and self.load():
            logger.warning("KV events were trimmed before this router read them; reloaded the index from the "
                           "snapshot")
            return True
        if not self._warned_incomplete:
            # Only the workers' backstop (router.kv_events_maxlen) trims without a snapshot.
            logger.warning("KV events before %s were trimmed with no snapshot covering them; the index misses "
                           "the blocks they stored until those are stored again",
                           first.decode() if isinstance(first, bytes) else first)
            self._warned_incomplete = True
        return False
