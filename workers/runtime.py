"""What one worker process is: its role, its engine, its heartbeat, and how it serves a request.

Plain classes, created by workers/lifecycle.py on Celery's worker signals, and usable without a
broker: a test can build a WorkerRuntime and call ``serve`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time

import redis

from config import Settings
from router.service import NoCandidates, RouterService, router_hit_rate
from tasks import keys
from kvtransfer import registry as kv_registry
from kvtransfer.connector import engine_id_for, side_channel, transfer_config
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from tasks.messages import (Accepted, Finished, GenerateRequest, PrefillRequest, Routed, prefill_to_task_arg,
                            task_argsrepr)
from tasks.queues import PREFILL_TASK
from workers.disagg import PrefillServer, RemotePrefill
from workers.engine import EngineHost
from workers.heartbeat import Heartbeat
from workers.metrics import WorkerMetrics, this_host
from workers.kv_events import KvEventForwarder, kv_events_config, kv_events_endpoint
from workers.outputs import BatchedStreamWriter, OutputWriter, deltas_from, reject_malformed

logger = logging.getLogger(__name__)

# Figures that only ever grow; Prometheus gets them as counters.
COUNTER_FIGURES = {"prefix_cache_queries", "prefix_cache_hits", "num_batched_steps", "num_remote_prefills",
                   "num_local_fallbacks", "num_prefills_served", "num_prefills_dropped", "num_prefill_done_notices",
                   "kv_transfer_bytes", "kv_transfer_seconds"}

# How often a running request looks for the frontend's cancel flag (client went away).
CANCEL_CHECK_INTERVAL_S = 0.5

_current: WorkerRuntime | None = None


def current_runtime() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("no worker runtime in this process: tasks run only inside `celery -A tasks worker`")
    return _current


def set_current_runtime(runtime: WorkerRuntime | None) -> None:
    global _current
    _current = runtime


class WorkerRuntime:
    def __init__(self, settings: Settings, worker_id: str, role: str, queues: list[str]):
        self.settings = settings
        self.worker_id = worker_id
        self.role = role
        self.redis = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        extra_engine_args = {}
        self.kv_events: KvEventForwarder | None = None
        if settings.router.mode == "kv":
            # KV routing needs to know what each engine caches; others skip the overhead.
            endpoint = kv_events_endpoint(worker_id)
            extra_engine_args["kv_events_config"] = kv_events_config(endpoint)
            self.kv_events = KvEventForwarder(self.redis, worker_id, endpoint, settings.router.kv_events_maxlen)
        self.disagg = DisaggCounters()
        self.nixl: NixlEndpoint | None = None
        self.remote_prefill: RemotePrefill | None = None
        if settings.disagg.enabled:
            extra_engine_args["kv_transfer_config"] = self._claim_nixl_side_channel()
            if role == "decode":
                self.remote_prefill = RemotePrefill(settings, worker_id, self._send_prefill, self.disagg)
        self.engine = EngineHost(settings, extra_engine_args)
        self.prefill_server: PrefillServer | None = None
        if settings.disagg.enabled and role == "prefill":
            self.prefill_server = PrefillServer(settings, worker_id, self.engine, self.redis, self.nixl, self.disagg)
        self._aredis = None
        self._writer: BatchedStreamWriter | None = None
        self.metrics = WorkerMetrics(role, self._metric_figures, counters=COUNTER_FIGURES)
        self.heartbeat = Heartbeat(
            self.redis, worker_id, role, queues,
            interval_s=settings.workers.heartbeat_interval_s,
            lease_s=settings.workers.lease_s,
            load=self._load_figures,
            metrics_address=self.metrics.serve(settings.workers.metrics_port, settings.workers.advertise_host),
            on_beat=self._register_nixl if self.nixl else None,
        )

    def _claim_nixl_side_channel(self):
        host, port = side_channel(self.settings.workers.advertise_host or this_host())
        engine_id = engine_id_for(self.worker_id)
        connector = self.settings.disagg.connector
        self.nixl = NixlEndpoint(engine_id, self.worker_id, self.role, host, port, connector)
        logger.info("NIXL side channel %s:%d (engine %s, %s connector)", host, port, engine_id, connector)
        d = self.settings.disagg
        return transfer_config(self.role, engine_id, connector, d.nixl_progress_delay_us,
                               push_registration_timeout_s=d.push_registration_timeout_s, kv_lease_s=d.kv_lease_s)

    def _register_nixl(self) -> None:
        kv_registry.register(self.redis, self.nixl, self.settings.workers.lease_s)

    def _send_prefill(self, preq: PrefillRequest) -> None:
        from tasks import app

        app.send_task(PREFILL_TASK, args=[prefill_to_task_arg(preq)], argsrepr=task_argsrepr(preq))

    def start(self) -> None:
        self.engine.start()
        if self.kv_events is not None:
            self.kv_events.start()
        # Its lease (self.heartbeat) goes up once Celery consumes: workers/lifecycle.py.
        logger.info("worker %s: engine up, serving as %s", self.worker_id, self.role)

    def stop(self) -> None:
        self.heartbeat.stop()
        if self.nixl is not None:
            kv_registry.unregister(self.redis, self.nixl.engine_id)
        if self.kv_events is not None:
            self.kv_events.stop()
        self.engine.shutdown()
        logger.info("worker %s stopped", self.worker_id)

    def _metric_figures(self) -> dict:
        figures = self._load_figures()
        queries = figures["prefix_cache_queries"]
        figures["prefix_cache_hit_rate"] = figures["prefix_cache_hits"] / queries if queries else 0.0
        return figures

    def _load_figures(self) -> dict:
        load = self.engine.load
        total = self.engine.num_kv_blocks
        return dict(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            kv_blocks_used=round(load.kv_cache_usage * total),
            kv_blocks_total=total,
            max_running_seen=load.max_running_seen,
            num_batched_steps=load.num_batched_steps,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
            kv_transfer_bytes=load.transfers.bytes_transferred,
            kv_transfer_seconds=load.transfers.transfer_seconds,
            **vars(self.disagg),
        )

    # -- serving ---------------------------------------------------------------------------

    def serve(self, req: GenerateRequest) -> None:
        """Runs on a Celery task thread; the token stream itself runs on the engine's loop."""
        rid = req.request_id
        out = OutputWriter(self.redis, rid, self.settings.workers.stream_ttl_s)
        if time.time() >= req.deadline_unix:
            logger.warning("[%s] dropped: deadline passed while queued", rid)
            out.fail(504, "timeout", "the request waited in the queue past its deadline")
            return
        out.write([Accepted(worker_id=self.worker_id)])
        started = time.monotonic()
        try:
            num_tokens, last = self.engine.run(self._stream(req)).result()
        except TimeoutError:
            self.metrics.requests.labels("timeout").inc()
            logger.warning("[%s] deadline passed during generation; aborted", rid)
            out.fail(504, "timeout", "generation did not finish before the request deadline")
        except Exception as e:  # noqa: BLE001  every failure must reach the client as an event
            self.metrics.requests.labels("failed").inc()
            self._fail(req, out, e)
        else:
            if last is None:
                self.metrics.requests.labels("cancelled").inc()
                logger.info("[%s] client went away; aborted after %d tokens", rid, num_tokens)
                return
            out.write([Finished(num_prompt_tokens=len(req.prompt_token_ids),
                                num_cached_tokens=last.num_cached_tokens or 0)])
            self.metrics.requests.labels("finished").inc()
            logger.info("[%s] done: prompt=%d completion=%d cached=%d in %.3fs", rid,
                        len(req.prompt_token_ids), num_tokens, last.num_cached_tokens or 0,
                        time.monotonic() - started)

    async def _stream(self, req: GenerateRequest):
        """Relays engine outputs to the request's stream, on the engine's loop. Returns
        (tokens, last output), or (tokens, None) if the client cancelled. Raises TimeoutError
        past the deadline; leaving early in any way aborts the request in the engine."""
        rid = req.request_id
        aredis, writer = await self._async_redis()
        num_tokens, last = 0, None
        loop = asyncio.get_running_loop()
        next_cancel_check = loop.time() + CANCEL_CHECK_INTERVAL_S
        async with asyncio.timeout(req.deadline_unix - time.time()):
            kv_params = None
            if self.remote_prefill is not None:
                kv_params = await self.remote_prefill.kv_transfer_params(aredis, req)
            generation = self.engine.generate(rid, req.prompt_token_ids, req.sampling, kv_transfer_params=kv_params)
            async with contextlib.aclosing(generation) as outputs:
                async for output in outputs:
                    events = deltas_from(output, req.sampling.logprobs)
                    num_tokens += sum(len(d.token_ids) for d in events)
                    # While this write is awaited the engine keeps stepping; DELTA outputs that
                    # arrive meanwhile are merged, so a slow Redis means bigger writes, not lag.
                    await writer.write(rid, events)
                    last = output
                    if loop.time() >= next_cancel_check:
                        next_cancel_check = loop.time() + CANCEL_CHECK_INTERVAL_S
                        if await aredis.exists(keys.cancel_flag(rid)):
                            return num_tokens, None
        if kv_params is not None:
            self.remote_prefill.settle(rid, last.kv_transfer_params if last is not None else None)
        return num_tokens, last

    async def _async_redis(self) -> tuple:
        # One asyncio client and one stream writer, created on (and bound to) the engine's loop
        # on first use.
        if self._aredis is None:
            import redis.asyncio

            self._aredis = redis.asyncio.Redis.from_url(self.settings.redis_url, health_check_interval=30)
            self._writer = BatchedStreamWriter(self._aredis)
        return self._aredis, self._writer

    def serve_prefill(self, preq: PrefillRequest) -> None:
        """A prefill worker's task: compute the KV for the waiting decode worker."""
        self.prefill_server.serve(preq)

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

    def reject_malformed(self, payload: object, reason: str) -> None:
        reject_malformed(self.redis, payload, reason, self.settings.workers.stream_ttl_s)

