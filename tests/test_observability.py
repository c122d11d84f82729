"""Prometheus metrics from every role, and one request id through every log line about it."""

from __future__ import annotations

import json
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels). Parsing is the check
    that the page is valid exposition format."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def frontend_url(dep) -> str:
    return f"http://127.0.0.1:{dep.settings.frontend.port}"


def worker_metric_urls(dep) -> dict[str, list[str]]:
    with urllib.request.urlopen(f"{frontend_url(dep)}/metrics/targets", timeout=10) as resp:
        groups = json.load(resp)
    return {g["labels"]["role"]: [f"http://{t}/metrics" for t in g["targets"]] for g in groups}


def test_frontend_metrics_move_with_traffic(deployment):
    before = scrape(f"{frontend_url(deployment)}/metrics")
    out = deployment.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=5, extra_body={"ignore_eos": True})
    after = scrape(f"{frontend_url(deployment)}/metrics")
    key = ("llmq_frontend_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    tokens = ("llmq_frontend_completion_tokens_total", ())
    assert after[tokens] - before.get(tokens, 0) == out.usage.completion_tokens == 5
    ttft = ("llmq_frontend_time_to_first_token_seconds_count", ())
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after[("llmq_frontend_requests_in_flight", ())] >= 0


def test_a_streams_chunks_after_the_first_are_written_by_the_stream_reader(deployment):
    # The sink (app/sink.py) hands a stream back once: "end" when it wrote every chunk to the last.
    ended = ("llmq_frontend_stream_handbacks_total", (("reason", "end"),))
    before = scrape(f"{frontend_url(deployment)}/metrics")
    stream = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=32, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    after = scrape(f"{frontend_url(deployment)}/metrics")
    assert chunks[-1].usage.completion_tokens == 32
    assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) > 0
    assert after.get(ended, 0) == before.get(ended, 0) + 1
    assert {k for k in after if k[0] == "llmq_frontend_stream_handbacks_total" and after[k] != before.get(k, 0)} \
        == {ended}


def test_worker_metrics_are_discoverable_and_move(deployment):
    [url] = worker_metric_urls(deployment)["decode"]
    # Listening on loopback only, as nothing in the config says otherwise, and advertised so.
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert url.startswith("http://127.0.0.1:")
    assert [c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port] == ["127.0.0.1"]
    before = scrape(url)
    deployment.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    finished = ("llmq_decode_requests_total", (("outcome", "finished"),))
    after = wait_for(lambda: (m := scrape(url))[finished] > before.get(finished, 0) and m, 10, "the worker count")
    assert after[finished] >= before.get(finished, 0) + 1
    assert after[("llmq_decode_kv_blocks_total", ())] > 0
    queries = ("llmq_decode_prefix_cache_queries_total", ())
    assert after[queries] > before[queries]


def test_one_request_id_in_frontend_and_worker_logs(deployment):
    raw = deployment.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "trace me"}], max_tokens=2,
        extra_headers={"X-Request-Id": "trace-me-42"})
    assert raw.headers["x-request-id"] == "trace-me-42"

    def lines():
        return [ln for ln in deployment.log().splitlines() if "[trace-me-42-" in ln]

    found = wait_for(lambda: (ls := lines()) and any(ln.startswith("[decode0]") for ln in ls) and ls, 10,
                     "the worker's log line")
    assert any(ln.startswith("[frontend]") for ln in found)
    assert any(ln.startswith("[decode0]") for ln in found)
    # The Celery task carries the same id, so Flower's task list names the request too.
    assert any(ln.startswith("[decode0]") and "Task tasks.generate[trace-me-42-" in ln for ln in found)
