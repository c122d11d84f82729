"""Queue names and task routes: the one place that says which work goes where.

Workers pick their role with ``-Q``: ``celery -A tasks worker -Q decode`` runs an engine that
serves generation; later roles (``router``, ``prefill``) take their own queues.
"""

DECODE = "decode"
PREFILL = "prefill"
ROUTER = "router"

ALL_QUEUES = (DECODE, PREFILL, ROUTER)

# Roles that host a vLLM engine, by the queue that selects them.
ENGINE_ROLES = {DECODE: "decode", PREFILL: "prefill"}

GENERATE_TASK = "tasks.generate"
ROUTE_TASK = "tasks.route"
PREFILL_TASK = "tasks.prefill"

TASK_ROUTES = {
    GENERATE_TASK: {"queue": DECODE},
    ROUTE_TASK: {"queue": ROUTER},
    PREFILL_TASK: {"queue": PREFILL},
}


def worker_queue(worker_id: str):
    """The queue only this worker consumes (Celery's worker_direct), where the router sends."""
    from celery.utils.nodenames import worker_direct

    return worker_direct(worker_id)
