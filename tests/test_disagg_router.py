"""disagg_router.yaml: KV routing and disaggregation together."""

from __future__ import annotations

import time

import pytest

from conftest import fresh_redis_url, live_status, make_settings, start_deployment, stored_blocks, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
PREFIX = [10 + (i * 43) % 1500 for i in range(900)]


@pytest.fixture(scope="module")
def both(model_path, tmp_path_factory):
    # Three engines on two cores, with the deployment's own leases and time-outs: the first KV
    # transfers must not stall anything (docs/disaggregation.md, "CPU notes").
    settings = make_settings(fresh_redis_url(), base="disagg_router.yaml")
    assert settings.router.mode == "kv" and settings.disagg.enabled
    dep = start_deployment(settings, tmp_path_factory.mktemp("disagg_router"), ready_timeout_s=500)
    wait_for(lambda: {w.role for w in live_status(dep, role=None)} >= {"decode", "prefill", "router"}, 400,
             "router, decode and prefill workers")
    yield dep
    dep.stop()


def remote_prefills(dep) -> dict[str, int]:
    fresh = time.time()
    workers = wait_for(lambda: (ws := live_status(dep)) and all(w.updated_unix > fresh for w in ws) and ws, 15,
                       "fresh heartbeats")
    return {w.worker_id: w.num_remote_prefills for w in workers}


def complete(dep, ids):
    raw = dep.client().completions.with_raw_response.create(model=MODEL, prompt=ids, max_tokens=4,
                                                            extra_body={"ignore_eos": True})
    assert raw.parse().usage.completion_tokens == 4
    return raw.headers["x-worker-id"], int(raw.headers["x-overlap-blocks"]), raw.headers["x-route-mode"], \
        raw.headers["x-request-id"]


def routing_log(dep, request_id: str) -> str:
    """The router's and decode workers' log lines about a request: why it went where it went."""
    return "\n".join(line for line in dep.log().splitlines() if request_id in line and "[frontend]" not in line)


def test_routing_and_disaggregation_compose(both):
    before = remote_prefills(both)
    worker, overlap, mode, first_id = complete(both, PREFIX + [1, 2, 3])
    assert mode == "kv" and overlap == 0
    # A cold long prompt is prefilled remotely by the prefill worker.
    after_first = remote_prefills(both)
    assert after_first[worker] == before[worker] + 1
    # The KV landed in the chosen decode worker's cache, so the next turn is routed back to it,
    # and with most of the prompt cached there the uncached rest is short: it prefills locally.
    # Wait on the event stream the router reads before each decision, not with requests: one
    # routed before the events arrived would put the prefix on the other worker too.
    wait_for(lambda: stored_blocks(both, worker) >= len(PREFIX) // 32, 30, "the decode worker's KV events")
    # The router counts the first request against its worker's load until the worker reports
    # figures taken router.booking_lag_s after it (router/policy.py, Bookings); sent sooner, the
    # next turn finds the holder loaded by a request that has already ended, and goes elsewhere.
    booked_until = time.time() + both.settings.router.booking_lag_s
    wait_for(lambda: all(w.updated_unix > booked_until for w in live_status(both)), 15, "heartbeats past the booking")
    again, overlap, _, again_id = complete(both, PREFIX + [7, 8, 9])
    assert again == worker and overlap >= len(PREFIX) // 32 - 1, \
        f"{routing_log(both, first_id)}\n{routing_log(both, again_id)}"
    assert remote_prefills(both)[worker] == after_first[worker]


def test_a_constrained_request_takes_a_remote_prefill(both):
    """The constraint travels to the decode worker, which applies it to a prompt whose KV another
    worker computed: the prefill side samples nothing the client sees, so it needs no grammar."""
    before = remote_prefills(both)
    cold = [11 + (i * 37) % 1500 for i in range(900)]
    raw = both.client().completions.with_raw_response.create(
        model=MODEL, prompt=cold, max_tokens=8, extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert raw.parse().choices[0].text in ("sunny", "rainy")
    worker = raw.headers["x-worker-id"]
    assert remote_prefills(both)[worker] == before[worker] + 1, routing_log(both, raw.headers["x-request-id"])
