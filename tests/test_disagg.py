"""Disaggregated serving against real engines and real NIXL: one decode and one prefill worker.

The deployment runs once per connector, pull and then push. The tests that say what each
connector must give (the remote path, equal tokens, a dropped task for a gone decode worker, a
killed prefill worker) run on both; the threshold policy, which is the same code for both, runs
on pull only."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

from conftest import fresh_redis_url, live_status, make_settings, start_deployment, wait_for
from placement import RUNNER_PROCESS_TITLE, SCHEDULER_PROCESS_TITLE
from tasks import keys, queues
from tasks.messages import PrefillRequest, prefill_to_task_arg

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
LONG = [10 + (i * 37) % 1500 for i in range(900)]  # past max_local_prefill_length: remote
SHORT = LONG[:100]                                   # under it: local


def long_prompt(seed: int) -> list[int]:
    return [10 + (i * (41 + seed)) % 1500 for i in range(900)]


@pytest.fixture(scope="module", params=["pull", "push"])
def disagg(request, model_path, tmp_path_factory):
    # NIXL's progress thread busy-polls a core per engine; on two cores a KV pull can stall every
    # process for seconds, so leases and time-outs here are long enough to ride that out.
    settings = make_settings(fresh_redis_url(), base="disagg.yaml", **{
        "disagg.connector": request.param, "disagg.prefill_timeout_s": 20,
        "disagg.push_registration_timeout_s": 20, "workers.heartbeat_interval_s": 1, "workers.lease_s": 30})
    assert settings.disagg.enabled and settings.disagg.max_local_prefill_length < len(LONG)
    dep = start_deployment(settings, tmp_path_factory.mktemp(f"disagg-{request.param}"), ready_timeout_s=400)
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
               if line.startswith("[prefill0]") and "Task tasks.prefill[" in line
               and line.rstrip().endswith("received"))


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
    # The prefill worker's completion notice reached the decode worker over Redis pub/sub.
    settled(disagg, "decode", lambda w: w.num_prefill_done_notices > before.num_prefill_done_notices, "PrefillDone")
    assert settled(disagg, "prefill", lambda w: w.num_prefills_served > served_before, "served").num_prefills_served


def test_disaggregated_tokens_equal_aggregated(disagg, deployment):
    remote = greedy(disagg, long_prompt(1))
    local = greedy(deployment, long_prompt(1))
    assert remote.choices[0].text == local.choices[0].text
    # Equal to within bf16's epsilon (2**-7), not bit for bit: on a CPU with AMX the
    # aggregated engine's attention runs vLLM's AMX kernels, and a disaggregated engine left
    # unbound its AVX-512 ones (placement.no_amx_when_unbound); the two engines also compute the
    # prompt in different steps.
    assert remote.choices[0].logprobs.token_logprobs == pytest.approx(local.choices[0].logprobs.token_logprobs,
                                                                      rel=2**-7, abs=2**-7)


def first_tokens_from_prefill(dep) -> int:
    return dep.log().count("first token from the prefill engine)")


@pytest.mark.parametrize("max_tokens, prompt_len", [(12, 900), (12, 896), (1, 900)])
def test_the_first_token_comes_from_the_prefill_engine(disagg, deployment, max_tokens, prompt_len):
    """Push: the prefill engine samples the first token with the request's sampling, the decode
    worker streams it, and the decode engine continues from it (max_tokens 1: only takes the KV,
    so the prefill engine's blocks go back). The answer is the aggregated one, usage counts the
    client's prompt, and no block stays allocated on either engine. 896 tokens fill their last
    block (32 tokens each): the decode engine's t1 needs a block the prefill engine has not."""
    if disagg.settings.disagg.connector != "push":
        pytest.skip("the first token comes from the prefill engine with push only")
    decode_before = settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "the decode worker to be idle")
    asked_before = first_tokens_from_prefill(disagg)
    assert disagg.settings.engine.block_size == 32
    prompt = long_prompt(6 + max_tokens + prompt_len)[:prompt_len]
    chunks = list(disagg.client(timeout=120).completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(prompt), max_tokens)
    reference = greedy(deployment, prompt, max_tokens=max_tokens)
    assert "".join(texts) == reference.choices[0].text
    assert first_tokens_from_prefill(disagg) == asked_before + 1
    after = settled(disagg, "decode", lambda w: w.num_remote_prefills > decode_before.num_remote_prefills,
                    "the push to be counted")
    assert after.num_local_fallbacks == decode_before.num_local_fallbacks
    # Within the prefill engine's lease (30 s): a block it kept for a registration that never
    # came would still be held.
    assert settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "decode blocks to be free").kv_blocks_used == 0
    assert settled(disagg, "prefill", lambda w: w.kv_blocks_used == 0, "prefill blocks to be free").kv_blocks_used == 0


