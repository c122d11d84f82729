"""The frontend's side of the task queue: enqueue generation tasks, then read their output streams.

Every wait here is bounded. A request fails with 504 when no worker takes it within
``first_token_timeout_s`` or it runs past ``request_timeout_s``, and with 503 when the worker
that took it stops renewing its lease. Nothing waits on Celery results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from celery import Celery

from app import metrics
from app.errors import APIError, ClientGone, NoWorkers, RedisUnavailable, UpstreamTimeout
from app.streams import StreamReader
from config import Settings
from tasks import keys, queues
from tasks.messages import (
    Accepted,
    Delta,
    Failed,
    Finished,
    GenerateRequest,
    Routed,
    SamplingSpec,
    decode_event,
    request_to_task_arg,
    task_argsrepr,
)
from tasks.registry import is_alive, live_workers

logger = logging.getLogger(__name__)

# How often a waiting request re-checks its deadlines and its worker's lease.
POLL_INTERVAL_S = 1.0
# Live-worker lookups are cached this long, so a burst of requests costs one SCAN.
WORKER_CACHE_S = 1.0


@dataclass
class SubRequest:
    """One engine request: a completion with k prompts fans out into k of these."""

    request_id: str
    prompt_token_ids: list[int]
    choice_offset: int  # this sub-request's choice i is the response's choice offset + i
    worker_id: str | None = None
    routed: Routed | None = None
    finished: Finished | None = None


class Gateway:
    def __init__(self, settings: Settings, celery: Celery, client: redis.Redis):
        self.settings = settings
        self.celery = celery
        self.redis = client
        self.streams = StreamReader(client)
        self._workers_checked_at = 0.0
        self._roles: Counter = Counter()
        self._lock = threading.Lock()

    @property
    def _task(self) -> str:
        """The task a request enters by: the router's when there is one, else generation."""
        return queues.ROUTE_TASK if self.settings.router.enabled else queues.GENERATE_TASK

    # -- warm-up ---------------------------------------------------------------------------
    # First uses that cost far more than a request should. Paid inside the first burst of
    # requests, every thread that sent a task before the first one finished would repeat them,
    # while each process's Redis and broker connections were still being opened
    # (docs/benchmarks.md, "The gc freeze", covers the rest of the first burst's cost).

    def prepare(self) -> None:
        """Fork-safe first uses, done once in gunicorn's master (preload_app): Celery builds its
        result backend on the first ``send_task``, scanning every installed package's entry
        points to find the class (tasks/celery_app.py, ``result_backend_thread_safe``), and its
        AsyncResult class, behind a lock every sending thread queues on."""
        self.celery.backend  # noqa: B018  (properties that cache what they build)
        self.celery.AsyncResult  # noqa: B018

    def connect(self) -> None:
        """Per-process first uses, after the fork: Redis, the liveness cache, and a full pool of
        broker connections. Opened inside a burst, those connections queued every sending thread
        for 1.3-1.7 s; once open, the same burst sent in 30 ms.

        Each pooled producer declares the task's queue, which is what its first ``send_task``
        would do: kombu's Redis channel opens its socket only on a first command, and declares a
        queue once per connection. Without it, py-spy dumps of the first burst caught sending
        threads in ``Connection._connect`` and ``getaddrinfo``; with it, none."""
        pool = self.celery.producer_pool
        queue = self.celery.amqp.queues[queues.TASK_ROUTES[self._task]["queue"]]
        producers = []
        try:
            self.redis.ping()
            self.live_roles(use_cache=False)
            for _ in range(pool.limit or 1):
                producers.append(pool.acquire(block=False))
                producers[-1].maybe_declare(queue)
        except Exception as e:  # noqa: BLE001  the first requests then pay for it, and this says why
            logger.warning("frontend warm-up incomplete: %s", e)
        finally:
            for producer in producers:
                producer.release()

    # -- liveness --------------------------------------------------------------------------

    def live_roles(self, use_cache: bool = True) -> dict[str, int]:
        """How many live workers each role has, e.g. {"decode": 2, "router": 1}."""
        with self._lock:
            stale = time.monotonic() - self._workers_checked_at > WORKER_CACHE_S
            if not use_cache or stale:
                self._roles = Counter(w.role for w in live_workers(self.redis))
                self._workers_checked_at = time.monotonic()
            return self._roles

    def missing_roles(self, use_cache: bool = True) -> list[str]:
        needed = ["decode"] + (["router"] if self.settings.router.enabled else [])
        missing = [r for r in needed if not self.live_roles(use_cache).get(r)]
        if missing and use_cache:
            # A missing role is never taken from the cache: a worker that just came up (while
            # another role's lease filled the cache) must be seen at once.
            return self.missing_roles(use_cache=False)
        return missing

    def require_workers(self) -> None:
        missing = self.missing_roles()
        if missing:
            raise NoWorkers(f"no live {' or '.join(missing)} worker; start one with "
                            f"`celery -A tasks worker -Q {missing[0]}`")

    # -- submit and stream -----------------------------------------------------------------

    def submit(self, request_id: str, prompts: list[list[int]], spec: SamplingSpec) -> list[SubRequest]:
        self.require_workers()
        deadline = time.time() + self.settings.frontend.request_timeout_s
        subs = [
            SubRequest(f"{request_id}-{i}" if len(prompts) > 1 else request_id, ids, i * spec.n)
            for i, ids in enumerate(prompts)
        ]
        for sub in subs:
            msg = GenerateRequest(request_id=sub.request_id, prompt_token_ids=sub.prompt_token_ids,
                                  sampling=spec, deadline_unix=deadline)
            self.celery.send_task(
                self._task,
                args=[request_to_task_arg(msg)],
                argsrepr=task_argsrepr(msg),
                # The request id as the task id: Flower and the worker's log then name the request.
                task_id=sub.request_id,
                # A task nobody waits for any more is dropped by the broker-side expiry.
                expires=self.settings.frontend.first_token_timeout_s,
            )
        logger.info("[%s] enqueued %d task(s), %s prompt tokens", request_id, len(subs),
                    "+".join(str(len(s.prompt_token_ids)) for s in subs))
        return subs

    def events(self, subs: list[SubRequest],
               client_gone: Callable[[], bool] | None = None) -> Iterator[tuple[SubRequest, Delta]]:
        """Yields (sub-request, delta) until every sub-request has finished. Raises APIError on
        failure or timeout, after cancelling whatever is still running. ``client_gone`` is asked
        once a poll interval, for responses that write nothing until the end: a stream learns
        that its client left when a write fails (GeneratorExit), a whole answer would not."""
        by_key = {keys.output_stream(s.request_id): s for s in subs}
        unfinished = set(by_key)
        started = next_check = last_delta = time.monotonic()
        first_delta = True
        replies = self.streams.open(list(by_key))
        try:
            while unfinished:
                if time.monotonic() >= next_check:  # at most once a poll interval, not per token
                    if client_gone is not None and client_gone():
                        logger.info("[%s] client closed the connection; cancelling", subs[0].request_id)
                        raise ClientGone("the client closed the connection")
                    self._check_deadlines(subs, started)
                    next_check = time.monotonic() + POLL_INTERVAL_S
                try:
                    key, entries = replies.get(timeout=max(0.0, next_check - time.monotonic()))
                except queue.Empty:
                    continue
                if isinstance(entries, Exception):
                    raise RedisUnavailable.from_error(entries)
                sub = by_key[key]
                for _, fields in entries:
                    event = decode_event(fields[b"m"])
                    if isinstance(event, Delta):
                        now = time.monotonic()
                        if first_delta:
                            metrics.TTFT.observe(now - started)
                        else:
                            metrics.ITL.observe(now - last_delta)
                        first_delta, last_delta = False, now
                        yield sub, event
                    elif isinstance(event, Routed):
                        sub.routed = event
                    elif isinstance(event, Accepted):
                        metrics.QUEUE_WAIT.observe(time.monotonic() - started)
                        sub.worker_id = event.worker_id
                        logger.info("[%s] taken by %s", sub.request_id, event.worker_id)
                    elif isinstance(event, Finished):
                        sub.finished = event
                        unfinished.discard(key)
                        self.streams.close([key])
                    elif isinstance(event, Failed):
                        raise APIError(event.message, status=event.status, type=event.type)
        except BaseException as e:
            # The client went away (GeneratorExit) or the request failed: stop the others.
            self.cancel(s for s in subs if s.finished is None)
            if isinstance(e, redis.RedisError):  # mid-stream too, in the error event's shape
                raise RedisUnavailable.from_error(e) from e
            raise
        finally:
            self.streams.close(by_key)

    def _check_deadlines(self, subs: list[SubRequest], started: float) -> None:
        waited = time.monotonic() - started
        if waited > self.settings.frontend.request_timeout_s:
            raise UpstreamTimeout(f"the request did not finish within {self.settings.frontend.request_timeout_s:.0f}s")
        for sub in subs:
            if sub.finished is not None:
                continue
            if sub.worker_id is None:
                if waited > self.settings.frontend.first_token_timeout_s:
                    raise UpstreamTimeout(
                        f"no worker took the request within {self.settings.frontend.first_token_timeout_s:.0f}s")
            elif not is_alive(self.redis, sub.worker_id):
                raise APIError(f"worker {sub.worker_id} was lost while serving the request; retry it",
                               status=503, type="service_unavailable")

    def cancel(self, subs) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for sub in subs:
            pipe.set(keys.cancel_flag(sub.request_id), 1, ex=int(self.settings.frontend.request_timeout_s))
        try:
            pipe.execute()
        except redis.RedisError as e:
            logger.warning("could not flag cancellation: %s", e)
