"""Concurrent requests are batched by the engine, and the frontend holds as many open streams as
admission control lets in (app/admission.py)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.admission import deployment_limit, process_limit
from conftest import live_status, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
# The clients retry a 429 (after its Retry-After), as a client of a loaded service should: each
# gunicorn process admits its own share, and a burst does not spread evenly over the processes.
RETRIES = 10


def admitted_at_once(dep) -> int:
    """Generation requests the deployment holds open at once: the smaller of its processes' and
    its decode workers' admission limits."""
    frontend = dep.settings.frontend
    return min(frontend.workers * process_limit(frontend),
               deployment_limit(frontend.max_requests_per_decode_worker, dep.settings.workers.num_decode))


async def _stream_all(dep, num_requests: int, max_tokens: int, timeout_s: float):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="none", max_retries=RETRIES, timeout=timeout_s)

    async def one(i: int):
        chunks = []
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}, please go on."}],
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            chunks.append(chunk)
        return chunks

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(num_requests))), timeout_s)
    finally:
        await client.close()


def test_16_concurrent_streams_are_batched(deployment):
    before = live_status(deployment)[0]
    # Long enough answers that all 16 overlap in the engine even when a loaded machine hands the
    # tasks to the worker slowly.
    results = asyncio.run(_stream_all(deployment, 16, max_tokens=128, timeout_s=180))
    for chunks in results:
        usage = chunks[-1].usage
        num_tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None
                         and c.choices[0].delta.role is None)
        assert usage.completion_tokens == 128
        assert usage.prompt_tokens > 0
        assert num_tokens >= 1
    # The engine's own scheduler stats, as the worker publishes them: steps that ran more than one
    # request at once. Only this test's requests were in flight, so they were batched together.
    after = wait_for(lambda: next((s for s in live_status(deployment)
                                   if s.num_batched_steps > before.num_batched_steps), None),
                     timeout_s=30, what="the worker's next heartbeat to report batched steps")
    assert after.max_running_seen >= 2


def test_as_many_concurrent_streaming_clients_as_admitted(deployment):
    count = admitted_at_once(deployment)
    assert count >= 128
    results = asyncio.run(_stream_all(deployment, count, max_tokens=8, timeout_s=300))
    assert len(results) == count
    assert all(chunks[-1].usage.completion_tokens == 8 for chunks in results)


async def _in_flight(http: httpx.AsyncClient) -> float:
    """The frontend's own count of requests being served, summed over its gunicorn workers."""
    reply = await http.get("/metrics")
    reply.raise_for_status()
    families = text_string_to_metric_families(reply.text)
    return next(f.samples[0].value for f in families if f.name == "llmq_frontend_requests_in_flight")


async def _wait_in_flight(http: httpx.AsyncClient, done, timeout_s: float, tasks=()) -> float:
    async def poll():
        while not done(value := await _in_flight(http)):
            if ended := [t for t in tasks if t.done()]:
                raise AssertionError(f"{len(ended)} stream(s) ended while {value:.0f} requests were in flight "
                                     f"({ended[0].exception() or 'finished'})")
            await asyncio.sleep(0.2)
        return value

    return await asyncio.wait_for(poll(), timeout_s)


async def _hold_streams_open(dep, num_requests: int, max_tokens: int, while_held=None) -> float:
    """Opens the streams, waits until the frontend holds them all, runs ``while_held`` (blocking,
    in a thread) if given, and hangs up; returns the in-flight peak."""
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="none", max_retries=RETRIES, timeout=120)

    async def one(i: int):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}, please go on."}],
            max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            pass

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dep.settings.frontend.port}", timeout=10) as http:
        await _wait_in_flight(http, lambda n: n == 0, timeout_s=60)  # nothing else counts below
        tasks = [asyncio.create_task(one(i)) for i in range(num_requests)]
        try:
            peak = await _wait_in_flight(http, lambda n: n >= num_requests, timeout_s=120, tasks=tasks)
            if while_held is not None:
                await asyncio.to_thread(while_held)
            return peak
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()  # the clients hang up, and the frontend cancels their work
            await _wait_in_flight(http, lambda n: n == 0, timeout_s=120)


def test_frontend_holds_every_admitted_stream_open_at_once(deployment):
    # gunicorn's gthread worker queues connections beyond its threads, so streams finishing shows
    # nothing about holding them at once. Here the frontend's own in-flight gauge must reach the
    # admission limit while every stream is still open: one engine runs at most
    # engine.max_num_seqs of them, and each of those has more tokens to make than it takes to open
    # them all, so the rest wait in the queue with their HTTP requests open.
    count = admitted_at_once(deployment)
    settings = deployment.settings
    assert settings.engine.max_num_seqs < settings.worker_concurrency <= count

    def engine_holds_its_queue():
        # The worker hands its engine more requests than it runs (workers.concurrency's default,
        # twice max_num_seqs): the rest wait in vLLM's own queue, so a sequence that ends is
        # replaced at the engine's next step, not after a task's way into the worker.
        wait_for(lambda: next((s for s in live_status(deployment)
                               if s.num_running + s.num_waiting >= settings.worker_concurrency), None),
                 timeout_s=60, what=f"the engine to hold {settings.worker_concurrency} requests, running or waiting")

    # Near max_model_len (2048), for the widest margin; cancelled once seen, so it costs nothing.
    peak = asyncio.run(_hold_streams_open(deployment, count, max_tokens=1900, while_held=engine_holds_its_queue))
    assert peak >= count
