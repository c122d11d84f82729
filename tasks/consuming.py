"""Whether this worker's Celery consumer is consuming its queues right now.

A worker's lease must mean "tasks sent to this worker are taken", not merely "its heartbeat wrote": after
a broker outage the heartbeat thread reaches a restarted Redis at once, while Celery's consumer
reconnects on its own schedule (kombu retries after 2 s, then 4 s more, ...). A lease put back in
between would let the frontend answer /health "ok" and send tasks to queues that nobody reads,
whose bindings a restarted Redis with no data does not even hold yet.

Celery offers no signal for it: ``worker_ready`` fires once, at the first start. But the consumer
is a blueprint of boot steps that Celery starts again after every reconnect and stops on every
connection loss, so one more step, started after the ``Tasks`` step (which declares the queues
and their bindings and builds the task consumer) and stopped with it, follows the consumer's
state. ``make_celery`` adds it to every app.

Outside a Celery worker (the frontend, a test that builds a runtime by hand) there is no consumer
to wait for: ``consuming`` is true until a consumer has said otherwise.
"""

from __future__ import annotations

import logging
import threading

from celery import bootsteps

logger = logging.getLogger(__name__)

_state_lock = threading.Lock()
_consuming: bool | None = None  # None: no consumer in this process has started yet


def consuming() -> bool:
    """False only while this process's Celery consumer is down (connecting, or reconnecting)."""
    return _consuming is not False


def _set(value: bool) -> None:
    global _consuming
    with _state_lock:
        was, _consuming = _consuming, value
    if was is not None and was != value:
        logger.warning("Celery consumer %s", "consuming again" if value else "stopped consuming (broker lost?)")


class ConsumingStep(bootsteps.StartStopStep):
    """A consumer boot step that only records the consumer's state (see the module's doc)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c) -> None:
        _set(True)

    def stop(self, c) -> None:
        # The consumer's blueprint is stopped by a restart after a connection loss (its state
        # still RUN) and by the worker's shutdown (CLOSE). Only the first means "not consuming":
        # a worker in a warm shutdown keeps its lease while its requests finish, and drops it at
        # worker_shutdown (tasks/runtime.py).
        if c.blueprint.state == bootsteps.RUN:
            _set(False)
