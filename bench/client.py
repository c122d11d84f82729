"""The load generator: one streaming request with its timings, sessions, and open/closed loops.

Every request is bounded by `request_timeout_s`; every load point by the run's deadline. A request
cut off by the deadline is recorded as an error, and one never sent as "not sent", so each load
point has exactly one record per planned request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum

import aiohttp
import openai

from bench.records import LoadMode, LoadPoint, RequestRecord, Target
from bench.workloads import Session, Turn, poisson_arrivals

logger = logging.getLogger(__name__)


class ClientKind(str, Enum):
    # aiohttp and a minimal SSE reader, as vLLM's `bench serve` and aiperf do. The default,
    # because on a 2-core box the client's CPU comes out of the server's share.
    HTTP = "http"
    # The official client. It parses every chunk into pydantic models: about twice HTTP's CPU at
    # 32 streams, and it falls behind the stream and reads chunks in bunches, which distorts its
    # own ITL (docs/benchmarks.md, "The harness's client").
    OPENAI = "openai"


@dataclass(frozen=True)
class ClientOptions:
    api_key: str = "none"
    request_timeout_s: float = 120.0
    temperature: float = 0.0
    kind: ClientKind = ClientKind.HTTP


@dataclass
class StreamTiming:
    """Arrival times (time.perf_counter) of each output-carrying chunk, and the final usage."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def take(self, now: float, chunk: dict, chat: bool) -> None:
        """Records one chunk, given as a dict in the API's own shape."""
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.output_tokens = usage.get("completion_tokens")
            self.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        choices = chunk.get("choices")
        if not choices:
            return  # the usage-only chunk
        if chat:
            delta = choices[0].get("delta") or {}
            if not delta.get("content") and delta.get("role") is not None:
                return  # chat's role-only first chunk
            piece = delta.get("content")
        else:
            piece = choices[0].get("text")
        self.chunk_times.append(now)
        self.pieces.append(piece or "")


class StreamFailed(Exception):
    """An HTTP error status (``status``, and the answer's Retry-After in seconds when it had one),
    or an error event inside the stream (``status`` 0, ``error_type`` the event's type)."""

    def __init__(self, message: str, status: int = 0, retry_after_s: float | None = None, error_type: str = ""):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.error_type = error_type


def _body(target: Target, options: ClientOptions, max_tokens: int) -> dict:
    return dict(model=target.model, max_tokens=max_tokens, temperature=options.temperature, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)


class OpenAIClient:
    """Sends streaming requests to one target with the official AsyncOpenAI client."""

    def __init__(self, target: Target, options: ClientOptions):
        self.target = target
        self.options = options
        self._client = openai.AsyncOpenAI(base_url=target.base_url, api_key=options.api_key,
                                          max_retries=0, timeout=options.request_timeout_s)

    async def close(self) -> None:
        await self._client.close()

    async def completion(self, prompt_ids: list[int], max_tokens: int) -> StreamTiming:
        return await self._send(self._client.completions, dict(prompt=prompt_ids), max_tokens, chat=False)

    async def chat(self, messages: list[dict], max_tokens: int) -> StreamTiming:
        return await self._send(self._client.chat.completions, dict(messages=messages), max_tokens, chat=True)

    async def _send(self, resource, request: dict, max_tokens: int, chat: bool) -> StreamTiming:
        body = _body(self.target, self.options, max_tokens)
        extra_body = {"ignore_eos": body.pop("ignore_eos")}
        timing = StreamTiming(sent=time.perf_counter())
        stream = await resource.create(**request, **body, extra_body=extra_body)
        async with stream:  # closes the connection if we are cancelled mid-stream
            async for chunk in stream:
                timing.take(time.perf_counter(), chunk.model_dump(exclude_none=True), chat)
        return timing


class HttpClient:
    """Sends streaming requests to one target with aiohttp, and reads the SSE lines itself."""

    def __init__(self, target: Target, options: ClientOptions):
        self.target = target
        self.options = options
        self._headers = {"Authorization": f"Bearer {options.api_key}"}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def completion(self, prompt_ids: list[int], max_tokens: int) -> StreamTiming:
        return await self._send("/completions", dict(prompt=prompt_ids), max_tokens, chat=False)

    async def chat(self, messages: list[dict], max_tokens: int) -> StreamTiming:
        return await self._send("/chat/completions", dict(messages=messages), max_tokens, chat=True)

    async def _send(self, path: str, request: dict, max_tokens: int, chat: bool) -> StreamTiming:
        if self._session is None:  # made on the running loop, as aiohttp requires
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),  # the load loops bound the connections
                timeout=aiohttp.ClientTimeout(total=self.options.request_timeout_s))
        body = {**request, **_body(self.target, self.options, max_tokens)}
        timing = StreamTiming(sent=time.perf_counter())
        async with self._session.post(self.target.base_url.rstrip("/") + path, json=body,
                                      headers=self._headers) as response:
            if response.status != 200:
                retry_after = response.headers.get("Retry-After")
                raise StreamFailed(f"HTTP {response.status}: {(await response.text())[:300]}", response.status,
                                   float(retry_after) if retry_after and retry_after.isdigit() else None)
            async for line in response.content:
                now = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    raise StreamFailed(f"error event in the stream: {error}",
                                       error_type=str(error.get("type", "")) if isinstance(error, dict) else "")
                timing.take(now, chunk, chat)
        return timing


StreamingClient = HttpClient | OpenAIClient


