"""Admission control: how much generation work the frontend lets in, and the fast 429 past it.

Two bounds, checked in this order as a generation request arrives, before its body is read:

1. **This process's threads.** A gunicorn gthread process has ``frontend.threads`` threads; a
   generation request holds one until its response (a stream's last chunk) is done. At most
   ``threads - frontend.reserved_threads`` of them serve generation, so the rest are always free
   for /health, /metrics and the refusals themselves. A plain counter under a lock: no I/O.
2. **The deployment's decode workers.** Queued plus running requests, over every frontend process
   of every frontend, are at most ``frontend.max_requests_per_decode_worker`` x live decode
   workers. The admitted requests are members of one Redis sorted set (``tasks.keys.ADMITTED``),
   checked and added by one Lua script, so two frontends cannot both take the last place.
   Each member's score is a lease that its process renews while the request runs; a frontend
   that crashes stops renewing, and its members are pruned within ``LEASE_S``, so it cannot leak
   the deployment's capacity.

Once the deployment-wide check has refused, the same answer stands for FULL_MEMORY_S in this
process (``Admission.refusing``), unless it gives a place back meanwhile: the gunicorn worker
then answers new generation requests with their 429 as it accepts them (app/gunicorn_worker.py),
and the middleware without asking Redis. With the gate (``frontend.gate``, app/gate.py), these
checks are the second line: the gate refuses past the same limits before a worker sees the
connection, from what the workers tell it (``on_full``, ``on_place_given_back``,
``on_decode_workers``).

Both run in a WSGI middleware in front of Flask, so a refusal costs no JSON parsing, no
tokenizing, and no Flask request: it is answered from the request line alone, which keeps it
cheap enough that a burst of them drains the listen backlog quickly (/health waits in that
same backlog; app/gunicorn_conf.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from app import metrics
from config import FrontendConfig
from tasks import keys

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# Where an admitted request's Ticket sits in the WSGI environ, for a response that keeps working
# after its HTTP answer (a background /v1/responses request) to hold its places (Ticket.keep).
TICKET_ENVIRON_KEY = "llmq.admission.ticket"

# An admitted request's place in the deployment-wide set lasts this long unless its process
# renews it, which it does every RENEW_EVERY_S while the request runs. A crashed frontend's places
# are free again within LEASE_S; a live process would have to miss several renewals in a row
# (a GIL or CPU stall of LEASE_S - RENEW_EVERY_S) before its places lapse, and a lapse only ever
# lets more in, never refuses or fails an admitted request.
LEASE_S = 30.0
RENEW_EVERY_S = 5.0
# After the deployment-wide check refuses a request, this process refuses the next ones without
# asking Redis for this long (app/gunicorn_worker.py, at accept), unless it gives a place back
# meanwhile. A place freed by another process within it goes to a later request: the refused
# client retries after Retry-After anyway.
FULL_MEMORY_S = 0.2

# When the thread that serves a request was handed its connection (time.monotonic()), set by the
# gunicorn worker, to time a refusal from its accept.
accepted_at = threading.local()

# Reads the whole set's members with their leases, prunes the lapsed ones, and adds one more if
# there is room. KEYS[1]: the set. ARGV: member, lease seconds, limit. Returns {admitted (0/1),
# members after}. The clock is Redis's (TIME), so frontends whose clocks differ agree on leases.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return {1, n + 1}
"""

# Renews the leases of the members that are still there (XX: a member that lapsed stays out).
# KEYS[1]: the set. ARGV: lease seconds, then the members.
_RENEW_LUA = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return #ARGV - 1
"""


def process_limit(frontend: FrontendConfig) -> int:
    """Generation requests one gunicorn process serves at once."""
    return frontend.threads - frontend.reserved_threads


def deployment_limit(per_worker: int, live_decode_workers: int) -> int:
    """Queued plus running requests the whole deployment admits."""
    return per_worker * max(0, live_decode_workers)


class Refused(Exception):
    """A request past a limit; ``reason`` labels the metric, ``message`` tells the client."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class ProcessSlots:
    """A non-blocking counting semaphore that also says how many are taken."""

    def __init__(self, limit: int):
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1