def test_the_decode_engine_has_its_core_to_itself(disagg):
    # disagg.isolate_decode_cores: everything else the launcher started runs on the prefill
    # engine's core, and the decode scheduler stays pinned beside its runner at every load.
    procs = psutil.Process(disagg.proc.pid).children(recursive=True)
    title = lambda p: " ".join(p.cmdline())  # noqa: E731

    def engine(worker: str, process_title: str) -> set[int]:
        [celery] = [p for p in procs if f"{worker}@" in title(p)]
        [proc] = [p for p in celery.children(recursive=True) if title(p).startswith(process_title)]
        return set(proc.cpu_affinity())

    decode, prefill = engine("decode0", RUNNER_PROCESS_TITLE), engine("prefill0", RUNNER_PROCESS_TITLE)
    assert decode.isdisjoint(prefill)
    assert engine("decode0", SCHEDULER_PROCESS_TITLE) == decode
    rest = [p for p in procs if not title(p).startswith("VLLM::")]
    assert len(rest) >= 3 and {title(p): set(p.cpu_affinity()) for p in rest} == {title(p): prefill for p in rest}
    # Its queue readers keep vLLM's spin on the core that is its own; the prefill engine's nap.
    napping = {line.split("]", 1)[0] + "]" for line in disagg.log().splitlines() if "between looks" in line}
    assert "[prefill0]" in napping and "[decode0]" not in napping


def test_thresholds_change_at_run_time(disagg):
    if disagg.settings.disagg.connector != "pull":
        pytest.skip("the threshold policy is the same for both connectors; tested on pull")
    seeds = iter(range(100, 200))

    def long_prompt_stays_local() -> bool:
        before = beat_after(disagg, "decode", time.time())
        greedy(disagg, long_prompt(next(seeds)), max_tokens=2)
        return beat_after(disagg, "decode", time.time()).num_remote_prefills == before.num_remote_prefills

    disagg.redis.hset(keys.DISAGG_THRESHOLDS, "max_local_prefill_length", 100_000)
    try:
        # Workers re-read the thresholds about once a second, with no restart.
        wait_for(long_prompt_stays_local, 30, "the raised threshold to keep long prompts local")
    finally:
        disagg.redis.delete(keys.DISAGG_THRESHOLDS)
    wait_for(lambda: not long_prompt_stays_local(), 30, "the default threshold to send them remote again")


@contextlib.contextmanager
def frozen_prefill_engine(dep):
    """Stops the prefill worker's engine processes (SIGSTOP); yields the worker and them. Its Celery
    process stays alive and takes tasks, so a remote prefill gets as far as waiting on an engine
    that cannot compute (push: the task is claimed and the decode engine registers its blocks)."""
    prefill = worker(dep, "prefill")
    engine = psutil.Process(prefill.pid).children(recursive=True)
    for proc in engine:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield prefill, engine
    finally:
        for proc in engine:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


def test_other_requests_keep_streaming_during_a_remote_prefill(disagg):
    # Frozen, the prefill engine holds the long prompt in its remote prefill for as long as the
    # other request needs: the window is a condition, not a race against a 1 s prefill on a
    # loaded machine (CI once saw a 2-chunk window that way).
    before = settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "the decode worker to be idle")
    received_before = prefill_tasks_received(disagg)
    result: dict = {}

    def ask_long():
        result["long"] = greedy(disagg, long_prompt(3), max_tokens=4)

    with frozen_prefill_engine(disagg):
        t = threading.Thread(target=ask_long)
        t.start()
        wait_for(lambda: prefill_tasks_received(disagg) > received_before, 30, "the prefill worker to take the task")
        chunks = [c for c in disagg.client(timeout=60).completions.create(
            model=MODEL, prompt=SHORT, max_tokens=64, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})]
        # A whole other request streamed to its end on the same decode worker while the long
        # prompt waited on its remote prefill.
        assert "long" not in result
    assert chunks[-1].usage.completion_tokens == 64
    assert len([c for c in chunks if c.choices]) >= 2
    t.join(timeout=120)
    assert result["long"].usage.completion_tokens == 4
    # ... and the long prompt's prefill did happen remotely, once the engine was let go.
    after = settled(disagg, "decode", lambda w: w.num_remote_prefills > before.num_remote_prefills, "remote")
    assert after.num_local_fallbacks == before.num_local_fallbacks


