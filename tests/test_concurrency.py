"""Concurrent requests are batched by the engine, and one gunicorn config holds 256 open streams."""

from __future__ import annotations

import asyncio

import openai
import pytest

from conftest import live_status, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


async def _stream_all(dep, num_requests: int, max_tokens: int, timeout_s: float):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="none", max_retries=0, timeout=timeout_s)

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


def test_256_concurrent_streaming_clients(deployment):
    frontend = deployment.settings.frontend
    assert frontend.workers * frontend.threads >= 256
    results = asyncio.run(_stream_all(deployment, 256, max_tokens=8, timeout_s=300))
    assert len(results) == 256
    assert all(chunks[-1].usage.completion_tokens == 8 for chunks in results)