class DeploymentSlots:
    """The deployment-wide set of admitted requests in Redis, and this process's lease renewals."""

    def __init__(self, client: redis.Redis, lease_s: float = LEASE_S, renew_every_s: float = RENEW_EVERY_S):
        self.redis = client
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s
        self._admit = client.register_script(_ADMIT_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._mine: set[str] = set()
        self._lock = threading.Lock()
        self._renewer_pid = 0

    def try_take(self, member: str, limit: int) -> tuple[bool, int]:
        """(admitted, members now). Raises redis.RedisError."""
        admitted, count = self._admit(keys=[keys.ADMITTED], args=[member, self.lease_s, limit])
        if admitted:
            with self._lock:
                self._mine.add(member)
                self._start_renewer_if_needed()
        return bool(admitted), int(count)

    def give_back(self, member: str) -> None:
        with self._lock:
            self._mine.discard(member)
        try:
            self.redis.zrem(keys.ADMITTED, member)
        except redis.RedisError as e:  # the lease lapses by itself
            logger.warning("could not free admission place %s (its lease will lapse): %s", member, e)

    def renew(self) -> int:
        with self._lock:
            members = list(self._mine)
        if not members:
            return 0
        return int(self._renew(keys=[keys.ADMITTED], args=[self.lease_s, *members]))

    def _start_renewer_if_needed(self) -> None:
        # Threads do not survive gunicorn's fork: each process starts its own on first use.
        if self._renewer_pid == os.getpid():
            return
        self._renewer_pid = os.getpid()
        threading.Thread(target=self._renew_forever, name="admission-renewer", daemon=True).start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.renew_every_s)
            try:
                self.renew()
            except redis.RedisError as e:
                logger.warning("could not renew admission leases: %s", e)


@dataclass
class Ticket:
    """An admitted request's places; ``release`` gives them back, once, however the request ends."""

    admission: Admission
    member: str | None  # None: the deployment-wide check was skipped (no decode worker, or no Redis)
    released: bool = False
    # The HTTP response holds the places; a background response holds them too (keep), until
    # its work ends. Each holder releases once; the last release gives them back.
    holders: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def keep(self) -> None:
        with self._lock:
            self.holders += 1

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.holders -= 1
            if self.holders > 0:
                return
            self.released = True
        self.admission.place_given_back()
        self.admission.process.give_back()
        if self.member is not None:
            self.admission.deployment.give_back(self.member)


class Admission:
    def __init__(self, frontend: FrontendConfig, client: redis.Redis, live_decode_workers: Callable[[], int]):
        self.frontend = frontend
        self.process = ProcessSlots(process_limit(frontend))
        self.deployment = DeploymentSlots(client)
        self.live_decode_workers = live_decode_workers
        # The deployment's last refusal, and until when it stands for the next requests.
        self._full: Refused | None = None
        self._full_until = 0.0
        # Told of the deployment-wide check's refusals, of places given back, and of the live
        # decode workers when their number changes: the gate's worker sets them (app/gate.py).
        self.on_full: Callable[[Refused], None] | None = None
        self.on_place_given_back: Callable[[], None] | None = None
        self.on_decode_workers: Callable[[int], None] | None = None
        self._decode_workers_told = -1

    def refusing(self) -> Refused | None:
        """The refusal a new generation request would get, if this process knows it without Redis:
        its own slots are all taken, or the deployment refused within FULL_MEMORY_S and no place
        was given back here since. None: ask admit()."""
        if self.process.taken >= self.process.limit:
            return Refused("process", self._process_message())
        if self._full is not None and time.monotonic() < self._full_until:
            return self._full
        return None

    def place_given_back(self) -> None:
        self._full_until = 0.0
        if self.on_place_given_back is not None:
            self.on_place_given_back()

    def _process_message(self) -> str:
        return (f"this frontend process is serving {self.process.limit} generation requests, "
                f"its limit (frontend.threads - frontend.reserved_threads); retry shortly")

    def admit(self) -> Ticket:
        """A ticket, or Refused. Never blocks on anything but one Redis round trip."""
        if not self.process.try_take():
            raise Refused("process", self._process_message())
        if self._full is not None and time.monotonic() < self._full_until:
            self.process.give_back()
            raise self._full  # the deployment refused just now: no Redis round trip for the same answer
        try:
            return Ticket(self, self._take_deployment_place())
        except BaseException:
            self.process.give_back()
            raise

    def _take_deployment_place(self) -> str | None:
        per_worker = self.frontend.max_requests_per_decode_worker
        try:
            workers = self.live_decode_workers()
            if workers != self._decode_workers_told and self.on_decode_workers is not None:
                self._decode_workers_told = workers
                self.on_decode_workers(workers)
            if workers <= 0:
                return None  # the gateway answers 503: no live decode worker
            member = f"{os.getpid()}-{uuid.uuid4().hex}"
            admitted, count = self.deployment.try_take(member, deployment_limit(per_worker, workers))
        except redis.RedisError as e:
            # Without Redis nothing can be served anyway; the request goes on, and the gateway
            # answers it with the error it would give without admission control.
            logger.debug("admission skipped the deployment-wide check: %s", e)
            return None
        if not admitted:
            self._full = Refused("deployment", f"the deployment has {count} requests queued or running, its limit "
                                               f"of {per_worker} per live decode worker x {workers} "
                                               f"(frontend.max_requests_per_decode_worker); retry shortly")
            self._full_until = time.monotonic() + FULL_MEMORY_S
            if self.on_full is not None:
                self.on_full(self._full)
            raise self._full
        return member


