"""The runtime that serves this worker process's tasks: what the task bodies hand messages to.

tasks/ is the protocol that every role imports, so it imports no role. It names here what a
runtime offers the task bodies, and each role's lifecycle module sets the runtime it built:
workers/lifecycle.py for decode and prefill, router/lifecycle.py for the router. Celery imports
those modules from the app's ``include`` (tasks/celery_app.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from tasks.messages import GenerateRequest, PrefillRequest

logger = logging.getLogger(__name__)

# How a router hands a request on: the message, with its routing fields set, and the queue.
Forward = Callable[[GenerateRequest, str], None]


class Runtime(Protocol):
    def reject_malformed(self, payload: object, reason: str) -> None:
        """Tells the client its task could not be read (it waits on the request's stream)."""


class Generates(Runtime, Protocol):  # decode
    def serve(self, req: GenerateRequest) -> None: ...


class Prefills(Runtime, Protocol):  # prefill
    def serve_prefill(self, preq: PrefillRequest) -> None: ...


class Routes(Runtime, Protocol):  # router
    def route(self, req: GenerateRequest, forward: Forward) -> None: ...


_current: Runtime | None = None


def current_runtime() -> Runtime:
    if _current is None:
        raise RuntimeError("no worker runtime in this process: tasks run only inside `celery -A tasks worker`")
    return _current


def set_current_runtime(runtime: Runtime | None) -> None:
    global _current
    _current = runtime


def leave(message: str, *args) -> None:
    """Exits a worker that cannot serve, with the reason in the log. A lifecycle calls it from
    a Celery signal handler, whose exceptions Celery logs and swallows. os._exit, because a
    half-started engine's processes would hold up a normal exit; they watch this process and go
    with it."""
    logger.exception(message, *args)
    logging.shutdown()
    os._exit(1)
