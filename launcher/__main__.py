"""One command per deployment: ``python -m launcher serve -f configs/agg.yaml``.

It validates the config, starts Redis if none answers (and the URL is local), then the workers,
the frontend and Flower, waits until /health answers, and runs until Ctrl-C. ``--roles`` starts a
subset, which is how another node joins: point REDIS_URL at the head node and start only workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import redis

import placement
from config import ConfigError, Settings, dump_settings, load_settings
from launcher.supervisor import Child, Supervisor
from tasks import keys, queues, redis_conn

logger = logging.getLogger("launcher")

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("decode", "prefill", "router", "frontend", "flower")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _redis_answers(settings: Settings) -> bool:
    """Whether Redis answers a PING; False also when it refuses our password."""
    try:
        return bool(redis_conn.client(settings, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.AuthenticationError as e:
        # It answers, just not to us: starting another would fail on its port anyway.
        raise SystemExit(f"Redis at {redis_conn.mask(settings.redis_url)} refused the password: {e}") from None
    except (redis.RedisError, redis_conn.RedisURLError):
        return False


def ensure_redis(settings: Settings, supervisor: Supervisor, run_dir: Path, timeout_s: float = 15.0) -> None:
    """Starts a redis-server under the supervisor, which stops it with the rest, when nothing
    answers at a local redis:// URL, with requirepass when the URL or redis.password has a password
    (given in a config file only its owner reads, so that no argv or log shows it). If it dies, the
    supervisor starts it again with the same port and options; the workers and the frontend
    reconnect by themselves (README, "Failure behaviour")."""
    shown = redis_conn.mask(settings.redis_url)
    if _redis_answers(settings):
        return
    target = redis_conn.parse(settings)
    parsed = urlparse(settings.redis_url)
    if target.is_sentinel or parsed.scheme != "redis":
        raise SystemExit(f"Redis at {shown} does not answer; the launcher starts only a plain redis:// one")
    if parsed.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"Redis at {shown} does not answer, and it is not local, so it is not started here")
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("no Redis answers and redis-server is not installed (apt-get install redis-server)")
    port = str(parsed.port or 6379)
    argv = [server]
    if target.password:
        conf = run_dir / f"redis-{port}-{os.getpid()}.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"requirepass {json.dumps(target.password)}\n")  # redis.conf takes C-style quotes
        argv.append(str(conf))
    argv += ["--port", port, "--bind", parsed.hostname, "--save", "", "--appendonly", "no"]
    supervisor.start(Child("redis", argv, stop_order=9))
    deadline = time.monotonic() + timeout_s
    while not _redis_answers(settings):
        if time.monotonic() > deadline:
            raise SystemExit(f"started redis-server, but {shown} did not answer within {timeout_s:.0f}s")
        time.sleep(0.2)
    logger.info("started a local Redis at %s%s", shown, " (requirepass)" if target.password else "")


def _remove_redis_conf(run_dir: Path) -> None:
    for conf in run_dir.glob(f"redis-*-{os.getpid()}.conf"):
        conf.unlink(missing_ok=True)


def _celery_worker(name: str, queue: str, settings: Settings, stop_order: int, env: dict | None = None) -> Child:
    # Without gossip: nothing here uses it (leases say who is alive), and each worker's gossip
    # binds a queue named by a fresh uuid into kombu's "celeryev" binding set, which only a clean
    # stop removes. Every SIGKILLed worker left one member behind, and its replacement added
    # another (bench soak). Flower's events do not depend on it.
    return Child(name, [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queue, "-n", f"{name}@%h",
                        "--without-gossip", "--loglevel", settings.log_level], stop_order=stop_order, env=env or {})


def engine_workers(settings: Settings, roles: set[str]) -> list[tuple[str, str, dict[str, str]]]:
    """(name, queue, engine environment) of each decode worker, then each prefill worker; each
    engine gets its own core where there are several."""
    specs = []
    if "decode" in roles:
        specs += [(f"decode{i}", queues.DECODE) for i in range(settings.workers.num_decode)]
    if "prefill" in roles and settings.disagg.enabled:
        specs += [(f"prefill{i}", queues.PREFILL) for i in range(settings.disagg.num_prefill)]
    envs = placement.engine_cores(len(specs), settings.engine.omp_threads_bind, moves_kv=settings.disagg.enabled)
    return [(name, queue, env) for (name, queue), env in zip(specs, envs)]


def host_cores(settings: Settings, roles: set[str]) -> set[int] | None:
    """The cores for everything this launcher starts besides its engines, or None for any."""
    if not (settings.disagg.enabled and settings.disagg.isolate_decode_cores):
        return None
    workers = engine_workers(settings, roles)
    return placement.host_cores([env for _, _, env in workers], [queue == queues.DECODE for _, queue, _ in workers])


def worker_children(settings: Settings, roles: set[str]) -> list[Child]:
    """Decode workers, then prefill workers, all at ``workers.nice``. Where the launcher keeps the
    decode engines' cores for them, their environment says so (placement.OWN_CORES_ENV)."""
    own = {placement.OWN_CORES_ENV: "1"} if host_cores(settings, roles) else {}
    children = [_celery_worker(name, queue, settings, 3, {**env, **(own if queue == queues.DECODE else {})})
                for name, queue, env in engine_workers(settings, roles)]
    nice = settings.workers.nice
    if children and nice < 0 and not placement.may_lower_niceness(nice):
        # nice(1) would warn and run the worker anyway; one line here says why, and the session's
        # group is left alone rather than refused.
        logger.warning("workers.nice %d needs CAP_SYS_NICE (or RLIMIT_NICE): the workers run at the launcher's "
                       "niceness, %d", nice, os.getpriority(os.PRIO_PROCESS, 0))
        nice = 0
    if nice:
        # Through nice(1), which execs the worker: the same pid, reniced before its first thread;
        # and its session's group (the supervisor gives each child a session), without which the
        # niceness weighs nothing against the other children's sessions under autogroup.
        for child in children:
            child.argv = ["nice", "-n", str(nice), *child.argv]
            child.nice = nice
    return children


