"""A worker's Prometheus metrics, served on its own port.

A Celery worker here is one process (thread pool), so plain prometheus_client suffices. Gauges
are read from the runtime at scrape time, never copied, so they cannot go stale.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class FigureCollector(Collector):
    """Exposes a dict of figures (from the heartbeat's load function) as gauges and counters."""

    def __init__(self, role: str, figures: Callable[[], dict], counters: set[str]):
        self._role = role
        self._figures = figures
        self._counters = counters

    def collect(self):
        for name, value in self._figures().items():
            if isinstance(value, dict):
                family = GaugeMetricFamily(f"llmq_{self._role}_{name}", name.replace("_", " "), labels=["worker"])
                for worker, v in value.items():
                    family.add_metric([worker], v)
            elif name in self._counters:
                family = CounterMetricFamily(f"llmq_{self._role}_{name}", name.replace("_", " "), value=value)
            else:
                family = GaugeMetricFamily(f"llmq_{self._role}_{name}", name.replace("_", " "), value=value)
            yield family


class WorkerMetrics:
    def __init__(self, role: str, figures: Callable[[], dict], counters: set[str]):
        self.registry = CollectorRegistry()
        self.registry.register(FigureCollector(role, figures, counters))
        self.requests = Counter(f"llmq_{role}_requests_total", "Requests finished, by outcome", ["outcome"],
                                registry=self.registry)

    def histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)

    def serve(self, port: int, advertise_host: str) -> str:
        """Starts the /metrics server; returns the host:port others should scrape."""
        server, _thread = start_http_server(port, registry=self.registry)
        host = advertise_host or this_host()
        address = f"{host}:{server.server_port}"
        logger.info("metrics on http://%s/metrics", address)
        return address


def this_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
