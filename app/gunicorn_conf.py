"""gunicorn settings, taken from the deployment config: ``gunicorn -c app/gunicorn_conf.py``.

gthread workers: each open request holds one thread, mostly blocked on Redis, so
``frontend.workers x frontend.threads`` is how many streaming clients stay open at once
(4 x 80 = 320 by default).
"""

import glob
import os
import tempfile

import placement
from config import load_settings

_settings = load_settings()

# Metrics from all gunicorn workers are summed from files in this folder (app/metrics.py). It must
# be set before the app, and so prometheus_client, is imported, and start empty.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llmq-frontend-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
for _stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(_stale)  # counts from an earlier run would otherwise be summed in


# Collections off in the master, its heap frozen before each fork, on again in each worker, so
# that the workers' collections do not copy the heap they share with it (placement.py).
_gc = placement.PreforkFreeze(_settings.frontend.gc_freeze)
_gc.in_master()


def pre_fork(server, worker):
    _gc.before_fork()


def post_fork(server, worker):
    _gc.after_fork()


def post_worker_init(worker):
    # Each process opens its connections before it accepts, not inside its first requests.
    worker.wsgi.extensions["llmq.gateway"].connect()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

wsgi_app = "app:create_app()"
bind = f"{_settings.frontend.host}:{_settings.frontend.port}"
workers = _settings.frontend.workers
# gthread, answering the requests gunicorn refuses itself (a header over its default limits of
# 8190 bytes a field and 100 fields, a request line over 4094 bytes) in OpenAI's error shape.
worker_class = "app.gunicorn_worker.JsonErrorThreadWorker"
threads = _settings.frontend.threads
# A gthread worker accepts up to worker_connections (default 1000) and queues what its threads
# cannot serve yet. A stream holds its thread for minutes, so a request queued behind streams in
# one worker would wait for them (even a /metrics scrape) while another worker has threads free.
# Accepting no more than it has threads leaves the surplus in the listen backlog, where whichever
# worker frees a thread first takes it.
worker_connections = threads
# Load the tokenizer once in the master; workers share it after fork.
preload_app = True
# The worker's own liveness timeout; a long stream is not a hung worker under gthread.
timeout = 60
graceful_timeout = 30
# Off: with worker_connections == threads gunicorn has no room to park idle kept-alive
# connections, and each would hold a thread. A new local TCP connection costs well under 1 ms.
keepalive = 0
loglevel = _settings.log_level.lower()
accesslog = "-"
errorlog = "-"
proc_name = "llmq-frontend"
