"""Replays the KV event stream, which every engine writes to, into the router's index.

A router that starts late or restarts must build the same index as one that saw everything live:
it starts from the newest index snapshot (router/snapshots.py) and replays the events after it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import redis

from router.index import SharedIndex
from router.snapshots import IndexSnapshots, stream_id
from tasks import keys
from tasks.messages import KvEvent, decode_kv_event

logger = logging.getLogger(__name__)

# Events applied per XREAD while catching up.
EVENT_BATCH = 5000


class KvEvents:
    """Applies the KV event stream to the shared index, from its cursor on."""

    def __init__(self, client: redis.Redis, shared: SharedIndex, snapshots: IndexSnapshots):
        self.redis = client
        self.shared = shared
        self.snapshots = snapshots
        self._read_at = float("-inf")

    def replay(self) -> int:
        """Builds the index from the newest snapshot and the events after it, as a router does
        before it takes any request. Returns how many events it applied."""
        self.snapshots.load()
        return self.catch_up()

    def catch_up(self) -> int:
        """Applies every event written so far. Called before each decision and periodically."""
        if time.monotonic() - self._read_at > self.snapshots.trim_margin_s / 2:
            # Long enough since the last read that a trim may have passed this router's cursor:
            # reading on would step over the gap without a trace.
            self.snapshots.reload_if_trimmed()
        self._read_at = time.monotonic()
        shared = self.shared
        with shared.lock:
            applied = 0
            while True:
                # redis-py types replies as `Awaitable[T] | T` for both of its clients; this one is sync.
                reply = cast("list[Any]", self.redis.xread({keys.KV_EVENTS: shared.cursor}, count=EVENT_BATCH))
                if not reply:
                    return applied
                entries = reply[0][1]
                for _, fields in entries:
                    self.apply(decode_kv_event(fields[b"e"]))
                last_id = entries[-1][0]
                shared.cursor = last_id.decode() if isinstance(last_id, bytes) else last_id
                applied += len(entries)
                shared.num_events_applied += len(entries)
                shared.events_since_snapshot += len(entries)
                if len(entries) < EVENT_BATCH:
                    return applied

    def resync(self) -> bool:
        """After a Redis outage: if the stream is gone or was started again below this router's
        cursor (a Redis restarted with no data, whose new entry ids need not be past the old
        cursor), reads the new stream from its start; otherwise it would skip the new events
        until the clock passed the old cursor. Returns whether it reset the cursor."""
        try:
            info = cast("dict[str, Any]", self.redis.xinfo_stream(keys.KV_EVENTS))
            last = info.get("last-generated-id")
        except redis.ResponseError:  # no stream at all
            last = None
        shared = self.shared
        with shared.lock:
            if last is not None and stream_id(last) >= stream_id(shared.cursor):
                return False
            if shared.cursor == "0-0":
                return False
            logger.warning("the KV event stream is gone or new (Redis lost its data?); its events after %s are "
                           "lost. Reading the new stream from its start; workers whose leases lapsed meanwhile "
                           "leave the index", shared.cursor)
            shared.cursor = "0-0"
        return True

    def apply(self, event: KvEvent) -> None:
        """Applies one event to the index; the caller holds the shared lock."""
        index = self.shared.index
        if event.kind == "stored":
            if event.block_size and event.block_size != index.block_size:
                logger.error("worker %s uses block size %d, the router %d: its blocks are not indexed",
                             event.worker_id, event.block_size, index.block_size)
                return
            index.store(event.worker_id, event.block_hashes, event.parent_hash, event.token_ids)
        elif event.kind == "removed":
            index.remove(event.worker_id, event.block_hashes)
        elif event.kind == "cleared":
            index.clear(event.worker_id)