def make_client(target: Target, options: ClientOptions) -> StreamingClient:
    return HttpClient(target, options) if options.kind is ClientKind.HTTP else OpenAIClient(target, options)


def to_record(base: RequestRecord, timing: StreamTiming, origin: float, end: float) -> RequestRecord:
    """Fills a record from a finished stream; times become seconds since the load point's origin."""
    times = timing.chunk_times
    base.start_s, base.end_s = timing.sent - origin, end - origin
    base.num_chunks = len(times)
    base.usage_reported = timing.output_tokens is not None
    base.output_tokens = timing.output_tokens if base.usage_reported else len(times)
    base.prompt_tokens, base.cached_tokens = timing.prompt_tokens, timing.cached_tokens
    if times:
        base.ttft_ms = (times[0] - timing.sent) * 1000
        base.itl_ms = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    base.ok = bool(times)
    base.error = "" if times else "stream ended with no output"
    return base


class SessionRunner:
    """Runs sessions against one target at one load point, appending a record per request."""

    def __init__(self, client: StreamingClient, point: LoadPoint, origin: float):
        self.client = client
        self.point = point
        self.origin = origin
        self.records: list[RequestRecord] = []

    def _blank(self, session: Session, turn: int) -> RequestRecord:
        return RequestRecord(target=self.client.target.label, load=self.point.label, session_id=session.session_id,
                             turn=turn, max_tokens=session.turns[turn].max_tokens, ok=False)

    async def run_session(self, session: Session) -> None:
        history: list[dict] = [{"role": "system", "content": session.system_text}] if session.system_text else []
        for index, turn in enumerate(session.turns):
            record = await self._one(session, index, turn, history)
            if not record.ok:
                return  # later turns depend on this one; they are recorded as not sent

    async def _one(self, session: Session, index: int, turn: Turn, history: list[dict]) -> RequestRecord:
        record = self._blank(session, index)
        self.records.append(record)
        sent, timeout_s = time.perf_counter(), self.client.options.request_timeout_s
        try:
            timing = await asyncio.wait_for(self._send(session, turn, history), timeout_s)
        except asyncio.CancelledError:
            self._fail(record, sent, "cancelled: the run's deadline passed")
            raise
        except TimeoutError:
            self._fail(record, sent, f"timed out after {timeout_s:g} s")
            logger.warning("[%s %s session %d turn %d] %s", record.target, record.load, record.session_id,
                           index, record.error)
            return record
        except (openai.OpenAIError, aiohttp.ClientError, OSError, StreamFailed, ValueError) as e:
            self._fail(record, sent, f"{type(e).__name__}: {e}")
            logger.warning("[%s %s session %d turn %d] failed: %s", record.target, record.load,
                           record.session_id, index, record.error)
            return record
        to_record(record, timing, self.origin, time.perf_counter())
        if session.is_chat and record.ok:
            history.append({"role": "user", "content": turn.user_text})
            history.append({"role": "assistant", "content": timing.text})
        return record

    async def _send(self, session: Session, turn: Turn, history: list[dict]) -> StreamTiming:
        if session.is_chat:
            messages = history + [{"role": "user", "content": turn.user_text}]
            return await self.client.chat(messages, turn.max_tokens)
        return await self.client.completion(list(turn.prompt_ids), turn.max_tokens)

    def _fail(self, record: RequestRecord, sent: float, error: str) -> None:
        record.start_s, record.end_s = sent - self.origin, time.perf_counter() - self.origin
        record.ok, record.error = False, error

    def add_unsent(self, sessions: list[Session]) -> None:
        """Records every planned request that never went out (deadline, or an earlier turn failed)."""
        seen = {(r.session_id, r.turn) for r in self.records}
        broken = {r.session_id for r in self.records if not r.ok}
        for session in sessions:
            why = "an earlier turn failed" if session.session_id in broken else "the run's deadline passed"
            for turn in range(session.num_requests):
                if (session.session_id, turn) not in seen:
                    record = self._blank(session, turn)
                    record.error = f"not sent: {why}"
                    self.records.append(record)


async def run_closed(runner: SessionRunner, sessions: list[Session], concurrency: int) -> None:
    """`concurrency` loops, each taking the next session as soon as its last one finished."""
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)

    async def loop() -> None:
        while not queue.empty():
            await runner.run_session(queue.get_nowait())

    await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))


async def run_open(runner: SessionRunner, sessions: list[Session], rate_per_s: float, seed: int) -> None:
    """Starts session i at its Poisson arrival time, whatever is still in flight."""
    arrivals = poisson_arrivals(rate_per_s, len(sessions), seed)
    tasks = []
    try:
        for session, at in zip(sessions, arrivals):
            await asyncio.sleep(max(0.0, runner.origin + at - time.perf_counter()))
            tasks.append(asyncio.create_task(runner.run_session(session)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_load_point(client: StreamingClient, point: LoadPoint, sessions: list[Session],
                         seed: int, budget_s: float) -> list[RequestRecord]:
    """Runs every session at one load point within budget_s; one record per planned request."""
    runner = SessionRunner(client, point, origin=time.perf_counter())
    if point.mode is LoadMode.CLOSED:
        work = run_closed(runner, sessions, point.concurrency)
    else:
        work = run_open(runner, sessions, point.value, seed)
    try:
        await asyncio.wait_for(work, timeout=max(0.0, budget_s))
    except TimeoutError:
        logger.warning("[%s %s] the run's deadline passed; cut short", client.target.label, point.label)
    runner.add_unsent(sessions)
    return runner.records
