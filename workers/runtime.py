"""What one worker process is: its role, its engine, its heartbeat, and how it serves a request.

Plain classes, created by workers/lifecycle.py on Celery's worker signals, and usable without a
broker: a test can build a DecodeRuntime and call ``serve`` directly. One class per role:
``WorkerRuntime`` holds what every engine worker has, ``DecodeRuntime`` (workers/decode.py) and
``PrefillRuntime`` (workers/prefill.py) what only their role has.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from config import Settings
from router.service import NoCandidates, RouterService, router_hit_rate
from kvtransfer import registry as kv_registry
from kvtransfer.connector import engine_id_for, side_channel, transfer_config
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from tasks.messages import GenerateRequest, Routed
from workers.engine import EngineHost
from workers.heartbeat import Heartbeat
from workers.metrics import WorkerMetrics, this_host
from workers.kv_events import KvEventForwarder, kv_events_config, kv_events_endpoint
from workers.outputs import OutputWriter, reject_malformed

logger = logging.getLogger(__name__)

# Figures that only ever grow; Prometheus gets them as counters.
COUNTER_FIGURES = {"prefix_cache_queries", "prefix_cache_hits", "num_batched_steps", "num_remote_prefills",
                   "num_local_fallbacks", "num_prefills_served", "num_prefills_dropped", "num_prefill_done_notices",
                   "kv_transfer_bytes", "kv_transfer_seconds"}

_current: WorkerRuntime | None = None


def current_runtime() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("no worker runtime in this process: tasks run only inside `celery -A tasks worker`")
    return _current


def set_current_runtime(runtime: WorkerRuntime | None) -> None:
    global _current
    _current = runtime


class WorkerRuntime:
    """What every engine worker has: its engine, heartbeat and metrics; the KV-event forwarder
    when the router routes on KV; its NIXL side channel, registered while it lives, when
    prefill is disaggregated. A subclass per role adds how that role serves its tasks."""

    role: str

    @staticmethod
    def for_role(role: str) -> type[WorkerRuntime]:
        """The runtime class of an engine role. Imported here: the role modules import this one."""
        from workers.decode import DecodeRuntime
        from workers.prefill import PrefillRuntime

        return {"decode": DecodeRuntime, "prefill": PrefillRuntime}[role]

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        self.settings = settings
        self.worker_id = worker_id
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
        if settings.disagg.enabled:
            extra_engine_args["kv_transfer_config"] = self._claim_nixl_side_channel()
        self.engine = EngineHost(settings, extra_engine_args)
        self.metrics = WorkerMetrics(self.role, self._metric_figures, counters=COUNTER_FIGURES)
        self.heartbeat = Heartbeat(
            self.redis, worker_id, self.role, queues,
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
