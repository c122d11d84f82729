"""The Celery application. Routes and queues are data (tasks/queues.py); workers pick with -Q."""

from __future__ import annotations

import logging

from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Queue
from kombu.exceptions import OperationalError

from config import Settings
from tasks import queues, redis_conn
from tasks.consuming import ConsumingStep

# The roles' lifecycle modules: each builds its role's runtime on the worker's signals (and only
# for its role) and sets it in tasks/runtime.py. Celery's loader imports them by name where it
# loads the app's modules, in a worker and in Flower, so tasks/ itself never imports a role.
# They import nothing heavy at module level: in Flower their signals never fire.
ROLE_LIFECYCLES = ("workers.lifecycle", "router.lifecycle")

logger = logging.getLogger(__name__)


def visibility_timeout_s(settings: Settings) -> int:
    """How long an unacked message stays with the worker that took it before the broker gives it
    to another: past the task's expiry (see make_celery's delivery notes)."""
    return int(settings.frontend.first_token_timeout_s) + 60


class FailoverConsumer(Consumer):
    """Celery's consumer, reconnecting faster after a Sentinel failover. Celery retries a lost
    broker connection after 2 s, then 4 s more, ...: right for a Redis that is down, but a
    failover is over within redis.failover_wait_s, and each second the consumer spends waiting
    the worker has no lease (tasks/consuming.py) and takes no request. So it first tries every
    quarter second for that long, then falls back to Celery's schedule."""

    def ensure_connected(self, conn):
        settings = self.app.conf.llmq_settings
        if self.first_connection_attempt or not redis_conn.parse(settings).is_sentinel:
            return super().ensure_connected(conn)
        step = 0.25
        try:
            return conn.ensure_connection(max_retries=max(1, int(settings.redis.failover_wait_s / step)),
                                          interval_start=step, interval_step=0, interval_max=step)
        except conn.connection_errors + (OperationalError,) as e:
            logger.warning("broker not back after a failover's wait (%s); retrying on Celery's schedule", e)
            return super().ensure_connected(conn)


def publish_retry_policy(settings: Settings) -> dict:
    if not redis_conn.parse(settings).is_sentinel:
        return {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    step = 0.25
    return {"max_retries": max(1, int(settings.redis.failover_wait_s / step)), "interval_start": 0,
            "interval_step": step, "interval_max": step}


def make_celery(settings: Settings) -> Celery:
    app = Celery("llmq", broker=redis_conn.broker_url(settings), set_as_current=False, include=ROLE_LIFECYCLES)
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
        worker_concurrency=settings.worker_concurrency,
        # Delivery, on purpose: every queue (decode and the workers' own: generate; router:
        # route; prefill: prefill) is delivered at most once by the broker, and the frontend owns
        # retries (app/migration.py).
        # - Acks early: a message is acked when its task starts, so the broker never runs a
        #   started generation again: a second run would stream tokens the client already has.
        #   When a worker dies, the frontend sees its lease go and resubmits the request with the
        #   tokens so far, under a new id; the dead attempt's cancel flag is set, so a copy of it
        #   found later is dropped unrun (workers/decode.py).
        # - Not silently dropped: a message a dead worker had taken but not started goes back to
        #   its queue only after the visibility timeout, or never (one that Redis handed to a
        #   BRPOP whose reply the worker did not read before it died), so the frontend waits for
        #   neither. It resubmits a request no live worker has accepted (its stream has no Accepted)
        #   as soon as the worker that may hold it loses its lease; a decode worker accepts a
        #   request by claiming its id atomically (SET NX, with Accepted in the same Lua script),
        #   so the copy that comes second is dropped before anything reaches the client. A lost
        #   prefill costs time, not the request: the decode worker prefills locally on its
        #   deadline, and a push prefill is claimed once (tasks/keys.py, prefill_claim).
        # - The visibility timeout outlasts the expiry of what the frontend sends
        #   (expires=first_token_timeout_s): such a message restored from a dead worker has
        #   expired by then, and is discarded. One the router forwarded has no expiry; the cancel
        #   flag or the claim drops it.
        # - task_reject_on_worker_lost applies to acks-late tasks only; it stays off.
        # - Take one message per free thread, so an idle worker elsewhere can get the rest, and
        #   a worker that dies holds as few unstarted messages as possible.
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # Each worker also consumes a queue of its own, so a router can pick the worker.
        worker_direct=True,
        # Flower shows tasks only when workers send events; nothing else reads them, and each
        # costs the sender about 0.1 ms of Python (three a request on a decode worker), so they
        # are sent only where the deployment has a Flower (flower.enabled, the default).
        worker_send_task_events=settings.flower.enabled,
        task_send_sent_event=settings.flower.enabled,
        broker_connection_retry_on_startup=True,
        worker_consumer="tasks.celery_app:FailoverConsumer",
        # send_task: one retry re-opens a pooled connection that a restarted Redis closed; while
        # Redis is down, more retries (Celery's default is 3, over about 0.6 s) only delay the
        # client's 503. A worker's consumer reconnects by itself, with kombu's intervals (2 s,
        # then 4 s more, ...; broker_connection_max_retries, 100, bounds the attempts).
        # With Sentinels, a send retries for redis.failover_wait_s instead: a failover ends by
        # itself within it, and kombu's Sentinel transport finds the new master on reconnect.
        task_publish_retry_policy=publish_retry_policy(settings),
        broker_transport_options={"socket_timeout": 10, "socket_connect_timeout": 5,
                                  "visibility_timeout": visibility_timeout_s(settings),
                                  **redis_conn.broker_transport_options(settings)},
        llmq_settings=settings,
    )
    # Follows whether the consumer consumes, across broker reconnects: a worker holds its lease
    # only while it does (tasks/consuming.py).
    app.steps["consumer"].add(ConsumingStep)
    return app