def router_children(settings: Settings) -> list[Child]:
    if not settings.router.enabled:
        return []
    return [_celery_worker(f"router{i}", queues.ROUTER, settings, 2) for i in range(settings.router.num_replicas)]


WORKER_ROLES = ("decode", "prefill", "router")


def worker_id(child_name: str) -> str:
    """The Celery worker id of a worker child: ``-n name@%h``, where Celery expands %h to
    socket.gethostname()."""
    return f"{child_name}@{socket.gethostname()}"


def lease_dropper(settings: Settings):
    """The supervisor's ``on_exit``: deletes the lease of a worker child that exited, at once, so
    the frontend and the router stop counting it within a poll rather than a whole lease (a
    SIGKILLed worker cannot drop its own)."""
    client = redis_conn.client(settings, socket_connect_timeout=1, socket_timeout=1)

    def on_exit(child: Child) -> None:
        if child.name.rstrip("0123456789") not in WORKER_ROLES:
            return
        name = worker_id(child.name)
        try:
            dropped = client.delete(keys.worker_lease(name))
        except redis.RedisError as e:
            logger.warning("%s exited; could not drop its lease (%s), which lapses on its own", name, e)
            return
        logger.warning("%s exited; %s its lease", name, "dropped" if dropped else "it held no")

    return on_exit


def frontend_child(settings: Settings, metrics_dir: Path) -> Child:
    return Child("frontend", [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "app" / "gunicorn_conf.py")],
                 stop_order=1, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})


def flower_child(settings: Settings) -> Child:
    """Flower on settings.flower_address (127.0.0.1 unless a setting says otherwise). Its
    credentials go in the environment (Flower reads FLOWER_BASIC_AUTH), not on the command line,
    which the launcher logs and `ps` shows. Settings.flower_refusal says when it must not start."""
    env = {"FLOWER_BASIC_AUTH": settings.flower.basic_auth} if settings.flower.basic_auth else {}
    return Child("flower", [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                            f"--port={settings.flower.port}", f"--address={settings.flower_address}"],
                 stop_order=4, env=env)


def started_workers(children: list[Child]) -> Counter:
    """Role -> how many workers this node started. Worker children are named role + index."""
    roles = (c.name.rstrip("0123456789") for c in children)
    return Counter(role for role in roles if role in WORKER_ROLES)


def wait_ready(settings: Settings, supervisor: Supervisor, timeout_s: float, expected: Counter) -> str | None:
    """Waits until /health says 200 and shows at least the workers this node started, role by
    role (a node that starts no workers needs only the frontend to answer). Returns None when
    ready, else why not."""
    url = f"http://127.0.0.1:{settings.frontend.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not supervisor.stopping:
        exited = [c.name for c in supervisor.children if not c.running]
        if exited:
            return f"{', '.join(exited)} exited while starting (its log is above)"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                live = json.load(reply).get("roles", {})
            if all(live.get(role, 0) >= n for role, n in expected.items()):
                return None
        except urllib.error.HTTPError:
            if not expected:
                return None
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    return None if supervisor.stopping else f"not every worker was live within {timeout_s:.0f}s"


def serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, args.set)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    roles = set(args.roles.split(",")) if args.roles else set(ROLES)
    unknown = roles - set(ROLES)
    if unknown:
        print(f"--roles: unknown role(s) {sorted(unknown)}; choose from {list(ROLES)}", file=sys.stderr)
        return 2
    if "flower" in roles and settings.flower.enabled and (refusal := settings.flower_refusal()):
        print(f"not starting: {refusal}", file=sys.stderr)
        return 2

    run_dir = ROOT / "run"
    run_dir.mkdir(exist_ok=True)
    resolved = run_dir / f"{settings.deployment}-{os.getpid()}.yaml"
    metrics_dir = run_dir / f"{settings.deployment}-{os.getpid()}-metrics"
    dump_settings(settings, resolved)
    env = dict(os.environ, LLMQ_CONFIG=str(resolved), PYTHONPATH=str(ROOT))
    for key in [k for k in env if k.startswith("LLMQ__")] + ["REDIS_URL", "PORT"]:
        env.pop(key, None)  # already folded into the resolved file

    supervisor = Supervisor(env, grace_s=args.grace_s, on_exit=lease_dropper(settings))
    supervisor.install_signal_handlers()
    if cores := host_cores(settings, roles):
        # Inherited by every child; vLLM binds each engine's runner to its own cores regardless.
        os.sched_setaffinity(0, cores)
        logger.info("the decode engines' cores are theirs: the frontend, Celery, Flower and a local Redis run on "
                    "cores %s, the prefill engines' (disagg.isolate_decode_cores)", ",".join(map(str, sorted(cores))))
    try:
        ensure_redis(settings, supervisor, run_dir)
        for child in worker_children(settings, roles):
            supervisor.start(child)
        if "router" in roles:
            for child in router_children(settings):
                supervisor.start(child)
        if "frontend" in roles:
            supervisor.start(frontend_child(settings, metrics_dir))
        if "flower" in roles and settings.flower.enabled:
            supervisor.start(flower_child(settings))
        if "frontend" in roles:
            problem = wait_ready(settings, supervisor, args.ready_timeout_s, started_workers(supervisor.children))
            if problem or supervisor.stopping:
                if problem:
                    logger.error("deployment did not start: %s", problem)
                return 1
            logger.info("ready: http://127.0.0.1:%d/v1  (model %s; Flower on %s:%d)", settings.frontend.port,
                        settings.model.name, settings.flower_address, settings.flower.port)
        return supervisor.wait()
    finally:
        supervisor.stop_all()
        _remove_redis_conf(run_dir)
        resolved.unlink(missing_ok=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def with_redis(args: argparse.Namespace) -> int:
    """Runs a command (``make test``) with a Redis at the URL, started for as long as the command
    runs if none answers, the same way ``serve`` starts one."""
    command = args.command_argv[1:] if args.command_argv[:1] == ["--"] else args.command_argv
    if not command:
        print("with-redis: give the command to run after --", file=sys.stderr)
        return 2
    supervisor = Supervisor(dict(os.environ))
    running: list[subprocess.Popen] = []
    # A terminal's Ctrl-C reaches the command too (same process group): this process outlives it,
    # so the command's own teardown (pytest stopping its deployments) still has Redis. Set
    # before the command starts; exec resets Python handlers, so the command keeps its own.
    signal.signal(signal.SIGINT, lambda *_: None)

    def forward(signum: int, _frame: object) -> None:
        for proc in running:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    run_dir = ROOT / "run"
    run_dir.mkdir(exist_ok=True)
    try:
        ensure_redis(Settings(redis_url=args.url), supervisor, run_dir)
        running.append(subprocess.Popen(command))
        return running[0].wait()
    finally:
        supervisor.stop_all()
        _remove_redis_conf(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="start a deployment and run until Ctrl-C")
    p.add_argument("-f", "--config", default=os.environ.get("CONFIG") or None,
                   help="YAML config (default: configs/agg.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set engine.kv_cache_gib=0.5")
    p.add_argument("--roles", default="", help=f"comma-separated subset of {','.join(ROLES)} (default: all)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--grace-s", type=float, default=30.0, help="how long each process gets to stop")
    p = sub.add_parser("with-redis", help="run a command with a Redis at URL, starting a local one if none answers")
    p.add_argument("url", help="e.g. redis://127.0.0.1:6379")
    p.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [launcher] %(message)s", stream=sys.stdout)
    return with_redis(args) if args.command == "with-redis" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
