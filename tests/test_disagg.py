"""Disaggregated serving against real engines and real NIXL: one decode and one prefill worker."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

from conftest import fresh_redis_url, live_status, make_settings, start_deployment, wait_for
from kvtransfer.policy import THRESHOLDS_KEY
from tasks import queues
from tasks.messages import PrefillRequest, prefill_to_task_arg

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
LONG = [10 + (i * 37) % 1500 for i in range(900)]  # past max_local_prefill_length: remote
SHORT = LONG[:100]                                   # under it: local


def long_prompt(seed: int) -> list[int]:
    return [10 + (i * (41 + seed)) % 1500 for i in range(900)]


@pytest.fixture(scope="module")
def disagg(model_path, tmp_path_factory):
    # NIXL's progress thread busy-polls a core per engine; on two cores a KV pull can stall every
    # process for seconds, so leases here are long enough to ride that out.
    settings = make_settings(fresh_redis_url(), base="disagg.yaml", **{
        "disagg.prefill_timeout_s": 20, "workers.heartbeat_interval_s": 1, "workers.lease_s": 30})
    assert settings.disagg.enabled and settings.disagg.max_local_prefill_length < len(LONG)
    dep = start_deployment(settings, tmp_path_factory.mktemp("disagg"), ready_timeout_s=400)
    wait_for(lambda: {w.role for w in live_status(dep, role=None)} >= {"decode", "prefill"}, 300, "prefill worker")
    yield dep
    dep.stop()


def worker(dep, role: str):
    return next(w for w in live_status(dep, role=None) if w.role == role)


def settled(dep, role: str, condition, what: str):
    """The worker's first heartbeat that meets the condition (figures lag by one beat)."""
    return wait_for(lambda: (w := worker(dep, role)) and condition(w) and w, 15, what)


def beat_after(dep, role: str, since_unix: float):
    """The worker's figures as of a heartbeat taken after ``since_unix``."""
    return settled(dep, role, lambda w: w.updated_unix > since_unix, "a fresh heartbeat")


def prefill_tasks_received(dep) -> int:
    return sum(1 for line in dep.log().splitlines()
               if line.startswith("[prefill0]") and "Task tasks.prefill[" in line and line.rstrip().endswith("received"))


def greedy(dep, ids, max_tokens=16, **kwargs):
    return dep.client().completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0,
                                           logprobs=0, extra_body={"ignore_eos": True}, **kwargs)


def test_long_prompt_goes_remote_and_short_stays_local(disagg):
    before = worker(disagg, "decode")
    served_before = worker(disagg, "prefill").num_prefills_served
    greedy(disagg, SHORT)
    after_short = beat_after(disagg, "decode", time.time())
    assert after_short.num_remote_prefills == before.num_remote_prefills
    greedy(disagg, LONG)
    after_long = settled(disagg, "decode", lambda w: w.num_remote_prefills > before.num_remote_prefills, "remote")
    assert after_long.num_local_fallbacks == before.num_local_fallbacks
    assert settled(disagg, "prefill", lambda w: w.num_prefills_served > served_before, "served").num_prefills_served


def test_disaggregated_tokens_equal_aggregated(disagg, deployment):
    remote = greedy(disagg, long_prompt(1))
    local = greedy(deployment, long_prompt(1))
    assert remote.choices[0].text == local.choices[0].text
    assert remote.choices[0].logprobs.token_logprobs == pytest.approx(local.choices[0].logprobs.token_logprobs,
                                                                      abs=1e-3)


def test_thresholds_change_at_run_time(disagg):
    seeds = iter(range(100, 200))

    def long_prompt_stays_local() -> bool:
        before = beat_after(disagg, "decode", time.time())
        greedy(disagg, long_prompt(next(seeds)), max_tokens=2)
        return beat_after(disagg, "decode", time.time()).num_remote_prefills == before.num_remote_prefills

    disagg.redis.hset(THRESHOLDS_KEY, "max_local_prefill_length", 100_000)
    try:
        # Workers re-read the thresholds about once a second, with no restart.
        wait_for(long_prompt_stays_local, 30, "the raised threshold to keep long prompts local")
    finally:
        disagg.redis.delete(THRESHOLDS_KEY)
    wait_for(lambda: not long_prompt_stays_local(), 30, "the default threshold to send them remote again")


def test_other_requests_keep_streaming_during_a_remote_prefill(disagg):
    arrivals: list[float] = []
    streaming = threading.Event()

    def stream_locally():
        for _ in disagg.client().completions.create(model=MODEL, prompt=SHORT, max_tokens=600, stream=True,
                                                    extra_body={"ignore_eos": True}):
            arrivals.append(time.monotonic())
            streaming.set()

    t = threading.Thread(target=stream_locally)
    t.start()
    assert streaming.wait(60)
    sent = time.monotonic()
    first_token = None
    for chunk in disagg.client().completions.create(model=MODEL, prompt=long_prompt(3), max_tokens=4, stream=True,
                                                    extra_body={"ignore_eos": True}):
        first_token = first_token or time.monotonic()
    t.join(timeout=120)
    # While the long prompt was out for prefill, the other stream kept receiving tokens.
    during = [a for a in arrivals if sent <= a <= first_token]
    assert len(during) >= 3, f"{len(during)} chunks arrived while the remote prefill ran"


def test_prefill_for_a_gone_decode_worker_is_dropped(disagg):
    from tasks.celery_app import make_celery

    before = worker(disagg, "prefill").num_prefills_dropped
    ghost = PrefillRequest("ghost-req", LONG, decode_worker_id="decode9@nowhere", deadline_unix=time.time() + 60)
    make_celery(disagg.settings).send_task(queues.PREFILL_TASK, args=[prefill_to_task_arg(ghost)])
    settled(disagg, "prefill", lambda w: w.num_prefills_dropped > before, "the ghost prefill to be dropped")


def test_killed_prefill_worker_falls_back_locally_without_leaking(disagg, deployment):
    decode_before = worker(disagg, "decode")
    prefill = worker(disagg, "prefill")
    assert decode_before.kv_blocks_used == 0
    # Freeze the prefill worker's engine: its Celery process stays alive and takes the task, and
    # then cannot finish it, so the decode worker is waiting on it when it dies.
    engine = psutil.Process(prefill.pid).children(recursive=True)
    received_before = prefill_tasks_received(disagg)
    for proc in engine:
        proc.send_signal(signal.SIGSTOP)
    try:
        result: dict = {}

        def ask():
            result["out"] = greedy(disagg, long_prompt(4), max_tokens=24)

        t = threading.Thread(target=ask)
        t.start()
        wait_for(lambda: prefill_tasks_received(disagg) > received_before, 30, "the prefill worker to take the task")
    finally:
        os.kill(prefill.pid, signal.SIGKILL)  # dies mid-request, with the decode worker waiting
        for proc in engine:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    t.join(timeout=120)
    out = result["out"]
    assert out.usage.completion_tokens == 24 and out.choices[0].finish_reason == "length"
    # The aggregated deployment's answer is the reference; asking this one again would go to the
    # prefill worker the launcher is restarting.
    reference = greedy(deployment, long_prompt(4), max_tokens=24)
    assert out.choices[0].text == reference.choices[0].text
    after = settled(disagg, "decode", lambda w: w.num_local_fallbacks > decode_before.num_local_fallbacks,
                    "the fallback to be counted")
    # No block is left allocated once the requests are done.
    assert settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "blocks to be free").kv_blocks_used == 0
    assert after.num_remote_prefills == decode_before.num_remote_prefills
