"""The runtime that serves this worker process's tasks: what the task bodies hand messages to.

tasks/ is the protocol that every role imports, so it imports no role. It names here what a
runtime offers the task bodies, and each role's lifecycle module sets the runtime it built:
workers/lifecycle.py for decode and prefill, router/lifecycle.py for the router. Celery imports
those modules from the app's ``include`` (tasks/celery_app.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from typing import Any, Protocol

from celery import signals

from tasks import queues
from tasks.messages import GenerateRequest, PrefillRequest

logger = logging.getLogger(__name__)

# How a router hands a request on: the message, with its routing fields set, and the queue.
Forward = Callable[[GenerateRequest, str], None]


class Runtime(Protocol):
    heartbeat: Any  # the worker's lease: started once Celery consumes, stopped with the runtime

    def start(self) -> None: ...

    def stop(self) -> None: ...

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


# Builds a role's runtime: (settings, worker id, role, queue names) -> an unstarted Runtime.
Build = Callable[[Any, str, str, list[str]], Runtime]


class RoleLifecycle:
    """Starts and stops the runtime of the roles it is made for on Celery's worker signals; in a
    worker of any other role, and in Flower, it does nothing.

    ``celeryd_after_setup`` fires once ``-Q`` is applied and logging is configured, and before the
    worker consumes: the role comes from the queues, the runtime (an engine, or a router's index)
    is ready before the first task arrives, and its start-up is in the log. Under the thread pool
    this runs in the worker's only process; no 4 s prefork limit applies.

    ``worker_ready`` fires once it consumes, and only then does the lease go up: the frontend's
    liveness check and the router never see a worker that would queue requests behind a cold
    start, and Celery has installed its SIGTERM handler, so a worker stopped at once still drops
    its lease rather than name a dead worker for workers.lease_s.
    """

    def __init__(self, roles: Collection[str], build: Build, after_start: Callable[[], None] = lambda: None):
        self.roles = roles
        self.build = build
        self.after_start = after_start
        self.runtime: Runtime | None = None
        # Celery keys a bound method's connection by its function alone, so each lifecycle names
        # its own: without a uid the second lifecycle's handlers would replace the first's.
        uid = "llmq-lifecycle-" + "-".join(sorted(roles))
        signals.celeryd_after_setup.connect(self._start, weak=False, dispatch_uid=uid + "-start")
        signals.worker_ready.connect(self._put_up_lease, weak=False, dispatch_uid=uid + "-ready")
        signals.worker_shutdown.connect(self._stop, weak=False, dispatch_uid=uid + "-stop")

    def _start(self, sender=None, instance=None, **_kwargs) -> None:
        queue_names = queues.role_queues(instance.app)
        try:
            role = queues.role_for(queue_names)
            if role not in self.roles:
                return
            runtime = self.build(instance.app.conf.llmq_settings, instance.hostname, role, queue_names)
            runtime.start()
        except Exception:
            # A worker without its engine or index must not start consuming.
            leave("worker %s failed to start", instance.hostname)
        self.runtime = runtime
        set_current_runtime(runtime)
        self.after_start()

    def _put_up_lease(self, **_kwargs) -> None:
        if self.runtime is None:
            return
        try:
            self.runtime.heartbeat.start()
        except Exception:
            # Consuming with no lease, the worker would get no traffic and say nothing.
            leave("worker could not put up its lease")

    def _stop(self, **_kwargs) -> None:
        if self.runtime is None:
            return
        runtime, self.runtime = self.runtime, None
        set_current_runtime(None)
        runtime.stop()
