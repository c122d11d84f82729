"""Starts and stops an engine worker's runtime (decode or prefill) on Celery's worker signals
(tasks/runtime.py, ``RoleLifecycle``, says when and why). router/lifecycle.py does the same for
the router. Celery imports this module from the app's ``include``, in workers and in Flower alike,
so the engine's modules are imported only once a worker of an engine role starts.
"""

from __future__ import annotations

import placement
from tasks import queues
from tasks.runtime import RoleLifecycle


def _build(settings, worker_id: str, role: str, queue_names: list[str]):
    from workers.runtime import WorkerRuntime

    return WorkerRuntime.for_role(role)(settings, worker_id, queue_names)


lifecycle = RoleLifecycle(set(queues.ENGINE_ROLES.values()), _build, after_start=placement.freeze_startup_heap)
