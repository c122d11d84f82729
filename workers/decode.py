"""A decode worker: generates each request's tokens into its stream, prefilling the prompt
itself or, with disaggregation on and a long enough prompt, taking a remote prefill."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from config import Settings
from tasks import keys
from tasks.messages import Finished, GenerateRequest, PrefillRequest, prefill_to_task_arg, task_argsrepr
from tasks.queues import PREFILL_TASK
from workers.disagg import DecodeLeg, RemotePrefill
from workers.outputs import ACCEPTED, CANCELLED, BatchedStreamWriter, DeltaMaker, OutputWriter
from workers.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

# How often a running request looks for the frontend's cancel flag (client went away).
CANCEL_CHECK_INTERVAL_S = 0.5
# A request's claim outlives its deadline by this much, so a clock a little behind still drops a
# late copy of its message.
CLAIM_MARGIN_S = 60


class CancelWatch:
    """Which running requests' clients went away, read for all of them in one round trip.

    Why: a request that checked its own cancel flag made one Redis round trip per interval, so a
    worker holding 128 requests made 256 a second, more than its token writes at that load
    (BatchedStreamWriter). Here one task on the engine's loop reads every watched flag in one
    pipeline per interval, while anything is watched. A read that fails is tried again at the
    next interval: the token writes of the same requests fail, and fail them, on their own."""

    def __init__(self, client, interval_s: float = CANCEL_CHECK_INTERVAL_S):
        self._client = client  # a redis.asyncio.Redis bound to the engine's loop
        self._interval_s = interval_s
        self._watched: set[str] = set()
        self._cancelled: set[str] = set()
        self._task: asyncio.Task | None = None

    def watch(self, request_id: str) -> None:
        self._watched.add(request_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def unwatch(self, request_id: str) -> None:
        self._watched.discard(request_id)
        self._cancelled.discard(request_id)

    def cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    async def _run(self) -> None:
        while self._watched:
            await asyncio.sleep(self._interval_s)
            rids = list(self._watched)
            if not rids:
                break
            pipe = self._client.pipeline(transaction=False)
            for rid in rids:
                pipe.exists(keys.cancel_flag(rid))
            try:
                flags = await pipe.execute()
            except Exception as e:  # noqa: BLE001  the loop must go on for the next interval
                logger.warning("reading cancel flags failed: %s", e)
                continue
            self._cancelled.update(rid for rid, flag in zip(rids, flags) if flag and rid in self._watched)


@dataclass(frozen=True)
class Ended:
    """How a request's generation ended, for its Finished."""

    num_cached_tokens: int


def _consume(done: asyncio.Future) -> None:
    # Reads an abandoned write's failure, so asyncio does not log it as never retrieved.
    if not done.cancelled():
        done.exception()


