"""The soak (bench/soak.py, issue 15 item 5), short: configs/agg_router.yaml under a closed loop
of streaming clients for 40 s, one decode worker SIGKILLed half-way and restarted by the
launcher. Every request completes with every token, no engine outlives its worker, and Redis is
left as it was: no standing key (leases, wake streams, kombu's bindings) that the start did not
have, and every request's keys on a TTL. That the requests' keys then expire, and DBSIZE
comes all the way back, takes their TTLs (a minute or two): the 10-minute bench checks it.
"""

from __future__ import annotations

import pytest

from bench.soak import SoakSpec, soak, summary
from conftest import fresh_redis_url, make_settings, start_deployment

pytestmark = pytest.mark.integration


def test_a_short_soak_completes_every_request_and_leaves_redis_as_it_was(model_path, tmp_path):
    spec = SoakSpec(duration_s=40, kill_every_s=20, concurrency=4, output_len=32, request_timeout_s=60,
                    settle_s=0)
    assert spec.kill_times_s == [20]
    settings = make_settings(fresh_redis_url(), base="agg_router.yaml", **spec.deployment_sets())
    dep = start_deployment(settings, tmp_path)
    try:
        result = soak(spec, dep.base_url, dep.redis, dep.proc.pid)
    finally:
        dep.stop()
    print(summary(result))
    assert len(result.kills) == 1
    assert result.sent > 0 and result.sent - result.refused_429 == result.completed, result.errors
    assert not result.stuck and result.orphans == 0
    start, end = result.start.keys, result.end.keys
    assert result.new_standing == [], (start.shapes, end.shapes)
    assert end.binding_members == start.binding_members, (start.shapes, end.shapes)
    assert end.request_without_ttl == 0
    assert result.holds
