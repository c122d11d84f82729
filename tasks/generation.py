"""The tasks. Thin by design: decode the message, hand it to this worker's runtime.

Runtimes are plain classes of the roles (workers/, router/), set in tasks/runtime.py when the
worker starts; the task bodies only pick the method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tasks import app
from tasks.messages import (
    GenerateRequest,
    WireVersionError,
    prefill_from_task_arg,
    request_from_task_arg,
    request_to_task_arg,
    task_argsrepr,
)
from tasks.queues import GENERATE_TASK, PREFILL_TASK, ROUTE_TASK
from tasks.runtime import current_runtime

logger = logging.getLogger(__name__)


def _dispatch(payload: dict, parse: Callable, handle: Callable, tell_client: bool = True) -> None:
    runtime = current_runtime()
    try:
        message = parse(payload)
    except (WireVersionError, ValueError) as e:
        if tell_client:
            runtime.reject_malformed(payload, str(e))
        else:
            logger.error("malformed task: %s", e)
        return
    handle(runtime, message)


@app.task(name=GENERATE_TASK, ignore_result=True)
def generate(payload: dict) -> None:
    _dispatch(payload, request_from_task_arg, lambda runtime, req: runtime.serve(req))


def _forward(req: GenerateRequest, queue: str) -> None:
    generate.apply_async(args=[request_to_task_arg(req)], queue=queue, argsrepr=task_argsrepr(req))


@app.task(name=ROUTE_TASK, ignore_result=True)
def route(payload: dict) -> None:
    """Picks a decode worker, then sends the generation task to that worker's own queue. It
    forwards rather than answers, so no task ever waits on another."""
    _dispatch(payload, request_from_task_arg, lambda runtime, req: runtime.route(req, _forward))


@app.task(name=PREFILL_TASK, ignore_result=True)
def prefill(payload: dict) -> None:
    """Runs a remote prefill for a decode worker, which waits for it on Redis pub/sub (and
    falls back to a local prefill on its deadline, so a malformed task only costs time)."""
    _dispatch(payload, prefill_from_task_arg, lambda runtime, preq: runtime.serve_prefill(preq), tell_client=False)
