"""Generation tasks. Thin by design: decode the message, hand it to the worker runtime."""

from __future__ import annotations

import logging

from tasks import app
from tasks.messages import WireVersionError, prefill_from_task_arg, request_from_task_arg
from tasks.queues import GENERATE_TASK, PREFILL_TASK, ROUTE_TASK

logger = logging.getLogger(__name__)


@app.task(name=GENERATE_TASK, ignore_result=True)
def generate(payload: dict) -> None:
    from workers.runtime import current_runtime

    runtime = current_runtime()
    try:
        req = request_from_task_arg(payload)
    except (WireVersionError, ValueError) as e:
        runtime.reject_malformed(payload, str(e))
        return
    runtime.serve(req)


@app.task(name=ROUTE_TASK, ignore_result=True)
def route(payload: dict) -> None:
    """Picks a decode worker, then sends the generation task to that worker's own queue. It
    forwards rather than answers, so no task ever waits on another."""
    from workers.runtime import current_runtime

    runtime = current_runtime()
    try:
        req = request_from_task_arg(payload)
    except (WireVersionError, ValueError) as e:
        runtime.reject_malformed(payload, str(e))
        return
    runtime.route(req, payload, lambda body, queue: generate.apply_async(args=[body], queue=queue))


@app.task(name=PREFILL_TASK, ignore_result=True)
def prefill(payload: dict) -> None:
    """Runs a remote prefill for a decode worker, which waits for it on Redis pub/sub."""
    from workers.runtime import current_runtime

    runtime = current_runtime()
    try:
        preq = prefill_from_task_arg(payload)
    except (WireVersionError, ValueError) as e:
        logger.error("malformed prefill task: %s", e)  # its decode worker falls back on its deadline
        return
    runtime.serve_prefill(preq)