class DecodeRuntime(WorkerRuntime):
    role = "decode"

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        super().__init__(settings, worker_id, queues)
        # Whether, and from whom, a request's prompt KV comes: only with disaggregation.
        self.remote_prefill: RemotePrefill | None = None
        if settings.disagg.enabled:
            self.remote_prefill = RemotePrefill(settings, worker_id, self._send_prefill, self.disagg)
        self._aredis: Any = None  # redis.asyncio.Redis, built on the engine loop
        self._writer: BatchedStreamWriter | None = None
        self._cancels: CancelWatch | None = None
        # Decode engine requests that only take a remote prefill's KV (DecodeRuntime._release):
        # held, or the loop could collect them mid-run.
        self._releases: set[asyncio.Task] = set()

    def _send_prefill(self, preq: PrefillRequest) -> None:
        from tasks import app

        app.send_task(PREFILL_TASK, args=[prefill_to_task_arg(preq)], argsrepr=task_argsrepr(preq))

    def serve(self, req: GenerateRequest) -> None:
        """Runs on a Celery task thread; the token stream itself runs on the engine's loop."""
        rid = req.request_id
        out = OutputWriter(self.redis, rid, self.settings.workers.stream_ttl_s)
        if time.time() >= req.deadline_unix:
            logger.warning("[%s] dropped: deadline passed while queued", rid)
            out.fail(504, "timeout", "the request waited in the queue past its deadline")
            return
        # The claim lasts as long as any copy of the message could still run: the deadline check
        # above drops every copy after it.
        verdict = out.accept(self.worker_id, claim_ttl_s=req.deadline_unix - time.time() + CLAIM_MARGIN_S)
        if verdict != ACCEPTED:
            # Cancelled: the client went away while it queued, or the frontend resubmitted it
            # elsewhere (app/migration.py). Claimed: another copy of this message runs.
            self.metrics.requests.labels(f"dropped_{verdict}").inc()
            logger.info("[%s] dropped unrun: %s", rid, "cancelled" if verdict == CANCELLED else "already claimed")
            return
        started = time.monotonic()
        try:
            num_tokens, ended = self.engine.run(self._stream(req)).result()
        except TimeoutError:
            self.metrics.requests.labels("timeout").inc()
            logger.warning("[%s] deadline passed during generation; aborted", rid)
            out.fail(504, "timeout", "generation did not finish before the request deadline")
        except Exception as e:  # noqa: BLE001  every failure must reach the client as an event
            self.metrics.requests.labels("failed").inc()
            self._fail(req, out, e)
        else:
            if ended is None:
                self.metrics.requests.labels("cancelled").inc()
                logger.info("[%s] client went away; aborted after %d tokens", rid, num_tokens)
                return
            out.write([Finished(num_prompt_tokens=len(req.prompt_token_ids),
                                num_cached_tokens=ended.num_cached_tokens)])
            self.metrics.requests.labels("finished").inc()
            logger.info("[%s] done: prompt=%d completion=%d cached=%d in %.3fs", rid,
                        len(req.prompt_token_ids), num_tokens, ended.num_cached_tokens,
                        time.monotonic() - started)

    async def _stream(self, req: GenerateRequest):
        """Relays engine outputs to the request's stream, on the engine's loop. Returns
        (tokens, Ended), or (tokens, None) if the client cancelled. Raises TimeoutError
        past the deadline; leaving early in any way aborts the request in the engine."""
        rid = req.request_id
        aredis, writer, cancels = await self._async_redis()
        cancels.watch(rid)
        try:
            with self.engine.holding():
                return await self._relay(req, aredis, writer, cancels)
        finally:
            cancels.unwatch(rid)

    async def _relay(self, req: GenerateRequest, aredis, writer: BatchedStreamWriter, cancels: CancelWatch):
        rid = req.request_id
        num_tokens, last = 0, None
        remote = self.remote_prefill
        async with asyncio.timeout(req.deadline_unix - time.time()):
            leg = await remote.decode_leg(aredis, req) if remote is not None else None
            # At most one write of this request in flight: the previous one is awaited before the
            # next is queued, and the last before returning (Finished follows every Delta). While
            # a write is awaited the engine keeps stepping; DELTA outputs that arrive meanwhile
            # are merged, so a slow Redis means bigger writes, not lag. A write is not awaited
            # right away: its flush is done by the next step, so the relay suspends once a token,
            # on the engine's output, rather than twice.
            written: asyncio.Future | None = None
            if leg is not None and leg.first is not None:
                # The prefill engine's first token is the client's first: in Redis before the
                # decode engine's request is even added (adding a long prompt takes the loop for
                # milliseconds), and the decode engine's tokens follow it.
                await writer.write(rid, [leg.first])
                num_tokens = len(leg.first.token_ids)
                if leg.release_only:
                    assert remote is not None
                    task = asyncio.create_task(self._release(rid, leg, remote))
                    self._releases.add(task)
                    task.add_done_callback(self._releases.discard)
                    return num_tokens, Ended(0)
            prompt, sampling = (leg.prompt_token_ids, leg.sampling) if leg is not None else \
                (req.prompt_token_ids, req.sampling)
            generation = self.engine.generate(rid, prompt, sampling,
                                              kv_transfer_params=leg.kv_transfer_params if leg else None)
            deltas_from = DeltaMaker(req.sampling)
            try:
                async with contextlib.aclosing(generation) as outputs:
                    async for output in outputs:
                        events = deltas_from(output)
                        num_tokens += sum(len(d.token_ids) for d in events)
                        if written is not None:
                            await written  # raises the write's failure
                            written = None
                        if events:
                            written = writer.submit(rid, events)
                        last = output
                        if cancels.cancelled(rid):
                            return num_tokens, None
                if written is not None:
                    await written
                    written = None
            except Exception:
                # The engine failed: its earlier Deltas go in before the failure does.
                if written is not None:
                    with contextlib.suppress(Exception):
                        await written
                    written = None
                raise
            finally:
                if written is not None:  # left early: its outcome is nobody's business now
                    written.add_done_callback(_consume)
        if remote is not None and leg is not None:
            remote.settle(rid, last.kv_transfer_params if last is not None else None)
        # The decode engine's prompt may end with the first token: cached counts the prompt's.
        cached = (last.num_cached_tokens or 0) if last is not None else 0
        return num_tokens, Ended(min(cached, len(req.prompt_token_ids)))

    async def _release(self, rid: str, leg: DecodeLeg, remote: RemotePrefill) -> None:
        """Runs the decode engine's request of a remote prefill whose first token ended it: it
        takes the pushed KV, so the prefill engine's blocks go back (or its registration times
        out and it recomputes), and its token is dropped. The client has its answer already."""
        last = None
        try:
            # Under the request's own id: the prefill engine matches the registration by it.
            async for output in self.engine.generate(rid, leg.prompt_token_ids, leg.sampling,
                                                     kv_transfer_params=leg.kv_transfer_params):
                last = output
        except Exception:  # noqa: BLE001  nobody waits for it; the prefill engine's lease ends its hold
            logger.exception("[%s] the decode engine's request that takes the pushed KV failed", rid)
        else:
            remote.settle(rid, last.kv_transfer_params if last is not None else None)

    async def _async_redis(self) -> tuple:
        # One asyncio client, one stream writer and one cancel watch, created on (and bound to)
        # the engine's loop on first use.
        if self._aredis is None:
            from tasks import redis_conn

            self._aredis = redis_conn.async_client(self.settings, health_check_interval=30)
            self._writer = BatchedStreamWriter(self._aredis)
            self._cancels = CancelWatch(self._aredis)
        return self._aredis, self._writer, self._cancels

    def _fail(self, req: GenerateRequest, out: OutputWriter, error: Exception) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        rid = req.request_id
        cause = error.__cause__ if isinstance(error, EngineGenerateError) else error
        if isinstance(cause, (VLLMClientError, ValueError, TypeError)):
            logger.info("[%s] rejected by the engine: %s", rid, cause)
            out.fail(400, "invalid_request_error", str(cause))
        elif isinstance(error, EngineDeadError):
            logger.error("[%s] engine died; worker %s shuts down", rid, self.worker_id)
            out.fail(503, "engine_unavailable", "the worker's engine died; retry the request")
            self._shutdown_worker()
        else:
            logger.exception("[%s] generation failed", rid)
            out.fail(503, "server_error", f"generation failed: {type(error).__name__}: {error}")

    def _shutdown_worker(self) -> None:
        # Stop renewing the lease at once so no new work is routed here, then ask Celery for a
        # warm shutdown (the same as a first Ctrl-C): in-flight tasks end, the process exits.
        self.heartbeat.stop()
        os.kill(os.getpid(), signal.SIGTERM)
