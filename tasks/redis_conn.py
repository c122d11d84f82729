"""The one place that turns ``redis_url`` (and the ``redis`` section) into Redis clients.

Every role's direct clients (output streams, leases, admission slots, the KV event stream, the
NIXL registry, pub/sub) come from ``client``; Celery's broker from ``broker_url`` and
``broker_transport_options`` (tasks/celery_app.py). Two kinds of URL:

- ``redis://[[user]:password@]host:port/db`` or ``rediss://`` (TLS): one server.
- ``sentinel://[:password@]host:26379[/db];sentinel://host2:26379;...``: a Sentinel set, as kombu's
  Sentinel transport takes it, with the master's name in ``redis.sentinel_master``. The password
  and the db are the master's and are read from the first URL; the Sentinels themselves are asked
  without one (``redis.sentinel_password`` if they need one).

A password may also come from ``redis.password``; one in the URL wins.

**Failover.** A Sentinel client's connections look the master up on every (re)connect, and one
that finds itself talking to a demoted master (READONLY) drops its connection: after a failover
the next command goes to the new master. Until the Sentinels have promoted one, commands fail
with ConnectionError; a Sentinel client retries them, with a short backoff, for at most
``redis.failover_wait_s``, so that a request arriving during the switch waits for it rather than
failing, and one that outlasts it gets the usual 503 with Retry-After (app/errors.py). A plain
URL's client does not retry: a Redis that is down stays down for longer than a client should
wait, and the 503 says so at once.

``mask`` is what every log line and error uses to show a URL.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from config import Settings

T = TypeVar("T")

SENTINEL_SCHEME = "sentinel"
PLAIN_SCHEMES = ("redis", "rediss", "unix")


class RedisURLError(ValueError):
    """The URL cannot name a Redis (or a Sentinel set) for this deployment."""


@dataclass(frozen=True)
class Target:
    """What a URL names. ``sentinels`` is empty for a single server."""

    url: str  # as given (with the password, if any): only ever shown through ``mask``
    sentinels: tuple[tuple[str, int], ...]
    master: str
    password: str | None
    username: str | None
    db: int

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def mask(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs, errors and pages: every part
    of a ``;``-separated Sentinel list."""
    return ";".join(_mask_one(part) for part in url.split(";"))


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # unparseable: show nothing of what might be a secret
        return "<unparseable redis URL>"


def _db_of(path: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise RedisURLError(f"the db in the URL must be a number, not {text!r}")
    return int(text)


def parse(settings: Settings) -> Target:
    url = settings.redis_url
    parts = [p.strip() for p in url.split(";") if p.strip()]
    if not parts:
        raise RedisURLError("redis_url is empty")
    schemes = {urlsplit(p).scheme for p in parts}
    if schemes == {SENTINEL_SCHEME}:
        if not settings.redis.sentinel_master:
            raise RedisURLError(f"redis_url {mask(url)} names Sentinels: set redis.sentinel_master "
                                "to the name of the master they watch")
        first = urlsplit(parts[0])
        hosts = []
        for p in parts:
            s = urlsplit(p)
            if not s.hostname:
                raise RedisURLError(f"{mask(p)}: a Sentinel URL needs a host")
            hosts.append((s.hostname, s.port or 26379))
        return Target(url, tuple(hosts), settings.redis.sentinel_master,
                      unquote(first.password) if first.password else settings.redis.password,
                      unquote(first.username) if first.username else None, _db_of(first.path))
    if len(parts) > 1 or not schemes <= set(PLAIN_SCHEMES):
        raise RedisURLError(f"redis_url {mask(url)}: use redis://, rediss://, unix://, or a list of "
                            "sentinel:// URLs separated by ';'")
    s = urlsplit(parts[0])
    password = unquote(s.password) if s.password else settings.redis.password
    db = 0 if s.scheme == "unix" else _db_of(s.path)
    return Target(url, (), "", password, unquote(s.username) if s.username else None, db)


def url_with_password(settings: Settings) -> str:
    """``redis_url`` with ``redis.password`` written into each part that has none, as kombu and
    Flower read it from the URL. Secret: log it only through ``mask``."""
    password = settings.redis.password
    if not password:
        return settings.redis_url
    out = []
    for part in settings.redis_url.split(";"):
        s = urlsplit(part.strip())
        if s.password is None and s.hostname:
            netloc = f"{quote(s.username or '', safe='')}:{quote(password, safe='')}@{s.netloc}"
            part = urlunsplit(s._replace(netloc=netloc))
        out.append(part)
    return ";".join(out)


_retrying: contextvars.ContextVar[bool] = contextvars.ContextVar("llmq_redis_retrying", default=False)


class FailoverRetry(Retry):
    """Retries a command on ConnectionError and TimeoutError until ``wait_s`` has passed since its
    first failure. redis-py calls the same retry around a command and, inside it, around the
    connect: only the outer one retries, so the wait stays one wait, not one per level."""

    def __init__(self, wait_s: float):
        super().__init__(ExponentialBackoff(cap=0.5, base=0.05), retries=-1)
        self.wait_s = wait_s

    def call_with_retry(self, do: Callable[[], T], fail: Callable[[Exception], Any]) -> T:
        if _retrying.get():
            return do()
        token = _retrying.set(True)
        try:
            failures, deadline = 0, None
            while True:
                try:
                    return do()
                except self._supported_errors as error:
                    failures += 1
                    fail(error)
                    now = time.monotonic()
                    deadline = deadline or now + self.wait_s
                    if now >= deadline:
                        raise
                    time.sleep(min(self._backoff.compute(failures), deadline - now))
        finally:
            _retrying.reset(token)


class AsyncFailoverRetry(redis.asyncio.retry.Retry):
    """FailoverRetry for redis.asyncio clients."""

    def __init__(self, wait_s: float):
        super().__init__(ExponentialBackoff(cap=0.5, base=0.05), retries=-1)
        self.wait_s = wait_s

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[Any], Any]) -> T:
        import asyncio

        if _retrying.get():
            return await do()
        token = _retrying.set(True)
        try:
            failures, deadline = 0, None
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    failures += 1
                    await fail(error)
                    now = time.monotonic()
                    deadline = deadline or now + self.wait_s
                    if now >= deadline:
                        raise
                    await asyncio.sleep(min(self._backoff.compute(failures), deadline - now))
        finally:
            _retrying.reset(token)


