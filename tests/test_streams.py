"""The two ends of a request's output stream, against a real Redis: the worker's batched writer
and the frontend's one-reader-per-process. No engine, no gunicorn."""

from __future__ import annotations

import asyncio
import queue

import pytest
import redis
import redis.asyncio

from app import streams
from app.streams import StreamReader
from conftest import free_port, wait_for
from tasks import keys
from tasks.messages import Delta, Finished, decode_event, encode_event
from workers.outputs import BatchedStreamWriter, OutputWriter


def _texts(client: redis.Redis, request_id: str) -> list[str]:
    return [decode_event(f[b"m"]).text for _, f in client.xrange(keys.output_stream(request_id))]


@pytest.fixture(scope="module")
def redis_url(scratch_redis_url) -> str:
    return scratch_redis_url


def _count_pipelines(client, opened: list[int]) -> None:
    """Appends to ``opened`` each time ``client`` opens a pipeline (one round trip each)."""
    real_pipeline = client.pipeline

    def counting_pipeline(**kwargs):
        opened.append(1)
        return real_pipeline(**kwargs)

    client.pipeline = counting_pipeline


def test_batched_writer_keeps_each_streams_order_in_few_round_trips(redis_url):
    url = redis_url
    pipelines: list[int] = []

    async def main():
        client = redis.asyncio.Redis.from_url(url)
        writer = BatchedStreamWriter(client)
        _count_pipelines(client, pipelines)

        async def one_request(rid: str):
            for step in range(5):
                await writer.write(rid, [Delta(index=0, text=f"{rid}:{step}", token_ids=[step])])

        # Like one engine step after another: 32 requests, each woken once per step.
        await asyncio.gather(*(one_request(f"r{i}") for i in range(32)))
        await client.aclose()

    asyncio.run(main())
    sync = redis.Redis.from_url(url)
    for i in range(32):
        assert _texts(sync, f"r{i}") == [f"r{i}:{step}" for step in range(5)]
    # 160 writes; one round trip each would be 160 pipelines.
    assert len(pipelines) <= 10, len(pipelines)


def test_submitted_writes_keep_their_order_and_each_future_says_when_it_is_in(redis_url):
    # The relay's use (workers/decode.py): the next write is queued before the last is awaited.
    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        writer = BatchedStreamWriter(client)
        futures = [writer.submit("sub", [Delta(index=0, text=f"t{step}", token_ids=[step])]) for step in range(4)]
        await asyncio.gather(*futures)
        await client.aclose()
        return futures

    assert all(f.done() and f.exception() is None for f in asyncio.run(main()))
    assert _texts(redis.Redis.from_url(redis_url), "sub") == ["t0", "t1", "t2", "t3"]


def test_batched_writer_raises_to_every_writer_when_redis_is_down():
    async def main():
        client = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1)
        writer = BatchedStreamWriter(client)
        results = await asyncio.gather(*(writer.write(f"r{i}", [Finished(num_prompt_tokens=1)]) for i in range(3)),
                                       return_exceptions=True)
        await client.aclose()
        return results

    assert all(isinstance(r, redis.ConnectionError) for r in asyncio.run(main()))


def test_cancel_watch_reads_every_requests_flag_in_one_round_trip(redis_url):
    from workers.decode import CancelWatch

    sync = redis.Redis.from_url(redis_url)
    rids = [f"cw{i}" for i in range(32)]
    gone = {"cw3", "cw17", "cw30"}
    pipelines: list[int] = []

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        _count_pipelines(client, pipelines)
        watch = CancelWatch(client, interval_s=0.05)
        for rid in rids:
            watch.watch(rid)
        for rid in gone:
            sync.set(keys.cancel_flag(rid), 1, ex=60)

        async def until_seen():
            while not all(watch.cancelled(rid) for rid in gone):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(until_seen(), timeout=10)
        seen = {rid for rid in rids if watch.cancelled(rid)}
        for rid in rids:
            watch.unwatch(rid)
        task = watch._task
        assert task is not None
        await asyncio.wait_for(task, timeout=10)  # nothing watched: it ends
        await client.aclose()
        return seen

    try:
        assert asyncio.run(main()) == gone
    finally:
        sync.delete(*(keys.cancel_flag(rid) for rid in gone))
    # One pipeline per interval for all 32, not one round trip per request per interval.
    assert 1 <= len(pipelines) < 32, len(pipelines)


@pytest.fixture
def reader(redis_url):
    client = redis.Redis.from_url(redis_url)
    return client, StreamReader(client)


def _get(q: queue.SimpleQueue, timeout_s: float = 10):
    key, entries = q.get(timeout=timeout_s)
    assert not isinstance(entries, Exception), entries
    return key, [decode_event(f[b"m"]).text for _, f in entries]


def _append(client: redis.Redis, rid: str, text: str) -> None:
    client.xadd(keys.output_stream(rid), {"m": encode_event(Delta(index=0, text=text, token_ids=[1]))})


