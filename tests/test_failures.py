"""Failures reach the client as errors, never as hangs, and the deployment recovers by itself.

This deployment has one decode worker. When it dies, its requests move to the launcher's
replacement (app/migration.py), waiting for it at most frontend.first_token_timeout_s.
"""

from __future__ import annotations

import threading
import time

import openai
import psutil
import pytest

from conftest import fresh_redis_url, live_status, make_settings, sigkill_worker, start_deployment, wait_for
from tasks import keys

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
MAX_TOKENS = 400
# How long a request waits for a worker to move to: long enough for the launcher to start a
# replacement engine on a loaded machine.
MOVE_WAIT_S = 150


@pytest.fixture(scope="module")
def fragile(model_path, tmp_path_factory):
    """A deployment of its own, since these tests kill its worker and its engine."""
    settings = make_settings(fresh_redis_url(), **{"frontend.first_token_timeout_s": MOVE_WAIT_S,
                                                   "frontend.request_timeout_s": 300})
    dep = start_deployment(settings, tmp_path_factory.mktemp("fragile"))
    yield dep
    dep.stop()


def _long_stream(dep):
    return dep.client(timeout=MOVE_WAIT_S + 60).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Go on forever."}], max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})


def _serving_worker(dep, not_pid: int | None = None):
    return wait_for(lambda: next((w for w in live_status(dep) if w.pid != not_pid), None), timeout_s=240,
                    what="a live decode worker")


def _read_stream(stream, timeout_s: float) -> tuple[int, object, Exception | None]:
    """Reads the stream to its end: the completion tokens its usage chunk reports, the chunks'
    text, and the error it ended with, if any."""
    started, usage, text = time.monotonic(), None, ""
    try:
        for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
            assert time.monotonic() - started < timeout_s, "stream neither finished nor failed in time"
    except openai.APIError as e:
        return 0, text, e
    return (usage.completion_tokens if usage else 0), text, None


def test_a_stream_whose_worker_is_killed_goes_on_on_its_replacement(fragile):
    worker = _serving_worker(fragile)
    stream = _long_stream(fragile)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    sigkill_worker(worker.pid)
    # Its lease lapses (workers.lease_s), the request waits for the launcher's replacement, and
    # goes on there: no error event, every token once.
    completion_tokens, _, error = _read_stream(stream, timeout_s=MOVE_WAIT_S + 60)
    assert error is None, f"the stream must go on on the replacement: {error}"
    assert completion_tokens == MAX_TOKENS
    assert _serving_worker(fragile).pid != worker.pid
    assert "(worker_lost) after" in fragile.log()


def test_dead_engine_moves_the_request_and_the_worker_restarts(fragile):
    worker = _serving_worker(fragile)
    engine = next(p for p in psutil.Process(worker.pid).children(recursive=True)
                  if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name())
    stream = _long_stream(fragile)
    next(iter(stream))
    engine.kill()
    # The worker reports its engine dead and shuts itself down; the launcher restarts it, and the
    # request moves there.
    completion_tokens, _, error = _read_stream(stream, timeout_s=MOVE_WAIT_S + 60)
    assert error is None, f"the stream must go on on the restarted worker: {error}"
    assert completion_tokens == MAX_TOKENS
    revived = _serving_worker(fragile, not_pid=worker.pid)
    assert revived.pid != worker.pid
    assert "(engine_died) after" in fragile.log()
    out = fragile.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_a_non_streaming_request_to_a_dying_worker_moves_too(fragile):
    worker = _serving_worker(fragile)
    client = fragile.client(timeout=MOVE_WAIT_S + 60)
    result: dict = {}

    def call():
        try:
            result["raw"] = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Go on."}], max_tokens=MAX_TOKENS,
                extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "dying"})
        except openai.APIStatusError as e:
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    def generating() -> bool:  # its stream holds Accepted and some tokens
        streams = list(fragile.redis.scan_iter(match=keys.output_stream("dying-*")))
        return bool(streams) and fragile.redis.xlen(streams[0]) >= 5

    wait_for(generating, 30, "the request to be generating", interval_s=0.02)
    sigkill_worker(worker.pid)
    t.join(timeout=MOVE_WAIT_S + 60)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    raw = result["raw"]
    assert raw.parse().usage.completion_tokens == MAX_TOKENS
    assert raw.headers["x-migrations"] == "1"

