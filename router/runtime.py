"""What a router worker is: its index kept current, its lease, and how it forwards a request.

A plain class, created by router/lifecycle.py on Celery's worker signals, and usable without a
broker: a test can build one and call ``route`` directly.
"""

from __future__ import annotations

import logging
import threading
import time

import msgspec
import redis

from config import Settings
from router.service import NoCandidates, RouterService, router_hit_rate
from tasks import redis_conn
from tasks.messages import GenerateRequest, Routed
from tasks.queues import worker_queue
from tasks.runtime import Forward
from workers.heartbeat import Heartbeat
from workers.metrics import WorkerMetrics
from workers.outputs import OutputWriter, reject_malformed

logger = logging.getLogger(__name__)


class RouterRuntime:
    """A router worker: keeps the KV index current and forwards each request to a worker queue."""

    # How often the index catches up with the event stream while no request arrives.
    CATCH_UP_INTERVAL_S = 0.5

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        self.settings = settings
        self.worker_id = worker_id
        self.redis = redis_conn.client(settings, health_check_interval=30)
        self.service = RouterService(settings, self.redis)
        self.metrics = WorkerMetrics("router", self._router_figures, counters={"num_events_applied"})
        self.decision_seconds = self.metrics.histogram("llmq_router_decision_seconds", "Time to choose a worker")
        self.heartbeat = Heartbeat(self.redis, worker_id, "router", queues,
                                   interval_s=settings.workers.heartbeat_interval_s,
                                   lease_s=settings.workers.lease_s, load=self._index_figures,
                                   metrics_address=self.metrics.serve(settings.workers))
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="kv-index", daemon=True)

    def _index_figures(self) -> dict:
        shared = self.service.shared
        with shared.lock:
            return dict(index_blocks=shared.index.blocks_per_worker(), num_events_applied=shared.num_events_applied)

    def _router_figures(self) -> dict:
        figures = self._index_figures()
        figures["index_size_blocks"] = self.service.index.num_blocks
        figures["overlap_hit_rate"] = router_hit_rate(self.redis)
        return figures

    def start(self) -> None:
        started = time.monotonic()
        applied = self.service.events.replay()
        if self.service.index.num_blocks == 0 and self.service.events.shared.cursor == "0-0":
            logger.info("router %s: no index snapshot and no KV events in Redis; the index starts empty",
                        self.worker_id)
        logger.info("router %s (%s) replayed %d KV events into %d blocks in %.2fs", self.worker_id,
                    self.settings.router.mode, applied, self.service.index.num_blocks, time.monotonic() - started)
        self._follower.start()

    def stop(self) -> None:
        self._stop.set()
        self.heartbeat.stop()
        self._follower.join(timeout=5)

    def _follow(self) -> None:
        outage = False
        while not self._stop.wait(self.CATCH_UP_INTERVAL_S):
            try:
                if outage:  # Redis may have come back without its data
                    self.service.events.resync()
                    outage = False
                self.service.events.catch_up()
                self.service.snapshots.save_if_due()
                self.service.members.refresh()
            except redis.RedisError as e:
                outage = True
                logger.warning("router could not read KV events: %s", e)

    def reject_malformed(self, payload: object, reason: str) -> None:
        reject_malformed(self.redis, payload, reason, self.settings.workers.stream_ttl_s)

    def route(self, req: GenerateRequest, forward: Forward) -> None:
        """Picks a worker and hands the request on to its own queue with ``forward``."""
        out = OutputWriter(self.redis, req.request_id, self.settings.workers.stream_ttl_s)
        started = time.perf_counter()
        try:
            decision = self.service.decide(req.prompt_token_ids, req.exclude_workers)
        except NoCandidates as e:
            logger.warning("[%s] cannot route: %s", req.request_id, e)
            out.fail(503, "service_unavailable", str(e))
            return
        self.decision_seconds.observe(time.perf_counter() - started)
        out.write([Routed(decision.worker_id, decision.mode, decision.overlap_blocks, decision.prompt_blocks)])
        # The overlap tells the chosen decode worker how much of the prompt it need not prefill.
        hit_tokens = decision.overlap_blocks * self.settings.engine.block_size
        forward(msgspec.structs.replace(req, prefix_hit_tokens=hit_tokens), worker_queue(decision.worker_id))
        costs = "".join(f"; cost {c.worker_id} {c.cost:g} (decode {c.decode_blocks}, {c.num_requests} req, "
                        f"recent work {c.recent_work:.1f})"
                        for c in sorted(decision.candidates, key=lambda c: c.worker_id))
        logger.info("[%s] routed to %s (%s): overlap %d/%d blocks%s; in %.2fms", req.request_id,
                    decision.worker_id, decision.mode, decision.overlap_blocks, decision.prompt_blocks, costs,
                    (time.perf_counter() - started) * 1000)
