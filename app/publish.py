"""Publishing a generation task without Celery's client: the message Celery would write, added to
a Redis pipeline the caller executes.

Why: ``send_task`` cost the frontend about 1.7 ms a request on this machine, in Python (routing,
building the message through kombu's producer, its retry wrapper) and in two round trips, the
message's LPUSH and a ``task-sent`` event that only Flower's "sent" state reads (Flower lists the
task from the worker's ``task-received`` event, which carries the same argsrepr). Here the task is
one LPUSH queued on the pipeline that also opens the request's output stream (app/streams.py), so
a request costs the frontend one round trip to Redis before it waits for tokens
(docs/benchmarks.md, "Against vllm serve").

The message is Celery's protocol 2 as kombu's Redis transport stores it: a JSON envelope whose
body is the base64 of ``[args, kwargs, embed]``; tests/test_publish.py checks it field by field
against what ``send_task`` writes, so a Celery upgrade that changes it fails there.
``frontend.publish: celery`` goes back to ``send_task``.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

import msgspec

# Protocol 2's third element: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_JSON = msgspec.json.Encoder()


class TaskPublisher:
    """Adds Celery task messages to a Redis pipeline. One per process: ``origin`` and
    ``reply_to`` name the process, as Celery's do."""

    def __init__(self) -> None:
        self._pid = 0
        self._origin = ""
        self._reply_to = ""

    def _identity(self) -> tuple[str, str]:
        # gunicorn forks workers after building the app: each process names itself.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._origin = f"gen{self._pid}@{socket.gethostname()}"
            self._reply_to = str(uuid.uuid4())
        return self._origin, self._reply_to

    def add(self, pipe, queue: str, task: str, task_id: str, arg: dict, argsrepr: str, expires_s: float) -> None:
        """Queues the LPUSH of one task, whose only argument is ``arg``, on ``pipe``. The
        broker-side expiry is ``expires_s`` from now, as ``send_task(expires=...)`` sets it."""
        origin, reply_to = self._identity()
        expires = (datetime.now(UTC) + timedelta(seconds=expires_s)).isoformat()
        body = _JSON.encode([[arg], {}, _EMBED])
        message = {
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": expires,
                "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
                "root_id": task_id, "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": "{}",
                "origin": origin, "ignore_result": False, "replaced_task_nesting": 0,
                "stamped_headers": None, "stamps": {},
            },
            "properties": {
                "correlation_id": task_id, "reply_to": reply_to, "argsrepr": argsrepr, "delivery_mode": 2,
                "expiration": str(int(expires_s * 1000)),
                # Priority 0 goes on the queue's own list (kombu's _q_for_pri); the default
                # exchange routes by the queue's name.
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        }
        pipe.lpush(queue, _JSON.encode(message))
