"""gunicorn settings, taken from the deployment config: ``gunicorn -c app/gunicorn_conf.py``.

gthread workers: each open request holds one thread, mostly blocked on Redis. Admission control
keeps ``frontend.reserved_threads`` of each process's threads for everything but generation, so
``frontend.workers x (frontend.threads - frontend.reserved_threads)`` generation requests (4 x 64 =
256 by default) stay open at once per frontend, at most.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
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
    if _settings.frontend.worker_nice:
        # Before the worker starts a thread: Linux keeps a niceness per thread, and threads
        # inherit their creator's.
        os.nice(_settings.frontend.worker_nice)


# -- the gate (frontend.gate, app/gate.py) ------------------------------------------------------
# It owns the public socket; gunicorn binds a private Unix socket nobody connects to, and each
# worker opens the gate's channel (LLMQ_GATE_SOCKET, inherited through the fork).
_gate_dir = tempfile.mkdtemp(prefix="llmq-gate-") if _settings.frontend.gate else ""
_gate_proc: subprocess.Popen | None = None
# app.gunicorn_worker.GATE_SOCKET_ENV, not imported: nothing may import prometheus_client before
# PROMETHEUS_MULTIPROC_DIR is set.
GATE_SOCKET_ENV = "LLMQ_GATE_SOCKET"
if _settings.frontend.gate:
    os.environ[GATE_SOCKET_ENV] = os.path.join(_gate_dir, "gate.sock")


def on_starting(server):
    # In the master, before it binds or forks: the public socket is bound here, so that a port
    # in use fails the start as gunicorn's own bind would.
    global _gate_proc
    if not _settings.frontend.gate:
        return
    public = socket.create_server((_settings.frontend.host, _settings.frontend.port), backlog=backlog,
                                  family=socket.AF_INET6 if ":" in _settings.frontend.host else socket.AF_INET)
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel.bind(os.environ[GATE_SOCKET_ENV])
    channel.listen(64)
    with public, channel:
        _gate_proc = subprocess.Popen(
            [sys.executable, "-m", "app.gate", "--listen-fd", str(public.fileno()),
             "--channel-fd", str(channel.fileno())],
            pass_fds=(public.fileno(), channel.fileno()), cwd=os.path.dirname(os.path.dirname(__file__)),
            # A session of its own: under autogroup the CPU is shared between sessions first, and
            # in gunicorn's the gate would be one process of five (placement.set_niceness).
            start_new_session=True)
    server.log.info("gate started (pid %d) on %s:%d", _gate_proc.pid, _settings.frontend.host,
                    _settings.frontend.port)


def on_exit(server):
    if _gate_proc is not None:
        _gate_proc.terminate()
        try:
            _gate_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _gate_proc.kill()
            _gate_proc.wait()
    if _gate_dir:
        shutil.rmtree(_gate_dir, ignore_errors=True)


def post_worker_init(worker):
    # Each process opens its connections before it accepts, not inside its first requests.
    worker.wsgi.extensions["llmq.gateway"].connect()


def worker_exit(server, worker):
    # In the worker process, on a clean exit: its wake stream goes now, not at its TTL.
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["llmq.gateway"].streams.stop()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

wsgi_app = "app:create_app()"
bind = (f"unix:{_gate_dir}/gunicorn.sock" if _settings.frontend.gate
        else f"{_settings.frontend.host}:{_settings.frontend.port}")
workers = _settings.frontend.workers
# gthread, with a lane of its own for /health and /metrics, and the requests gunicorn refuses
# itself (a header over its default limits of 8190 bytes a field and 100 fields, a request line
# over 4094 bytes) answered in OpenAI's error shape (app/gunicorn_worker.py).
worker_class = "app.gunicorn_worker.FrontendWorker"
threads = _settings.frontend.threads
# Each process accepts up to this many connections and queues the ones its threads cannot serve
# yet. That queue cannot hold a request behind streams: admission control (app/admission.py)
# keeps frontend.reserved_threads threads of every process free of generation, so whatever waits
# there (refusals, /v1/models) is served in milliseconds. Accepting well past the threads is what
# lets /health and /metrics out of the listen backlog at once during a burst, into their own
# lane; 4 x threads holds a burst of 800 on the default 4 x 80 in the processes, not the kernel.
worker_connections = 4 * threads
# The kernel's queue of connections no process has accepted yet (gunicorn's default, 2048, is
# under the default net.core.somaxconn of 4096): a burst past the processes waits there instead
# of having its SYNs dropped and retried a second later.
backlog = 2048
# Load the tokenizer once in the master; workers share it after fork.
preload_app = True
# The worker's own liveness timeout; a long stream is not a hung worker under gthread.
timeout = 60
graceful_timeout = 30
# A kept-alive connection's next request takes the probe lane as a new one's first does (the
# worker peeks at each request's first bytes), and idle ones give way to new connections.
keepalive = _settings.frontend.keepalive_s
loglevel = _settings.log_level.lower()
accesslog = "-"
errorlog = "-"
proc_name = "llmq-frontend"
