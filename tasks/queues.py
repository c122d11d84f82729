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

TASK_ROUTES = {
    GENERATE_TASK: {"queue": DECODE},
}
