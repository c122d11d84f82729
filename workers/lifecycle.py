"""Starts and stops the worker runtime on Celery's worker signals.

``worker_init`` fires after ``-Q`` is parsed and before the consumer starts, so the role comes
from the queues this worker consumes, and the engine is ready before the first task arrives.
Under the thread pool this runs in the worker's only process; no 4 s prefork limit applies.
"""

from __future__ import annotations

import logging
import sys

from celery import signals

from tasks import queues

logger = logging.getLogger(__name__)


def role_for(queue_names: list[str]) -> str:
    """The worker's role, from the queues it consumes. A worker hosts at most one engine."""
    roles = {queues.ENGINE_ROLES[q] for q in queue_names if q in queues.ENGINE_ROLES}
    if len(roles) > 1:
        raise ValueError(f"a worker hosts one engine; queues {sorted(queue_names)} ask for {sorted(roles)}")
    if roles:
        return roles.pop()
    if not set(queue_names) & set(queues.ALL_QUEUES):
        raise ValueError(f"queues {sorted(queue_names)} name no role; known queues: {list(queues.ALL_QUEUES)}")
    return "router"


@signals.worker_init.connect
def _start_runtime(sender=None, **_kwargs) -> None:
    from workers.runtime import WorkerRuntime, set_current_runtime

    settings = sender.app.conf.llmq_settings
    queue_names = sorted(sender.app.amqp.queues.consume_from)
    try:
        role = role_for(queue_names)
        if role == "router":
            return  # routing arrives with the KV-routing work; it needs no engine
        runtime = WorkerRuntime(settings, sender.hostname, role, queue_names)
        runtime.start()
    except Exception:
        # Celery logs and swallows exceptions from signal handlers; a worker without its
        # engine must not start consuming, so leave now with the reason in the log.
        logger.exception("worker %s failed to start", sender.hostname)
        sys.exit(1)
    set_current_runtime(runtime)


@signals.worker_shutdown.connect
def _stop_runtime(**_kwargs) -> None:
    from workers.runtime import current_runtime, set_current_runtime

    try:
        runtime = current_runtime()
    except RuntimeError:
        return
    set_current_runtime(None)
    runtime.stop()
