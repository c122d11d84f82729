"""The Celery application. Routes and queues are data (tasks/queues.py); workers pick with -Q."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from config import Settings
from tasks import queues
from tasks.consuming import ConsumingStep

# The roles' lifecycle modules: each builds its role's runtime on the worker's signals (and only
# for its role) and sets it in tasks/runtime.py. Celery's loader imports them by name where it
# loads the app's modules, in a worker and in Flower, so tasks/ itself never imports a role.
# They import nothing heavy at module level: in Flower their signals never fire.
ROLE_LIFECYCLES = ("workers.lifecycle", "router.lifecycle")


def make_celery(settings: Settings) -> Celery:
    app = Celery("llmq", broker=settings.redis_url, set_as_current=False, include=ROLE_LIFECYCLES)
    app.conf.update(
        task_queues=[Queue(name) for name in queues.ALL_QUEUES],
        task_default_queue=queues.DECODE,
        task_routes=queues.TASK_ROUTES,
        # Plain JSON on the wire: readable in Flower, and no pickle.
        task_serializer="json",
        accept_content=["json"],
        # Results travel over per-request Redis Streams, not Celery's result backend.
        task_ignore_result=True,
        # The (disabled) result backend holds no state, so one per process is right. Celery's
        # default is one per thread, and building one scans every installed package's entry
        # points, which is slow with vLLM's dependencies: each frontend thread would pay it in its
        # first request. Gateway.prepare builds the one before gunicorn forks.
        result_backend_thread_safe=True,
        # A generation task spends its life waiting on the engine's event loop, so many run as
        # threads in one process around one engine (see workers/engine.py). Prefork would give
        # each child its own engine, and its 4 s worker_process_init limit is shorter than an
        # engine's start.
        worker_pool="threads",
        worker_concurrency=settings.workers.concurrency,
        # Take one message per free thread, so an idle worker elsewhere can get the rest.
        worker_prefetch_multiplier=1,
        # Each worker also consumes a queue of its own, so a router can pick the worker.
        worker_direct=True,
        # Flower shows tasks only when workers send events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # send_task: one retry re-opens a pooled connection that a restarted Redis closed; while
        # Redis is down, more retries (Celery's default is 3, over about 0.6 s) only delay the
        # client's 503. A worker's consumer reconnects by itself, with kombu's intervals (2 s,
        # then 4 s more, ...; broker_connection_max_retries, 100, bounds the attempts).
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.2},
        broker_transport_options={"socket_timeout": 10, "socket_connect_timeout": 5},
        llmq_settings=settings,
    )
    # Follows whether the consumer consumes, across broker reconnects: a worker holds its lease
    # only while it does (tasks/consuming.py).
    app.steps["consumer"].add(ConsumingStep)
    return app
