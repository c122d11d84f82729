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

from config import WorkerConfig

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

    def serve(self, workers: WorkerConfig) -> str:
        """Starts the /metrics server on workers.metrics_listen_host (127.0.0.1 unless a setting
        says otherwise); returns the host:port others should scrape."""
        listen = workers.metrics_listen_host
        try:
            server, _thread = start_http_server(workers.metrics_port, addr=listen, registry=self.registry)
        except OSError as e:
            source = "workers.metrics_host" if workers.metrics_host else "workers.advertise_host"
            raise RuntimeError(f"/metrics cannot listen on {listen}:{workers.metrics_port} ({source}): {e}; "
                               f"set workers.metrics_host to an address of this host (0.0.0.0: all)") from e
        address = f"{advertised_host(workers)}:{server.server_port}"
        logger.info("metrics on http://%s/metrics (listening on %s)", address, listen)
        return address


def advertised_host(workers: WorkerConfig) -> str:
    """The host others reach /metrics on: advertise_host, else the address it listens on, unless
    that is every interface."""
    if workers.advertise_host:
        return workers.advertise_host
    listen = workers.metrics_listen_host
    return this_host() if listen in ("0.0.0.0", "::") else listen


def this_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