class RouterRuntime:
    """A router worker: keeps the KV index current and forwards each request to a worker queue."""

    # How often the index catches up with the event stream while no request arrives.
    CATCH_UP_INTERVAL_S = 0.5

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        self.settings = settings
        self.worker_id = worker_id
        self.redis = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        self.service = RouterService(settings, self.redis)
        self.metrics = WorkerMetrics("router", self._router_figures, counters={"num_events_applied"})
        self.decision_seconds = self.metrics.histogram("llmq_router_decision_seconds", "Time to choose a worker")
        self.heartbeat = Heartbeat(self.redis, worker_id, "router", queues,
                                   interval_s=settings.workers.heartbeat_interval_s,
                                   lease_s=settings.workers.lease_s, load=self._index_figures,
                                   metrics_address=self.metrics.serve(settings.workers.metrics_port,
                                                                      settings.workers.advertise_host))
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="kv-index", daemon=True)

    def _index_figures(self) -> dict:
        with self.service.lock:
            return dict(index_blocks=self.service.index.blocks_per_worker(),
                        num_events_applied=self.service.num_events_applied)

    def _router_figures(self) -> dict:
        figures = self._index_figures()
        figures["index_size_blocks"] = self.service.index.num_blocks
        figures["overlap_hit_rate"] = router_hit_rate(self.redis)
        return figures

    def start(self) -> None:
        started = time.monotonic()
        applied = self.service.replay()
        logger.info("router %s (%s) replayed %d KV events into %d blocks in %.2fs", self.worker_id,
                    self.settings.router.mode, applied, self.service.index.num_blocks, time.monotonic() - started)
        self._follower.start()

    def stop(self) -> None:
        self._stop.set()
        self.heartbeat.stop()
        self._follower.join(timeout=5)

    def _follow(self) -> None:
        while not self._stop.wait(self.CATCH_UP_INTERVAL_S):
            try:
                self.service.catch_up()
                self.service.maybe_snapshot()
                self.service.live_workers()
            except redis.RedisError as e:
                logger.warning("router could not read KV events: %s", e)

    def reject_malformed(self, payload: object, reason: str) -> None:
        reject_malformed(self.redis, payload, reason, self.settings.workers.stream_ttl_s)

    def route(self, req: GenerateRequest, payload: dict, send) -> None:
        """Picks a worker and hands the request to its own queue via ``send(payload, queue)``."""
        from tasks.queues import worker_queue

        out = OutputWriter(self.redis, req.request_id, self.settings.workers.stream_ttl_s)
        started = time.perf_counter()
        try:
            decision = self.service.decide(req.prompt_token_ids)
        except NoCandidates as e:
            logger.warning("[%s] cannot route: %s", req.request_id, e)
            out.fail(503, "service_unavailable", str(e))
            return
        self.decision_seconds.observe(time.perf_counter() - started)
        out.write([Routed(decision.worker_id, decision.mode, decision.overlap_blocks, decision.prompt_blocks)])
        # The overlap tells the chosen decode worker how much of the prompt it need not prefill.
        hit_tokens = decision.overlap_blocks * self.settings.engine.block_size
        send({**payload, "prefix_hit_tokens": hit_tokens}, worker_queue(decision.worker_id))
        costs = "".join(f"; cost {w} {c:g}" for w, c in sorted(decision.costs.items()))
        logger.info("[%s] routed to %s (%s): overlap %d/%d blocks%s; in %.2fms", req.request_id,
                    decision.worker_id, decision.mode, decision.overlap_blocks, decision.prompt_blocks, costs,
                    (time.perf_counter() - started) * 1000)
