"""Starts and stops the worker runtime on Celery's worker signals.

``celeryd_after_setup`` fires once ``-Q`` is applied and logging is configured, and before the
worker starts consuming. So the role comes from the queues this worker consumes, the engine is
ready before the first task arrives, and its start-up is in the log. Under the thread pool this
runs in the worker's only process; no 4 s prefork limit applies.

``worker_ready`` fires once it consumes; only then does its lease go up, so the frontend's
liveness check and the router never see a worker that would just queue requests behind a cold
start, or one that a SIGTERM would kill before it could drop its lease.
"""

from __future__ import annotations

import gc
import logging
import os

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


@signals.celeryd_after_setup.connect
def _start_runtime(sender=None, instance=None, **_kwargs) -> None:
    from workers.runtime import RouterRuntime, WorkerRuntime, set_current_runtime

    settings = instance.app.conf.llmq_settings
    # worker_direct adds a queue of the worker's own, named after it; the role comes from the rest.
    queue_names = sorted(q for q in instance.app.amqp.queues.consume_from if not q.endswith(".dq2"))
    try:
        role = role_for(queue_names)
        if role == "router":
            runtime = RouterRuntime(settings, instance.hostname, queue_names)
        else:
            runtime = WorkerRuntime.for_role(role)(settings, instance.hostname, queue_names)
        runtime.start()
    except Exception:
        # A worker without its engine must not start consuming.
        _leave("worker %s failed to start", instance.hostname)
    set_current_runtime(runtime)
    freeze_startup_heap()


@signals.worker_ready.connect
def _put_up_lease(**_kwargs) -> None:
    """The worker's lease goes up once Celery consumes, not as soon as the runtime has started:
    Celery installs its SIGTERM handler in between, and a worker stopped in that gap died without
    dropping its lease, which then named a dead worker for workers.lease_s (seen in CI)."""
    from workers.runtime import current_runtime

    try:
        current_runtime().heartbeat.start()
    except Exception:
        # Consuming with no lease, the worker would get no traffic and say nothing.
        _leave("worker could not put up its lease")


def _leave(message: str, *args) -> None:
    """Celery logs and swallows exceptions from signal handlers, so leave now with the reason in
    the log. os._exit, because a half-started engine's processes would hold up a normal exit;
    they watch this process and go with it."""
    logger.exception(message, *args)
    logging.shutdown()
    os._exit(1)


def freeze_startup_heap() -> None:
    """Takes what start-up built (torch, vLLM, Celery: some 640,000 objects in a decode worker)
    out of the garbage collector's reach, as vLLM's own server does once it is up. A full
    collection of that heap took 0.36-0.40 s here, a pause for every stream on the worker; frozen,
    the collector walks only what serving allocates."""
    gc.collect()
    gc.freeze()


@signals.worker_shutdown.connect
def _stop_runtime(**_kwargs) -> None:
    from workers.runtime import current_runtime, set_current_runtime

    try:
        runtime = current_runtime()
    except RuntimeError:
        return
    set_current_runtime(None)
    runtime.stop()
