"""The frontend's side of the task queue: enqueue generation tasks, then read their output streams.

Every wait here is bounded. A request fails with 504 when no worker takes it within
``first_token_timeout_s`` or it runs past ``request_timeout_s``. When the worker serving it dies,
the request moves to another (app/migration.py), or fails with a 503 saying why it could not.
Nothing waits on Celery results.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis
from celery import Celery

from app import metrics, migration
from app.errors import APIError, ClientGone, NoWorkers, RedisUnavailable, UpstreamTimeout
from app.migration import Attempts, CannotMigrate, is_lost
from app.publish import TaskPublisher
from app.streams import Replies, StreamReader
from config import Settings
from tasks import keys, queues, redis_conn
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
from tasks.registry import WorkerStatus, live_workers

logger = logging.getLogger(__name__)

# How often a waiting request re-checks its deadlines and its workers' leases: half of the 2 s
# in which a lost worker's requests must be on their way elsewhere (app/migration.py).
POLL_INTERVAL_S = 0.5
# Role counts (for /health and the 503 at submit) are cached this long, so a burst of requests
# costs one SCAN.
WORKER_CACHE_S = 1.0
# The leases the per-request checks read are cached this long: every request thread of a process
# shares one read, whatever the number of requests.
LIVENESS_CACHE_S = 0.25


class Pause(enum.Enum):
    """What Gateway.events yields in place of a delta to a driver that does not wait (``Driving``)."""

    WOULD_BLOCK = "would_block"  # nothing is queued yet: drive it again when entries arrive
    NEEDS_THREAD = "needs_thread"  # the next step may call Redis: only the request thread may take it


@dataclass
class Driving:
    """How a request's Gateway.events is driven. By default its request thread waits in it for
    each entry. A streaming response's sink (app/sink.py) sets ``nonblocking``: events then
    yields Pause.WOULD_BLOCK when nothing is queued; and ``by_reader`` while the stream reader
    thread drives it: events then leaves its periodic checks to the request thread, and yields
    Pause.NEEDS_THREAD before any step that may call Redis (a Failed event, a failed read, an
    Accepted or Routed), which resumes when the request thread drives it."""

    nonblocking: bool = False
    by_reader: bool = False
    # Set by events: when its periodic checks (deadlines, liveness, migration) are next due, and
    # the queue it reads.
    next_check: float = 0.0
    replies: Replies | None = None


@dataclass
class SubRequest:
    """One engine request: a completion with k prompts fans out into k of these. It may run as
    several attempts, one after another, when its worker dies (app/migration.py); the fields
    below are about the current one."""

    request_id: str  # the current attempt's id: its output stream and cancel flag
    prompt_token_ids: list[int]  # the original prompt
    choice_offset: int  # this sub-request's choice i is the response's choice offset + i
    worker_id: str | None = None  # the worker that accepted the attempt
    routed: Routed | None = None  # the router's choice for it
    finished: Finished | None = None
    # What migration needs; None (a sub-request built by hand) never moves: its lost worker is a 503.
    attempts: Attempts | None = None
    worker_pid: int | None = None  # the process behind worker_id, from its lease
    routed_pid: int | None = None  # the process behind routed.worker_id
    # Before anyone accepted it: the workers that may hold its message (the routers, or in queue
    # mode the decode workers, live when it was sent), id -> pid.
    holders: dict[str, int] = field(default_factory=dict)
    sent_at: float = field(default_factory=time.monotonic)  # when the attempt was sent
    waiting: bool = False  # it must move, and waits for a live worker to move to
    # Monotonic: how long it may look for a worker to move to, from the moment it had to move
    # until an attempt is accepted again (so a router that keeps finding none cannot extend it).
    move_deadline: float | None = None
    # The streams reader its request thread reads it on, opened by Gateway.submit in the round
    # trip that sent it; Gateway.events takes it over.
    watch: _Watch | None = field(default=None, repr=False)

    @property
    def migrations(self) -> int:
        return self.attempts.migrations if self.attempts else 0


class _Watch:
    """The output streams one request thread reads, on one reply queue: the current attempt's
    stream of each unfinished sub-request. An abandoned attempt's stream is dropped, so its late
    entries are never read."""

    def __init__(self, streams: StreamReader, subs: list[SubRequest]):
        self._streams = streams
        self._subs: dict[str, SubRequest] = {}
        self.replies: Replies = Replies()
        if subs:
            self.add(subs)

    def add(self, subs: list[SubRequest], pipe=None) -> None:
        """``pipe``: a Redis pipeline the caller executes, as StreamReader.open takes it."""
        added = {keys.output_stream(s.request_id): s for s in subs}
        self._subs.update(added)
        self._streams.open(list(added), into=self.replies, pipe=pipe)

    def drop(self, sub: SubRequest) -> None:
        key = keys.output_stream(sub.request_id)
        if self._subs.pop(key, None) is not None:
            self._streams.close([key])

    def sub_for(self, key: str) -> SubRequest | None:
        return self._subs.get(key)

    def close(self) -> None:
        self._streams.close(list(self._subs))
        self._subs.clear()


class Gateway:
    def __init__(self, settings: Settings, celery: Celery, client: redis.Redis):
        self.settings = settings
        self.celery = celery
        self.redis = client
        self.streams = StreamReader(client)
        self.publisher = TaskPublisher()
        # Sentinel-managed: a stream read that fails may mean the master changed (_stream_lost).
        self.failover_capable = redis_conn.parse(settings).is_sentinel
        self._live: dict[str, WorkerStatus] = {}
        self._live_read_at = float("-inf")
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
        """Per-process first uses, after the fork: Redis, the stream reader (and its wake stream,
        app/streams.py), the liveness cache, and a full pool of broker connections. Opened
        inside a burst, those connections queued every sending thread for 1.3-1.7 s; once open,
        the same burst sent in 30 ms.

        Each pooled producer declares the task's queue, which is what its first ``send_task``
        would do: kombu's Redis channel opens its socket only on a first command, and declares a
        queue once per connection. Without it, py-spy dumps of the first burst caught sending
        threads in ``Connection._connect`` and ``getaddrinfo``; with it, none."""
        pool = self.celery.producer_pool
        queue = self.celery.amqp.queues[queues.TASK_ROUTES[self._task]["queue"]]
        producers = []
        try:
            self.redis.ping()
            self.streams.start()
            self.live_roles(use_cache=False)
            # Publishing direct, the frontend never uses Celery's producers.
            for _ in range((pool.limit or 1) if self.settings.frontend.publish == "celery" else 0):
                producers.append(pool.acquire(block=False))
                producers[-1].maybe_declare(queue)
        except Exception as e:  # noqa: BLE001  the first requests then pay for it, and this says why
            logger.warning("frontend warm-up incomplete: %s", e)
        finally:
            for producer in producers:
                producer.release()

    # -- liveness --------------------------------------------------------------------------

    def live(self, max_age_s: float = LIVENESS_CACHE_S) -> dict[str, WorkerStatus]:
        """Every live worker's lease, by worker id, read at most ``max_age_s`` ago. One read
        serves every request thread of the process."""
        with self._lock:
            if time.monotonic() - self._live_read_at > max_age_s:
                self._live = {w.worker_id: w for w in live_workers(self.redis)}
                self._live_read_at = time.monotonic()
            return self._live

    def live_roles(self, use_cache: bool = True) -> dict[str, int]:
        """How many live workers each role has, e.g. {"decode": 2, "router": 1}."""
        return Counter(w.role for w in self.live(WORKER_CACHE_S if use_cache else 0).values())

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
        if missing and redis_conn.parse(self.settings).is_sentinel:
            # After a Sentinel failover each worker's consumer reconnects and puts its lease back
            # (workers drop their lease while they cannot consume: tasks/consuming.py) within
            # seconds: a request arriving in that gap waits for them, as the Redis commands
            # themselves do, rather than getting a 503.
            deadline = time.monotonic() + self.settings.redis.failover_wait_s
            while missing and time.monotonic() < deadline:
                time.sleep(LIVENESS_CACHE_S)
                missing = self.missing_roles(use_cache=False)
        if missing:
            raise NoWorkers(f"no live {' or '.join(missing)} worker; start one with "
                            f"`celery -A tasks worker -Q {missing[0]}`")

    # -- submit and stream -----------------------------------------------------------------

    @property
    def _entry_role(self) -> str:
        """The role whose workers take a request from the queue it is sent to."""
        return "router" if self.settings.router.enabled else "decode"

    def submit(self, request_id: str, prompts: list[list[int]], spec: SamplingSpec,
               api_key_name: str | None = None) -> list[SubRequest]:
        self.require_workers()
        deadline = time.time() + self.settings.frontend.request_timeout_s
        live = self.live(WORKER_CACHE_S)
        sends = []
        for i, ids in enumerate(prompts):
            msg = GenerateRequest(request_id=f"{request_id}-{i}" if len(prompts) > 1 else request_id,
                                  prompt_token_ids=ids, sampling=spec, deadline_unix=deadline)
            sends.append((SubRequest(msg.request_id, ids, i * spec.n,
                                     attempts=Attempts(msg, self.settings.frontend.max_migrations)), msg))
        subs = [sub for sub, _ in sends]
        watch = _Watch(self.streams, [])
        try:
            self._send(sends, live, watch)
        except BaseException:
            watch.close()
            raise
        for sub in subs:
            sub.watch = watch
        logger.info("[%s] enqueued %d task(s), %s prompt tokens%s", request_id, len(subs),
                    "+".join(str(len(s.prompt_token_ids)) for s in subs),
                    f", API key {api_key_name}" if api_key_name else "")
        return subs

    def _send(self, sends: list[tuple[SubRequest, GenerateRequest]], live: dict[str, WorkerStatus],
              watch: _Watch | None = None) -> None:
        """Sends each sub-request's message, having opened its stream on ``watch`` first (so no
        entry written before the read starts is missed). Published direct, that is one pipeline,
        one round trip to Redis, for the streams and every task (app/publish.py)."""
        # The request id as the task id: Flower and the worker's log then name the request.
        # A task nobody waits for any more is dropped by the broker-side expiry.
        expires_s = self.settings.frontend.first_token_timeout_s
        direct = self.settings.frontend.publish == "direct"
        pipe = self.redis.pipeline(transaction=False)
        if watch is not None:
            watch.add([sub for sub, _ in sends], pipe)
        if direct:
            queue = queues.TASK_ROUTES[self._task]["queue"]
            for _, msg in sends:
                self.publisher.add(pipe, queue, self._task, msg.request_id, request_to_task_arg(msg),
                                   task_argsrepr(msg), expires_s)
        if len(pipe):
            pipe.execute()
        if not direct:
            for _, msg in sends:
                self.celery.send_task(self._task, args=[request_to_task_arg(msg)], argsrepr=task_argsrepr(msg),
                                      task_id=msg.request_id, expires=expires_s)
        sent_at = time.monotonic()
        holders = {w: s.pid for w, s in live.items() if s.role == self._entry_role}
        for sub, _ in sends:
            sub.sent_at, sub.holders = sent_at, dict(holders)

    def events(self, subs: list[SubRequest], client_gone: Callable[[], bool] | None = None,
               driving: Driving | None = None) -> Iterator[tuple[SubRequest, Delta] | Pause]:
        """Yields (sub-request, delta) until every sub-request has finished, moving a sub-request
        whose worker is lost to another (app/migration.py). Raises APIError on failure or timeout,
        after cancelling whatever is still running. ``client_gone`` is asked once a poll interval,
        for responses that write nothing until the end: a stream learns that its client left when
        a write fails (GeneratorExit), a whole answer would not. ``driving``: how it is driven;
        it yields Pauses only when that says so."""
        watch = subs[0].watch if subs and all(s.watch is subs[0].watch for s in subs) else None
        if watch is None:
            watch = _Watch(self.streams, subs)
        for each in subs:
            each.watch = None
        if driving is None:
            driving = Driving()
        driving.replies = watch.replies
        started = next_check = last_delta = driving.next_check = time.monotonic()
        first_delta = True
        try:
            while any(s.finished is None for s in subs):
                # At most once a poll interval, not per token; never on the stream reader thread.
                if time.monotonic() >= next_check and not driving.by_reader:
                    if client_gone is not None and client_gone():
                        logger.info("[%s] client closed the connection; cancelling", subs[0].request_id)
                        raise ClientGone("the client closed the connection")
                    self._check(subs, watch, started)
                    next_check = driving.next_check = time.monotonic() + POLL_INTERVAL_S
                try:
                    if driving.nonblocking:
                        key, entries = watch.replies.get_nowait()
                    else:
                        key, entries = watch.replies.get(timeout=max(0.0, next_check - time.monotonic()))
                except queue.Empty:
                    if driving.nonblocking:
                        yield Pause.WOULD_BLOCK
                    continue
                if isinstance(entries, Exception):
                    if driving.by_reader:
                        yield Pause.NEEDS_THREAD
                    self._stream_lost(subs, watch, entries)
                    continue
                sub = watch.sub_for(key)
                if sub is None:  # an abandoned attempt's stream: read before it was dropped
                    continue
                for _, fields in entries:
                    event = decode_event(fields[b"m"])
                    if driving.by_reader and not isinstance(event, (Delta, Finished)):
                        yield Pause.NEEDS_THREAD  # resumed by the request thread, at this event
                    if isinstance(event, Delta):
                        now = time.monotonic()
                        if first_delta:
                            metrics.TTFT.observe(now - started)
                        else:
                            metrics.ITL.observe(now - last_delta)
                        first_delta, last_delta = False, now
                        if sub.attempts is not None:
                            sub.attempts.record(event)
                        yield sub, event
                    elif isinstance(event, Routed):
                        sub.routed, sub.routed_pid = event, self._pid_of(event.worker_id)
                    elif isinstance(event, Accepted):
                        metrics.QUEUE_WAIT.observe(time.monotonic() - sub.sent_at)
                        sub.worker_id, sub.worker_pid = event.worker_id, self._pid_of(event.worker_id)
                        sub.move_deadline = None
                        logger.info("[%s] taken by %s", sub.request_id, event.worker_id)
                    elif isinstance(event, Finished):
                        self._finish(sub, event)
                        watch.drop(sub)
                    elif isinstance(event, Failed):
                        self._failed(sub, event, watch)
                        break  # the attempt is over, and it moved (or waits to): the rest is void
        except redis.RedisError as e:  # reading leases, or flagging an abandoned attempt
            self.cancel(s for s in subs if s.finished is None)
            raise RedisUnavailable.from_error(e) from e
        except BaseException:
            # The client went away (GeneratorExit) or the request failed: stop the others.
            self.cancel(s for s in subs if s.finished is None)
            raise
        finally:
            watch.close()

    def _finish(self, sub: SubRequest, event: Finished | None) -> None:
        prompt = len(sub.prompt_token_ids)
        # A resumed attempt's prompt holds the tokens received before: its cache hits may cover
        # some of them, which are not prompt tokens of the client's.
        cached = min(event.num_cached_tokens, prompt) if event else 0
        sub.finished = Finished(num_prompt_tokens=prompt, num_cached_tokens=cached)

    def _failed(self, sub: SubRequest, event: Failed, watch: _Watch) -> None:
        """A Failed event ends the current attempt: the request moves, waits for a worker to move
        to, or fails with it."""
        if sub.attempts is not None and event.type == "engine_unavailable":
            worker = sub.worker_id or (sub.routed.worker_id if sub.routed else "")
            self._migrate(sub, worker, sub.worker_pid, migration.ENGINE_DIED, watch)
        elif (sub.attempts is not None and self.settings.router.enabled and sub.worker_id is None
              and event.type == "service_unavailable"):
            # The router found no live decode worker to take it (none outside those it lost).
            watch.drop(sub)
            self._wait_for_worker(sub)
        else:
            raise APIError(event.message, status=event.status, type=event.type)

    # -- liveness and migration ------------------------------------------------------------

    def _check(self, subs: list[SubRequest], watch: _Watch, started: float) -> None:
        """Deadlines, and the liveness of whichever worker each unfinished sub-request depends
        on. Once a poll interval."""
        now = time.monotonic()
        if now - started > self.settings.frontend.request_timeout_s:
            raise UpstreamTimeout(f"the request did not finish within {self.settings.frontend.request_timeout_s:.0f}s")
        live = self.live()
        for sub in subs:
            if sub.finished is not None:
                continue
            if sub.waiting:
                if self._has_candidate(sub, live):
                    self._resubmit(sub, watch, live)
                elif sub.move_deadline is not None and now > sub.move_deadline:
                    self._count_failure("no_worker")
                    lost = ", ".join(sorted({w.worker_id for w in sub.attempts.lost})) if sub.attempts else "?"
                    raise NoWorkers(f"the request's worker ({lost}) was lost, and no other live "
                                    f"{' or '.join(self.missing_roles()) or 'decode'} worker could take it within "
                                    f"{self.settings.frontend.first_token_timeout_s:.0f}s")
            elif sub.worker_id is not None:
                if is_lost(sub.worker_id, sub.worker_pid, live):
                    self._migrate(sub, sub.worker_id, sub.worker_pid, migration.WORKER_LOST, watch)
            elif sub.routed is not None and is_lost(sub.routed.worker_id, sub.routed_pid, live):
                self._migrate(sub, sub.routed.worker_id, sub.routed_pid, migration.ROUTED_TO_LOST, watch)
            elif now - sub.sent_at > self.settings.frontend.first_token_timeout_s:
                raise self._not_taken()
            elif sub.routed is None and sub.attempts is not None:
                gone = sorted(w for w, pid in sub.holders.items() if is_lost(w, pid, live))
                if gone:
                    self._resend(sub, gone, live)

    def _not_taken(self) -> APIError:
        timeout = self.settings.frontend.first_token_timeout_s
        if "decode" in self.missing_roles():
            self._count_failure("no_worker")
            return NoWorkers(f"no live decode worker took the request within {timeout:.0f}s")
        return UpstreamTimeout(f"no worker took the request within {timeout:.0f}s")

    def _stream_lost(self, subs: list[SubRequest], watch: _Watch, error: Exception) -> None:
        """Reading the output streams failed. With a single Redis that is an outage: 503. With
        Sentinels it may be a failover, after which the new master may lack the attempts' last
        entries (or their messages): each unfinished attempt moves, resuming from the tokens the
        client has, to any worker, its own included (app/migration.py, REDIS_FAILOVER). A failover
        that outlasts redis.failover_wait_s still ends in the 503, from the reads the move makes."""
        if not self.failover_capable or any(s.attempts is None for s in subs):
            raise RedisUnavailable.from_error(error)
        for sub in subs:
            if sub.finished is None and not sub.waiting:
                logger.warning("[%s] output stream read failed (%s); moving it in case Redis failed over",
                               sub.request_id, error)
                self._migrate(sub, sub.worker_id or "", sub.worker_pid, migration.REDIS_FAILOVER, watch)

    def _migrate(self, sub: SubRequest, worker_id: str, pid: int | None, reason: str, watch: _Watch) -> None:
        """The current attempt's worker is lost (or, REDIS_FAILOVER, its stream): abandon the
        attempt, and send the rest of the request elsewhere (or wait for a worker to send it to)."""
        watch.drop(sub)
        self.cancel([sub])  # a worker that finds the abandoned attempt's message later drops it
        attempts = sub.attempts
        if attempts is None:
            raise APIError(f"worker {worker_id} was lost while serving the request; retry it",
                           status=503, type="service_unavailable")
        if attempts.complete:  # it died between its last token and its Finished
            self._finish(sub, None)
            return
        try:
            if reason == migration.REDIS_FAILOVER:
                attempts.move("Redis failed over")
            else:
                attempts.lose(worker_id, pid)
        except CannotMigrate as e:
            self._count_failure(e.reason)
            logger.warning("[%s] not migrated from %s (%s): %s", attempts.base_id, worker_id, reason, e.message)
            raise APIError(e.message, status=503, type="service_unavailable") from None
        metrics.MIGRATIONS.labels(reason).inc()
        logger.warning("[%s] migrating from %s (%s) after %d token(s): attempt %d, migration %d of at most %d",
                       attempts.base_id, worker_id, reason, attempts.num_received, attempts.attempt + 1,
                       attempts.migrations, attempts.max_migrations)
        self._wait_for_worker(sub)
        live = self.live(0)
        if self._has_candidate(sub, live):
            self._resubmit(sub, watch, live)

    def _wait_for_worker(self, sub: SubRequest) -> None:
        sub.waiting = True
        if sub.move_deadline is None:
            sub.move_deadline = time.monotonic() + self.settings.frontend.first_token_timeout_s

    def _has_candidate(self, sub: SubRequest, live: dict[str, WorkerStatus]) -> bool:
        """Whether a live worker could take the sub-request's next attempt: a decode worker it
        did not lose, and a router if the deployment routes."""
        routers = not self.settings.router.enabled or any(s.role == "router" for s in live.values())
        return routers and sub.attempts is not None and sub.attempts.has_candidate(live)

    def _resubmit(self, sub: SubRequest, watch: _Watch, live: dict[str, WorkerStatus]) -> None:
        assert sub.attempts is not None
        msg = sub.attempts.next_attempt(live)
        sub.request_id, sub.waiting = msg.request_id, False
        sub.worker_id = sub.worker_pid = sub.routed = sub.routed_pid = None
        self._send([(sub, msg)], live, watch)
        logger.info("[%s] attempt %s sent: %d prompt tokens, max_tokens=%d, excluding %s", sub.attempts.base_id,
                    msg.request_id, len(msg.prompt_token_ids), msg.sampling.max_tokens, msg.exclude_workers or "none")

    def _resend(self, sub: SubRequest, gone: list[str], live: dict[str, WorkerStatus]) -> None:
        """Sends the unaccepted attempt again, under its own id: a worker that died may have held
        it. The worker's claim drops whichever copy runs second."""
        assert sub.attempts is not None
        metrics.RESENDS.inc()
        logger.warning("[%s] resending: not accepted yet, and %s, which may hold it, was lost",
                       sub.request_id, ", ".join(gone))
        self._send([(sub, sub.attempts.request)], live)

    @staticmethod
    def _count_failure(reason: str) -> None:
        metrics.MIGRATION_FAILURES.labels(reason).inc()

    def _pid_of(self, worker_id: str) -> int | None:
        """The process behind a worker's lease, so that its replacement under the same name is
        not taken for it."""
        status = self.live().get(worker_id) or self.live(0).get(worker_id)
        return status.pid if status else None

    def cancel(self, subs) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for sub in subs:
            pipe.set(keys.cancel_flag(sub.request_id), 1, ex=int(self.settings.frontend.request_timeout_s))
        try:
            pipe.execute()
        except redis.RedisError as e:
            logger.warning("could not flag cancellation: %s", e)
