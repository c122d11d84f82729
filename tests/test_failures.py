"""Failures reach the client as errors, never as hangs, and the deployment recovers by itself."""

from __future__ import annotations

import os
import signal
import time

import openai
import psutil
import pytest

from conftest import fresh_redis_url, live_status, make_settings, start_deployment, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def fragile(model_path, tmp_path_factory):
    """A deployment of its own, since these tests kill its worker and its engine."""
    settings = make_settings(fresh_redis_url())
    dep = start_deployment(settings, tmp_path_factory.mktemp("fragile"))
    yield dep
    dep.stop()


def _long_stream(dep):
    return dep.client(timeout=60).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Go on forever."}], max_tokens=1500, stream=True,
        extra_body={"ignore_eos": True})


def _serving_worker(dep, not_pid: int | None = None):
    return wait_for(lambda: next((w for w in live_status(dep) if w.pid != not_pid), None), timeout_s=120,
                    what="a live decode worker")


def _stream_until_error(stream, timeout_s: float) -> tuple[int, Exception | None]:
    """Reads chunks until the stream ends; returns how many arrived and the error it ended with."""
    started, num = time.monotonic(), 0
    try:
        for _ in stream:
            num += 1
            assert time.monotonic() - started < timeout_s, "stream neither finished nor failed in time"
    except openai.APIError as e:
        return num, e
    return num, None


def test_killed_worker_gives_an_error_not_a_hang(fragile):
    worker = _serving_worker(fragile)
    stream = _long_stream(fragile)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, error = _stream_until_error(stream, timeout_s=30)
    assert error is not None, "the stream must end with an error when its worker dies"
    assert "lost" in str(error)
    # Noticed within the lease, not at some far time-out.
    assert time.monotonic() - killed_at < fragile.settings.workers.lease_s + 5


def test_dead_engine_fails_the_request_and_the_worker_restarts(fragile):
    worker = _serving_worker(fragile)
    engine = next(p for p in psutil.Process(worker.pid).children(recursive=True)
                  if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name())
    stream = _long_stream(fragile)
    next(iter(stream))
    engine.kill()
    _, error = _stream_until_error(stream, timeout_s=30)
    assert error is not None
    # The launcher restarts the worker that shut itself down; service resumes with no operator.
    revived = _serving_worker(fragile, not_pid=worker.pid)
    assert revived.pid != worker.pid
    out = fragile.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_non_streaming_request_to_a_dying_worker_gets_503(fragile):
    import threading

    worker = _serving_worker(fragile)
    client = fragile.client(timeout=60)
    result: dict = {}

    def call():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                           max_tokens=1500, extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            result["status"] = e.status_code
        else:
            result["status"] = 200

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: live_status(fragile)[0].num_running >= 1 if live_status(fragile) else False, 30,
             "the request to start running", interval_s=0.05)
    os.kill(worker.pid, signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive()
    assert result["status"] == 503
