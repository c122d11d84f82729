"""Redis high availability and authentication on real processes (issue 15, items 1 and 2).

One deployment (configs/agg.yaml, the tiny model, Flower on) whose redis_url lists three Sentinels
watching a password-protected primary and its replica, all on loopback ports (bench/redis_ha.py).
The primary is SIGKILLed under steady load from the openai client; every process must follow the
new master by itself. And the password must show nowhere: not in a log line, an error or a Flower
page.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from bench.failover import SteadyLoad, summarize
from bench.redis_ha import MASTER_NAME, SentinelSet
from conftest import free_port, make_settings, start_deployment, wait_for
from tasks import redis_conn

PASSWORD = "ha-s3cret-Zq9"


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    with SentinelSet(tmp_path_factory.mktemp("sentinels"), password=PASSWORD) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ha_deployment(ha, model_path, tmp_path_factory):
    settings = make_settings(ha.redis_url, **{"redis.sentinel_master": MASTER_NAME, "redis.failover_wait_s": "8",
                                              # This test is about Redis, not the engine: float32
                                              # keeps vLLM's CPU attention off its AMX path, whose
                                              # first forward has died with SIGILL on some VMs.
                                              "engine.dtype": "float32",
                                              "flower.enabled": "true", "flower.port": str(free_port())})
    dep = start_deployment(settings, tmp_path_factory.mktemp("ha"))
    yield dep
    dep.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode(errors="replace")


def test_the_password_shows_in_no_log_and_no_flower_page(ha_deployment):
    dep = ha_deployment
    reply = dep.client().completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    assert reply.choices[0].text
    flower = f"http://127.0.0.1:{dep.settings.flower.port}"
    wait_for(lambda: _safe_get(flower + "/workers"), 60, "Flower to answer")
    pages = [_safe_get(flower + path) for path in ("/workers", "/tasks", "/broker", "/api/workers")]
    assert any(pages)
    for page in pages:
        assert PASSWORD not in page
    assert PASSWORD not in dep.log()
    assert redis_conn.mask(dep.settings.redis_url) in dep.log()  # the frontend names its Redis, masked


def _safe_get(url: str) -> str:
    try:
        return _get(url)
    except OSError as e:  # an error page is a page too: it must not show the password either
        body = getattr(e, "read", lambda: b"")()
        return body.decode(errors="replace") if body else ""


def test_killing_the_primary_under_load_fails_over_and_every_later_request_succeeds(ha, ha_deployment):
    dep = ha_deployment
    launcher_log_before = dep.log().count("restarting it")
    load = SteadyLoad(dep.base_url, "none", concurrency=6, output_len=24, timeout_s=60).start()
    wait_for(lambda: sum(o.ok for o in load.outcomes) >= 12, 60, "the load to get answers")
    killed = time.monotonic()
    old = ha.kill_primary()
    failover_s = ha.wait_failover(old)
    switched = killed + failover_s
    # Load past the switch until 12 requests sent after it have been answered (or failed).
    wait_for(lambda: sum(1 for o in load.outcomes if o.sent > switched and o.done) >= 12, 90,
             "requests sent after the failover to finish")
    stuck = load.stop(timeout_s=70)
    result = summarize(load.outcomes, killed, failover_s, len(stuck))
    assert not stuck, f"clients still waiting after 70 s: {result}"
    later = [o for o in load.outcomes if o.sent > switched]
    assert later and all(o.ok for o in later), [(o.status, o.error) for o in later if not o.ok]
    # In flight or arriving during the switch: answered, or a clear 503; never a hang or a 500.
    for o in load.outcomes:
        assert o.ok or (o.status == 503 and o.error), (o.status, o.error)
    assert dep.log().count("restarting it") == launcher_log_before, "a process had to restart"
    assert PASSWORD not in dep.log()