def _kwargs(settings: Settings, target: Target, options: dict[str, Any], asynchronous: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(options)
    if target.is_sentinel:
        wait = settings.redis.failover_wait_s
        kwargs["retry"] = AsyncFailoverRetry(wait) if asynchronous else FailoverRetry(wait)
        kwargs["retry_on_error"] = [ConnectionError, TimeoutError]
        kwargs.setdefault("socket_connect_timeout", 2)
    return kwargs


def _sentinel_kwargs(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    # A dead Sentinel must cost a client little: it asks the next one.
    kwargs: dict[str, Any] = {"socket_timeout": 1, "socket_connect_timeout": 1}
    if settings.redis.sentinel_password:
        kwargs["password"] = settings.redis.sentinel_password
    return kwargs


def client(settings: Settings, **options: Any) -> redis.Redis:
    """A synchronous client for ``settings.redis_url``. ``options`` are redis-py's (socket
    timeouts, health_check_interval)."""
    target = parse(settings)
    kwargs = _kwargs(settings, target, options, asynchronous=False)
    if not target.is_sentinel:
        return redis.Redis.from_url(url_with_password(settings), **kwargs)
    sentinel = redis.sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(settings, options),
                                       password=target.password, username=target.username, db=target.db, **kwargs)
    return sentinel.master_for(target.master, redis_class=redis.Redis)


def async_client(settings: Settings, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client for ``settings.redis_url`` (the decode worker's event loop)."""
    target = parse(settings)
    kwargs = _kwargs(settings, target, options, asynchronous=True)
    if not target.is_sentinel:
        return redis.asyncio.Redis.from_url(url_with_password(settings), **kwargs)
    sentinel = redis.asyncio.sentinel.Sentinel(list(target.sentinels),
                                               sentinel_kwargs=_sentinel_kwargs(settings, options),
                                               password=target.password, username=target.username,
                                               db=target.db, **kwargs)
    return sentinel.master_for(target.master, redis_class=redis.asyncio.Redis)


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: ``redis_url`` with ``redis.password`` in it (kombu and Flower mask it
    when they show it)."""
    parse(settings)  # the same checks as the direct clients
    return url_with_password(settings)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's Sentinel transport needs on top of the URL; nothing for a plain URL."""
    if not parse(settings).is_sentinel:
        return {}
    return {"master_name": settings.redis.sentinel_master,
            "sentinel_kwargs": _sentinel_kwargs(settings, {})}


def dedicated(client: redis.Redis) -> redis.Redis:
    """A client with a connection pool of its own, to the same server (or Sentinel-watched
    master) with the same options, for a blocking read, which holds its connection. It does not
    retry: its caller learns of a lost connection at once (a failover may have lost entries)."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in ("connection_pool", "retry")}
        kwargs["retry_on_error"] = []
        return redis.Redis(connection_pool=redis.sentinel.SentinelConnectionPool(
            pool.service_name, pool.sentinel_manager, connection_class=pool.connection_class, **kwargs))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                            **pool.connection_kwargs))
