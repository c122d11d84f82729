"""Queue names and task routes: the one place that says which work goes where.

A worker's role follows from the queues it consumes (``role_for``): ``celery -A tasks worker -Q
decode`` runs an engine that serves generation, ``-Q prefill`` one that prefills for decode
workers, and ``-Q router`` a router.
"""

DECODE = "decode"
PREFILL = "prefill"
ROUTER = "router"

ALL_QUEUES = (DECODE, PREFILL, ROUTER)

# Roles that host a vLLM engine, by the queue that selects them.
ENGINE_ROLES = {DECODE: "decode", PREFILL: "prefill"}
ROUTER_ROLE = "router"

GENERATE_TASK = "tasks.generate"
ROUTE_TASK = "tasks.route"
PREFILL_TASK = "tasks.prefill"

TASK_ROUTES = {
    GENERATE_TASK: {"queue": DECODE},
    ROUTE_TASK: {"queue": ROUTER},
    PREFILL_TASK: {"queue": PREFILL},
}


def role_for(queue_names: list[str]) -> str:
    """The worker's role, from the queues it consumes. A worker hosts at most one engine."""
    roles = {ENGINE_ROLES[q] for q in queue_names if q in ENGINE_ROLES}
    if len(roles) > 1:
        raise ValueError(f"a worker hosts one engine; queues {sorted(queue_names)} ask for {sorted(roles)}")
    if roles:
        return roles.pop()
    if not set(queue_names) & set(ALL_QUEUES):
        raise ValueError(f"queues {sorted(queue_names)} name no role; known queues: {list(ALL_QUEUES)}")
    return ROUTER_ROLE


def role_queues(app) -> list[str]:
    """The queues a worker of ``app`` consumes, less the one of its own that worker_direct adds
    (named after the worker): the ones its role comes from."""
    return sorted(q for q in app.amqp.queues.consume_from if not q.endswith(".dq2"))


def worker_queue(worker_id: str):
    """The queue only this worker consumes (Celery's worker_direct), where the router sends."""
    from celery.utils.nodenames import worker_direct

    return worker_direct(worker_id)
