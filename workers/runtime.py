"""What one worker process is: its role, its engine, its heartbeat, and how it serves a request.

Plain classes, created by workers/lifecycle.py on Celery's worker signals, and usable without a
broker: a test can build a DecodeRuntime and call ``serve`` directly. One class per role:
``WorkerRuntime`` holds what every engine worker has, ``DecodeRuntime`` (workers/decode.py) and
``PrefillRuntime`` (workers/prefill.py) what only their role has.
"""

from __future__ import annotations

import logging
import os

from config import Settings
from kvtransfer import registry as kv_registry
from kvtransfer.connector import engine_id_for, side_channel, transfer_config
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from tasks import redis_conn
from workers.engine import EngineHost
from workers.heartbeat import Heartbeat
from workers.kv_events import KvEventForwarder, kv_events_config, kv_events_endpoint
from workers.metrics import WorkerMetrics, this_host
from workers.outputs import reject_malformed

logger = logging.getLogger(__name__)

# Figures that only ever grow; Prometheus gets them as counters.
COUNTER_FIGURES = {"prefix_cache_queries", "prefix_cache_hits", "num_batched_steps", "num_remote_prefills",
                   "num_local_fallbacks", "num_local_by_backlog", "num_prefills_served", "num_prefills_dropped",
                   "num_prefill_done_notices", "kv_transfer_bytes", "kv_transfer_seconds", "scheduler_moves"}

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
        self.redis = redis_conn.client(settings, health_check_interval=30)
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
            metrics_address=self.metrics.serve(settings.workers),
            on_beat=self._register_nixl if self.nixl else None,
        )

    def _claim_nixl_side_channel(self):
        channel = side_channel(self.settings.workers.advertise_host or this_host())
        host, port = channel
        engine_id = engine_id_for(self.worker_id)
        connector = self.settings.disagg.connector
        self.nixl = NixlEndpoint(engine_id, self.worker_id, self.role, host, port, connector)
        logger.info("NIXL side channel %s:%d (engine %s, %s connector)", host, port, engine_id, connector)
        d = self.settings.disagg
        transfer = transfer_config(self.role, engine_id, connector, d.nixl_progress_delay_us,
                                   push_registration_timeout_s=d.push_registration_timeout_s, kv_lease_s=d.kv_lease_s,
                                   huge_pages=d.kv_huge_pages)
        os.environ.update(channel.env | transfer.env)  # for the engine's processes, which spawn from this one
        return transfer.config

    def _register_nixl(self) -> None:
        if self.nixl is not None:  # on_beat only when there is one (__init__)
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
        scheduler = self.engine.scheduler
        if scheduler.adapts:  # where the scheduler moves with the load (placement.AdaptiveScheduler)
            figures["scheduler_pinned"] = int(scheduler.pinned)
            figures["scheduler_moves"] = scheduler.moves
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
