"""Starts and stops an engine worker's runtime (decode or prefill) on Celery's worker signals. It
acts only for those roles; router/lifecycle.py does the same for the router.

``celeryd_after_setup`` fires once ``-Q`` is applied and logging is configured, and before the
worker starts consuming. So the role comes from the queues this worker consumes, the engine is
ready before the first task arrives, and its start-up is in the log. Under the thread pool this
runs in the worker's only process; no 4 s prefork limit applies.

``worker_ready`` fires once it consumes; only then does its lease go up, so the frontend's
liveness check and the router never see a worker that would just queue requests behind a cold
start, or one that a SIGTERM would kill before it could drop its lease.
"""

from __future__ import annotations

import logging

from celery import signals

import placement
from tasks import queues
from tasks.runtime import leave, set_current_runtime

logger = logging.getLogger(__name__)

_runtime = None  # the runtime this module started, in a decode or prefill worker only


@signals.celeryd_after_setup.connect
def _start_runtime(sender=None, instance=None, **_kwargs) -> None:
    global _runtime
    settings = instance.app.conf.llmq_settings
    queue_names = queues.role_queues(instance.app)
    try:
        role = queues.role_for(queue_names)
        if role not in queues.ENGINE_ROLES.values():
            return
        # Imported here: Flower imports this module too (the app's include) and loads no engine.
        from workers.runtime import WorkerRuntime

        runtime = WorkerRuntime.for_role(role)(settings, instance.hostname, queue_names)
        runtime.start()
    except Exception:
        # A worker without its engine must not start consuming.
        leave("worker %s failed to start", instance.hostname)
    _runtime = runtime
    set_current_runtime(runtime)
    placement.freeze_startup_heap()


@signals.worker_ready.connect
def _put_up_lease(**_kwargs) -> None:
    """The worker's lease goes up once Celery consumes, not as soon as the runtime has started:
    Celery installs its SIGTERM handler in between, and a worker stopped in that gap would die
    without dropping its lease, which would then name a dead worker for workers.lease_s."""
    if _runtime is None:
        return
    try:
        _runtime.heartbeat.start()
    except Exception:
        # Consuming with no lease, the worker would get no traffic and say nothing.
        leave("worker could not put up its lease")


@signals.worker_shutdown.connect
def _stop_runtime(**_kwargs) -> None:
    global _runtime
    if _runtime is None:
        return
    runtime, _runtime = _runtime, None
    set_current_runtime(None)
    runtime.stop()