def refusal_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "rate_limit_exceeded", "param": None,
                                 "code": "rate_limit_exceeded"}}).encode()


def request_size(data: bytes) -> int | None:
    """Bytes of the whole request (its head and its Content-Length body) once its head is in
    ``data``; None while it is not, or for a chunked body or a malformed Content-Length."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = 0
    for line in data[data.find(b"\r\n") + 2:head_end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.strip().isdigit():
                return None
            length = int(value)
    return head_end + 4 + length


def generation_request(data: bytes) -> tuple[str, int] | None:
    """(path, bytes of the whole request) for a POST to a generation path whose request line,
    headers and Content-Length body are all in ``data``; None for anything else, or not yet whole."""
    line_end = data.find(b"\r\n")
    if line_end < 0:
        return None
    parts = data[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST":
        return None
    path = parts[1].partition(b"?")[0].decode("latin-1")
    if path not in GENERATION_PATHS:
        return None
    total = request_size(data)
    return (path, total) if total is not None and len(data) >= total else None


def refusal_bytes(refused: Refused, retry_after_s: int) -> bytes:
    """The whole HTTP answer of a refusal, for a connection answered before any WSGI."""
    body = refusal_body(refused.message)
    head = (f"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\n\r\n")
    return head.encode("latin-1") + body


def count_refusal(refused: Refused, path: str, where: str, since: float | None) -> None:
    metrics.REFUSED.labels(refused.reason).inc()
    metrics.REQUESTS.labels(path, "429").inc()
    if since is not None:
        metrics.REFUSAL_SECONDS.labels(where).observe(time.monotonic() - since)


def _drain(environ: dict, limit: int) -> None:
    """Reads and drops the request body (bytes only; nothing parses it), so a client that sends
    its whole body before reading gets the 429, not a reset connection."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH") or ""
    remaining = int(length) if length.isdigit() else limit
    remaining = min(remaining, limit)
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 16))
        if not chunk:
            return
        remaining -= len(chunk)


class _ReleasingIterable:
    """The app's response iterable, releasing the ticket when gunicorn closes it (whether the app's
    own close raises or not)."""

    def __init__(self, body: Iterable[bytes], ticket: Ticket):
        self._body = body
        self._ticket = ticket

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._ticket.release()


class AdmissionMiddleware:
    """WSGI middleware in front of the Flask app: takes a ticket for every generation request, and
    gives it back when the response iterable is closed, which gunicorn does after the last chunk
    is sent, or when the client goes away mid-stream, or after an error."""

    def __init__(self, wsgi_app, admission: Admission, frontend: FrontendConfig):
        self.wsgi_app = wsgi_app
        self.admission = admission
        self.retry_after = str(frontend.retry_after_s)
        self.drain_limit = frontend.max_body_bytes

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or path not in GENERATION_PATHS:
            return self.wsgi_app(environ, start_response)
        try:
            ticket = self.admission.admit()
        except Refused as refused:
            return self._refuse(environ, start_response, path, refused)
        environ[TICKET_ENVIRON_KEY] = ticket
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            ticket.release()
            raise
        return _ReleasingIterable(body, ticket)

    def _refuse(self, environ: dict, start_response, path: str, refused: Refused) -> list[bytes]:
        count_refusal(refused, path, "wsgi", getattr(accepted_at, "t", None))
        try:
            _drain(environ, self.drain_limit)
        except (OSError, ValueError):
            pass  # the client is gone or sent garbage; it gets the answer if it still listens
        body = refusal_body(refused.message)
        start_response("429 Too Many Requests", [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Retry-After", self.retry_after),
        ])
        return [body]
