"""Starts and stops a router worker's runtime on Celery's worker signals. It acts only for the
router role; workers/lifecycle.py does the same for the engine roles.

The timing is the engine workers' (see workers/lifecycle.py): the index is replayed at
``celeryd_after_setup``, before the worker consumes, and the lease goes up at ``worker_ready``.
"""

from __future__ import annotations

from celery import signals

import placement
from tasks import queues
from tasks.runtime import leave, set_current_runtime

_runtime = None  # the runtime this module started, in a router worker only


@signals.celeryd_after_setup.connect
def _start_runtime(sender=None, instance=None, **_kwargs) -> None:
    global _runtime
    queue_names = queues.role_queues(instance.app)
    try:
        if queues.role_for(queue_names) != queues.ROUTER_ROLE:
            return
        # Imported here: Flower imports this module too (the app's include) and runs no router.
        from router.runtime import RouterRuntime

        runtime = RouterRuntime(instance.app.conf.llmq_settings, instance.hostname, queue_names)
        runtime.start()
    except Exception:
        # A router without its index must not start consuming.
        leave("worker %s failed to start", instance.hostname)
    _runtime = runtime
    set_current_runtime(runtime)
    placement.freeze_startup_heap()


@signals.worker_ready.connect
def _put_up_lease(**_kwargs) -> None:
    """The lease goes up once Celery consumes: see workers/lifecycle.py."""
    if _runtime is None:
        return
    try:
        _runtime.heartbeat.start()
    except Exception:
        leave("worker could not put up its lease")


@signals.worker_shutdown.connect
def _stop_runtime(**_kwargs) -> None:
    global _runtime
    if _runtime is None:
        return
    runtime, _runtime = _runtime, None
    set_current_runtime(None)
    runtime.stop()
