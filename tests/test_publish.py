"""The frontend's direct task publish (app/publish.py) against Celery's send_task, on a real
Redis: the same message, field by field, and one round trip for a task and its stream's wake-up.
No engine, no gunicorn."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime

import redis

from app.publish import TaskPublisher
from app.streams import StreamReader
from config import load_settings
from conftest import ROOT
from tasks import keys
from tasks.celery_app import make_celery
from tasks.messages import (
    Delta,
    GenerateRequest,
    SamplingSpec,
    decode_event,
    encode_event,
    request_to_task_arg,
    task_argsrepr,
)

QUEUE = "test-publish"
# Per message or per process: compared by shape, not value.
VARYING = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin"), ("headers", "expires")}


def _fields(message: dict) -> dict[tuple[str, str], object]:
    return {(part, k): v for part in ("headers", "properties") for k, v in message[part].items()}


def test_direct_publish_writes_the_message_send_task_writes(scratch_redis_url):
    settings = load_settings(ROOT / "configs/agg.yaml", [f"redis_url={scratch_redis_url}"], environ={})
    client = redis.Redis.from_url(scratch_redis_url)
    msg = GenerateRequest(request_id="pub-1", prompt_token_ids=[5, 6, 7], sampling=SamplingSpec(max_tokens=4),
                          deadline_unix=time.time() + 60)
    arg, argsrepr = request_to_task_arg(msg), task_argsrepr(msg)
    client.delete(QUEUE)
    make_celery(settings).send_task("tasks.generate", args=[arg], argsrepr=argsrepr, task_id=msg.request_id,
                                    expires=30.0, queue=QUEUE)
    pipe = client.pipeline(transaction=False)
    TaskPublisher().add(pipe, QUEUE, "tasks.generate", msg.request_id, arg, argsrepr, expires_s=30.0)
    pipe.execute()
    ours, celerys = (json.loads(client.rpop(QUEUE)) for _ in range(2))  # LPUSH: the oldest is last

    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(celerys["body"]))
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties", "body")} == \
        {k: v for k, v in celerys.items() if k not in ("headers", "properties", "body")}
    theirs = _fields(celerys)
    assert _fields(ours).keys() == theirs.keys()
    assert {k: v for k, v in _fields(ours).items() if k not in VARYING} == \
        {k: v for k, v in theirs.items() if k not in VARYING}
    expires = [datetime.fromisoformat(m["headers"]["expires"]) for m in (ours, celerys)]
    assert abs((expires[0] - expires[1]).total_seconds()) < 5
    assert ours["headers"]["origin"].split("@")[1] == celerys["headers"]["origin"].split("@")[1]


def test_a_stream_opened_on_the_publish_pipeline_is_read_from_its_first_entry(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    reader = StreamReader(client)
    reader.open([keys.output_stream("warm")])  # the reader's XREAD is blocked when the next opens
    pipe = client.pipeline(transaction=False)
    q = reader.open([keys.output_stream("pub-2")], pipe=pipe)
    # A worker that answers before the pipeline runs: its entry is still read.
    client.xadd(keys.output_stream("pub-2"), {"m": encode_event(Delta(index=0, text="t1", token_ids=[1]))})
    pipe.lpush(QUEUE, b"task")
    pipe.execute()
    key, entries = q.get(timeout=10)
    assert key == keys.output_stream("pub-2")
    assert [decode_event(f[b"m"]).text for _, f in entries] == ["t1"]
    reader.close([keys.output_stream("pub-2"), keys.output_stream("warm")])
