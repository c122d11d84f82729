"""The frontend's Prometheus metrics.

gunicorn runs several worker processes, so the metrics use prometheus_client's multiprocess
mode: each process writes to files in PROMETHEUS_MULTIPROC_DIR (set by app/gunicorn_conf.py
before anything imports prometheus_client), and /metrics sums them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("llmq_frontend_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
# By the name of the API key a request carried (app/auth.py), never the key itself.
KEY_REQUESTS = Counter("llmq_frontend_api_key_requests_total", "Authenticated HTTP requests by API key name and status",
                       ["api_key", "status"])
IN_FLIGHT = Gauge("llmq_frontend_requests_in_flight", "Requests being served, streams included",
                  multiprocess_mode="livesum")
TTFT = Histogram("llmq_frontend_time_to_first_token_seconds", "From enqueue to the first token",
                 buckets=LATENCY_BUCKETS)
ITL = Histogram("llmq_frontend_inter_token_latency_seconds", "Between successive output deltas",
                buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("llmq_frontend_queue_wait_seconds", "From enqueue until a worker took the request",
                       buckets=LATENCY_BUCKETS)
REFUSED = Counter("llmq_frontend_refused_total",
                  "Generation requests refused with 429, by the limit they met (process, deployment)", ["reason"])
REFUSAL_SECONDS = Histogram("llmq_frontend_refusal_seconds",
                            "From a refused request's accept to its 429 being written (its wait in the listen "
                            "backlog is not in it)", ["where"],
                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
PROMPT_TOKENS = Counter("llmq_frontend_prompt_tokens_total", "Prompt tokens of served requests")
MIGRATIONS = Counter("llmq_frontend_migrations_total",
                     "Sub-requests moved to another worker after theirs was lost (app/migration.py), by reason",
                     ["reason"])
MIGRATION_FAILURES = Counter("llmq_frontend_migration_failures_total",
                             "Sub-requests that had to move and could not: limit, unresumable, no_worker", ["reason"])
RESENDS = Counter("llmq_frontend_resends_total",
                  "Unaccepted sub-requests sent again because a worker that may have held them was lost")
# "end" is the usual one; "full_socket" counts clients that did not keep up with their stream.
STREAM_HANDBACKS = Counter("llmq_frontend_stream_handbacks_total",
                           "Streams the stream reader handed back to their request thread (app/sink.py), by why",
                           ["reason"])
COMPLETION_TOKENS = Counter("llmq_frontend_completion_tokens_total", "Completion tokens streamed to clients")
PROMPTS_REFUSED_BY_SIZE = Counter("llmq_frontend_prompts_refused_by_size_total",
                                  "Prompts refused as too long from their size in bytes, before tokenizing")
# The catch-all error handler's count: anything here is a bug, not a client's mistake.
UNHANDLED_ERRORS = Counter("llmq_frontend_unhandled_errors_total", "Requests that reached the catch-all error handler")


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
