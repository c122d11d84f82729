"""Starts and stops a router worker's runtime on Celery's worker signals (tasks/runtime.py,
``RoleLifecycle``, says when and why): the index is replayed before the worker consumes, and the
lease goes up once it does. workers/lifecycle.py does the same for the engine roles.
"""

from __future__ import annotations

import placement
from tasks import queues
from tasks.runtime import RoleLifecycle


def _build(settings, worker_id: str, role: str, queue_names: list[str]):
    from router.runtime import RouterRuntime

    return RouterRuntime(settings, worker_id, queue_names)


lifecycle = RoleLifecycle({queues.ROUTER_ROLE}, _build, after_start=placement.freeze_startup_heap)