def test_reader_delivers_each_stream_to_its_own_queue(reader):
    client, reader_ = reader
    qa = reader_.open([keys.output_stream("a")])
    qb = reader_.open([keys.output_stream("b")])
    for rid, text in [("a", "a1"), ("b", "b1"), ("a", "a2")]:
        _append(client, rid, text)
    seen_a: list[str] = []
    while len(seen_a) < 2:
        key, texts = _get(qa)
        assert key == keys.output_stream("a")
        seen_a += texts
    assert seen_a == ["a1", "a2"]
    assert _get(qb) == (keys.output_stream("b"), ["b1"])
    assert qa.empty() and qb.empty()


def test_a_stream_opened_while_the_reader_blocks_is_read_without_waiting_out_the_block(reader, monkeypatch):
    # With a block longer than the wait below, only the wake stream can make this pass.
    monkeypatch.setattr(streams, "BLOCK_MS", 120_000)
    client, reader_ = reader
    first = reader_.open([keys.output_stream("first")])
    _append(client, "first", "x")
    assert _get(first)[1] == ["x"]  # the reader is running, and now blocks on "first" alone
    second = reader_.open([keys.output_stream("second")])
    _append(client, "second", "y")
    assert _get(second, timeout_s=10) == (keys.output_stream("second"), ["y"])


def test_a_wake_stream_is_made_at_start_renewed_while_its_process_lives_and_deleted_at_exit(reader, monkeypatch):
    # A frontend process's one standing key: made before its first request, so the key count is
    # steady from the start; on a short TTL that the reader renews, so a killed process leaves
    # it for WAKE_TTL_S at most; deleted on a clean exit.
    monkeypatch.setattr(streams, "WAKE_TTL_S", 5)
    monkeypatch.setattr(streams, "WAKE_RENEW_S", 0.5)
    client, reader_ = reader
    reader_.start()
    wake = reader_.wake_key
    assert wake.startswith(keys.frontend_wake("")) and 0 < client.ttl(wake) <= 5
    first = client.xrange(wake)[-1][0]
    wait_for(lambda: client.xrange(wake)[-1][0] != first, 10, "the reader to renew its wake stream")
    assert 0 < client.ttl(wake) <= 5
    reader_.stop()
    assert not client.exists(wake)


def test_a_closed_stream_is_no_longer_delivered(reader):
    client, reader_ = reader
    closed = reader_.open([keys.output_stream("closed")])
    kept = reader_.open([keys.output_stream("kept")])
    reader_.close([keys.output_stream("closed")])
    _append(client, "closed", "late")
    _append(client, "kept", "k")
    assert _get(kept)[1] == ["k"]  # the reader has read past the closed stream's entry by now
    assert closed.empty()


def test_a_stream_written_before_it_is_opened_is_delivered_in_full(reader):
    # A fast worker can finish a request before the frontend's thread opens its stream; the
    # reader starts every stream at its first entry, so nothing written earlier is lost.
    client, reader_ = reader
    for text in ("e1", "e2", "e3"):
        _append(client, "early", text)
    q = reader_.open([keys.output_stream("early")])
    seen: list[str] = []
    while len(seen) < 3:
        seen += _get(q)[1]
    assert seen == ["e1", "e2", "e3"]


def test_worker_written_streams_expire(redis_url):
    # The stream is the only copy of a request's output; one whose reader never came must not
    # stay in Redis for good.
    client = redis.Redis.from_url(redis_url)
    key = keys.output_stream("ttl")
    OutputWriter(client, "ttl", ttl_s=600).write([Delta(index=0, text="t", token_ids=[1])])
    assert 0 < client.ttl(key) <= 600
    client.persist(key)
    OutputWriter(client, "ttl", ttl_s=300).fail(500, "internal_error", "boom")
    assert 0 < client.ttl(key) <= 300


def _gateway(redis_url: str):
    from app.gateway import Gateway
    from conftest import make_settings

    return Gateway(make_settings(redis_url), celery=None, client=redis.Redis.from_url(redis_url))


def _write(client: redis.Redis, rid: str, events) -> None:
    OutputWriter(client, rid, ttl_s=60).write(events)


def test_tokens_before_a_failure_still_go_out_then_the_error(redis_url):
    from app.errors import APIError
    from app.gateway import SubRequest
    from tasks.messages import Failed

    client = redis.Redis.from_url(redis_url)
    _write(client, "fails", [Delta(index=0, text="a", token_ids=[1]), Delta(index=0, text="b", token_ids=[2]),
                             Failed(status=503, type="server_error", message="engine died")])
    texts = []
    with pytest.raises(APIError) as failure:
        for _, delta in _gateway(redis_url).events([SubRequest("fails", [1], choice_offset=0)]):
            texts.append(delta.text)
    assert texts == ["a", "b"]
    assert failure.value.status == 503 and "engine died" in failure.value.message
