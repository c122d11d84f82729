"""One reader per frontend process for every open request's output stream.

Why not one XREAD per request thread: that is one Redis round trip per token per request, and
at 32 streaming requests it was most of a frontend worker's CPU, on a machine whose engine needs
every cycle (bench/README.md). Here one thread blocks in a single XREAD over all open streams
and hands each stream's new entries to the request thread waiting on it.

A request opened while that XREAD is blocked must not wait for its timeout, so the reader also
reads a wake stream of its own, and ``open`` appends to it. Because the reader tracks that
stream by entry id, a wake written just before the XREAD starts is still seen at once.

The wake stream is the process's one standing key: it is made when the process starts
(``start``, from the gateway's ``connect``), so the key count is steady from then on; the reader
renews its short TTL while the process lives, and a clean exit deletes it (``stop``, gunicorn's
``worker_exit``). A process that is killed leaves it for at most ``WAKE_TTL_S``, not for as long
as a deployment runs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.typing import KeyT, StreamIdT

from tasks import keys, redis_conn

logger = logging.getLogger(__name__)

# Upper bound on one XREAD; only matters when nothing at all moves.
BLOCK_MS = 1000
# A wake stream outlives its process by this long at most; the reader renews it every
# WAKE_RENEW_S, well inside the TTL, so a busy Redis or a failover does not let it lapse.
WAKE_TTL_S = 60
WAKE_RENEW_S = 15.0


class Replies(queue.SimpleQueue):
    """A request's queue of ``(key, entries)``. ``on_put``, when set, is called on the reader
    thread after each put, outside the reader's lock: a streaming response's sink (app/sink.py)
    then handles the entries on that thread, and its request thread is not woken."""

    on_put: Callable[[], None] | None = None


class StreamReader:
    """``open`` a request's stream keys to get a queue of ``(key, entries)``; a Redis failure
    arrives on every open queue as ``(None, exception)``. ``close`` them when done."""

    def __init__(self, client: redis.Redis):
        self._client = client
        self._lock = threading.Lock()
        self._streams: dict[str, list] = {}  # key -> [last entry id read, its queue]
        self._wake_key = ""
        self._wake_cursor = "0-0"
        self._pid = 0
        self._stopped = False

    @property
    def wake_key(self) -> str:
        """This process's wake stream ("" before ``start`` or the first ``open``)."""
        return self._wake_key if self._pid == os.getpid() else ""

    def open(self, stream_keys: list[str], into: Replies | None = None, pipe=None) -> Replies:
        """``into``: a queue an earlier ``open`` returned, so one waiting thread reads more streams
        (a migrated request's new attempt) from one queue. ``pipe``: a Redis pipeline to queue the
        reader's wake-up on, which the caller executes (with the request's task, app/publish.py):
        the streams are read from then on. Without one, ``open`` sends the wake-up itself."""
        q = into if into is not None else Replies()
        with self._lock:
            self._start_if_needed()
            for key in stream_keys:
                self._streams[key] = ["0-0", q]
        if pipe is None:
            self._wake(self._client)
        else:
            # The wake-up only: the reader thread renews the stream's TTL (_run).
            pipe.xadd(self._wake_key, {"w": 1}, maxlen=1)
        return q

    def start(self) -> None:
        """Starts this process's reader and makes its wake stream, ahead of the first request."""
        with self._lock:
            self._start_if_needed()
        self._wake(self._client)

    def stop(self) -> None:
        """Deletes this process's wake stream, and renews it no more: the process is exiting."""
        if self._pid != os.getpid():
            return  # never started in this process
        self._stopped = True
        try:
            self._client.delete(self._wake_key)
        except redis.RedisError as e:
            logger.warning("could not delete %s (%s); it expires within %ds", self._wake_key, e, WAKE_TTL_S)

    def _wake(self, client: redis.Redis) -> None:
        """Appends to the wake stream, which also (re)makes it and renews its TTL."""
        pipe = client.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": 1}, maxlen=1)
        pipe.expire(self._wake_key, WAKE_TTL_S)
        pipe.execute()

    def close(self, stream_keys) -> None:
        with self._lock:
            for key in stream_keys:
                self._streams.pop(key, None)

    def _start_if_needed(self) -> None:
        # gunicorn forks workers from a master that built the app, and threads do not survive a
        # fork: each worker process starts its own reader on first use.
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._streams.clear()
        self._wake_key = keys.frontend_wake(f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._wake_cursor = "0-0"
        # Its own connection: a blocked XREAD holds it.
        reader = redis_conn.dedicated(self._client)
        threading.Thread(target=self._run, args=(reader,), name="stream-reader", daemon=True).start()

    def _run(self, reader: redis.Redis) -> None:
        renewed = time.monotonic()
        while True:
            if time.monotonic() - renewed >= WAKE_RENEW_S and not self._stopped:
                try:
                    self._wake(reader)
                    renewed = time.monotonic()
                except redis.RedisError as e:
                    logger.warning("renewing %s failed: %s", self._wake_key, e)
            with self._lock:
                cursors: dict[KeyT, StreamIdT] = {key: cursor for key, (cursor, _) in self._streams.items()}
            cursors[self._wake_key] = self._wake_cursor
            try:
                reply = reader.xread(cursors, block=BLOCK_MS)
            except redis.RedisError as e:
                logger.error("reading output streams failed: %s", e)
                self._fail_all(e)
                continue
            self._deliver(reply or [])

    def _deliver(self, reply) -> None:
        told: dict[int, Callable[[], None]] = {}
        with self._lock:
            for raw_key, entries in reply:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if key == self._wake_key:
                    self._wake_cursor = entries[-1][0]
                    continue
                stream = self._streams.get(key)
                if stream is not None:  # else closed meanwhile: nobody is waiting for it
                    stream[0] = entries[-1][0]
                    stream[1].put((key, entries))
                    if (on_put := stream[1].on_put) is not None:
                        told[id(stream[1])] = on_put
        self._tell(told.values())

    @staticmethod
    def _tell(callbacks) -> None:
        # Outside the lock: a sink's step may close streams (a finished sub-request's).
        for on_put in callbacks:
            try:
                on_put()
            except Exception:  # noqa: BLE001  one request's bug must not stop every stream
                logger.exception("handling delivered entries failed")

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            waiting = {id(q): q for _, q in self._streams.values()}
        for q in waiting.values():
            q.put((None, error))
        self._tell([on_put for q in waiting.values() if (on_put := q.on_put) is not None])
        # redis-py reconnects on the next call; the requests that were told fail with 503, and
        # the next ones try again. Bounded, so a Redis outage does not spin this thread.
        time.sleep(0.5)