def test_a_long_prompt_prefills_locally_while_the_backlog_is_full(disagg):
    """The prefill worker takes a queued prefill at once, so while its frozen engine holds one
    remote prefill the `prefill` queue is empty: the decode worker's own count of unanswered
    remote prefills keeps the next long prompt local at max_prefill_queue_size 1, and that one is
    answered while the first still waits."""
    if disagg.settings.disagg.connector != "pull":
        pytest.skip("the backlog is the same code for both connectors; tested on pull")
    from kvtransfer.policy import THRESHOLDS_CACHE_S

    before = settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "the decode worker to be idle")
    received_before = prefill_tasks_received(disagg)
    result: dict = {}

    def ask_long():
        result["first"] = greedy(disagg, long_prompt(20), max_tokens=2)

    disagg.redis.hset(keys.DISAGG_THRESHOLDS, "max_prefill_queue_size", 1)
    try:
        # The documented re-read interval: every decision after it sees the new limit.
        time.sleep(THRESHOLDS_CACHE_S + 0.1)
        with frozen_prefill_engine(disagg):
            t = threading.Thread(target=ask_long)
            t.start()
            wait_for(lambda: prefill_tasks_received(disagg) > received_before, 30, "the prefill worker's pickup")
            assert disagg.redis.llen(queues.PREFILL) == 0
            second = greedy(disagg, long_prompt(21), max_tokens=2)
            assert second.usage.completion_tokens == 2 and "first" not in result
        t.join(timeout=120)
    finally:
        disagg.redis.delete(keys.DISAGG_THRESHOLDS)
    assert result["first"].usage.completion_tokens == 2
    after = settled(disagg, "decode", lambda w: w.num_remote_prefills > before.num_remote_prefills
                    and w.num_local_by_backlog > before.num_local_by_backlog, "the remote and the local prefill")
    assert (after.num_remote_prefills, after.num_local_by_backlog) == (before.num_remote_prefills + 1,
                                                                      before.num_local_by_backlog + 1)
    assert after.num_local_fallbacks == before.num_local_fallbacks


def test_prefill_for_a_gone_decode_worker_is_dropped(disagg):
    from tasks.celery_app import make_celery

    before = worker(disagg, "prefill").num_prefills_dropped
    ghost = PrefillRequest("ghost-req", LONG, decode_worker_id="decode9@nowhere", deadline_unix=time.time() + 60)
    make_celery(disagg.settings).send_task(queues.PREFILL_TASK, args=[prefill_to_task_arg(ghost)])
    settled(disagg, "prefill", lambda w: w.num_prefills_dropped > before, "the ghost prefill to be dropped")


def test_killed_prefill_worker_falls_back_locally_without_leaking(disagg, deployment):
    # The previous test's requests may still be ending; a block that never comes back fails here.
    decode_before = settled(disagg, "decode", lambda w: w.kv_blocks_used == 0, "the decode worker to be idle")
    received_before = prefill_tasks_received(disagg)
    result: dict = {}

    def ask():
        result["out"] = greedy(disagg, long_prompt(4), max_tokens=24)

    # The decode worker is waiting on the frozen engine when its worker dies. (Push: the task is
    # claimed, so the decode engine has registered blocks for a WRITE that never comes.)
    with frozen_prefill_engine(disagg) as (prefill, engine):
        t = threading.Thread(target=ask)
        t.start()
        try:
            wait_for(lambda: prefill_tasks_received(disagg) > received_before, 30,
                     "the prefill worker to take the task")
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
    if disagg.settings.disagg.connector == "push":
        # The claim came, and then no PrefillDone with the first token: the decode engine never
        # registered, and the decode worker prefilled locally.
        assert "remote prefill failed (no PrefillDone within" in disagg.log()
