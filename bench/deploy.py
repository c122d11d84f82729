"""Starts and stops the servers a benchmark scenario measures: a launcher deployment of ours, or
vLLM's own OpenAI server, each as a context manager.

    with launcher_deployment("configs/agg.yaml", out / "logs", redis_db=3) as dep:
        ...  # dep.base_url, dep.redis, dep.process_tree()

Each server runs as a subprocess with its output in a log file. Entering waits until it is ready
(the launcher's "ready: http" line, or vLLM answering /v1/models) within a time-out; leaving sends
SIGINT to the process we started and waits for it to exit. Only processes this module started,
and their descendants, are ever signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# The Redis databases benchmarks may use: 0 is the default deployment's, 6-15 the test suite's.
BENCH_REDIS_DBS = range(1, 6)
LAUNCHER_READY = "ready: http"
LAUNCHER_STOPPED = "all processes stopped"
# Log files kept in a results folder are trimmed to this many bytes (head and tail).
MAX_LOG_BYTES = 48 * 1024


class DeployError(RuntimeError):
    """A server that exited early, or did not become ready in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    name: str
    cmdline: str


@dataclass
class ManagedProcess:
    """One subprocess we started, with its output in `log_path`."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    stop_timeout_s: float = 90.0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting %s (log %s): %s", self.name, self.log_path, " ".join(self.argv))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env or None, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise DeployError(f"{self.name} exited early; log tail:\n{self.log_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise DeployError(f"{self.name} was not ready within {timeout_s:.0f} s; log tail:\n{self.log_text()[-3000:]}")

    def process_tree(self) -> list[ProcessInfo]:
        """This process and every descendant, for profilers."""
        if not self.running:
            return []
        root = psutil.Process(self.pid)
        found = []
        for p in [root] + root.children(recursive=True):
            try:
                found.append(ProcessInfo(p.pid, p.name(), " ".join(p.cmdline())))
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self) -> int | None:
        """SIGINT, then wait; SIGKILL to what is left of our own tree only after the time-out."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            tree = self.process_tree()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing its processes", self.name, self.stop_timeout_s)
                _kill(tree)
                self.proc.wait(timeout=10)
            _kill([p for p in tree if psutil.pid_exists(p.pid) and _same_process(p)])  # orphans, if any
        logger.info("%s stopped (exit code %s)", self.name, self.proc.returncode)
        return self.proc.returncode


def _same_process(info: ProcessInfo) -> bool:
    try:
        return " ".join(psutil.Process(info.pid).cmdline()) == info.cmdline
    except psutil.NoSuchProcess:
        return False


def _kill(tree: list[ProcessInfo]) -> None:
    for info in tree:
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def trim_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
    """Keeps a log's head and tail, so a results folder stays small."""
    if not path.exists() or path.stat().st_size <= max_bytes:
        return
    data = path.read_bytes()
    head, tail = data[:max_bytes // 4], data[-(max_bytes - max_bytes // 4):]
    cut = len(data) - len(head) - len(tail)
    path.write_bytes(head + f"\n[... {cut} bytes cut by bench.deploy.trim_log ...]\n".encode() + tail)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _clean_env(**extra: str) -> dict[str, str]:
    """Our environment less whatever would override the config or the KV cache size."""
    drop = ("REDIS_URL", "PORT", "LLMQ_CONFIG", "VLLM_CPU_KVCACHE_SPACE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ__") and k not in drop}
    return {**env, **extra}


# -- a launcher deployment ----------------------------------------------------------------------


def redis_url_for(db: int, host: str = "127.0.0.1", port: int = 6379) -> str:
    if db not in BENCH_REDIS_DBS:
        raise ValueError(f"benchmarks use Redis databases {BENCH_REDIS_DBS.start}-{BENCH_REDIS_DBS.stop - 1}, not {db}")
    return f"redis://{host}:{port}/{db}"


@dataclass
class LauncherDeployment:
    """`python -m launcher serve -f CONFIG` on its own port and Redis database."""

    config: str
    log_dir: Path
    redis_db: int
    port: int = 0
    sets: dict[str, str] = field(default_factory=dict)
    name: str = ""
    ready_timeout_s: float = 300.0
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        # A redis_url in sets (a Sentinel set, bench/redis_ha.py) replaces the shared Redis's db.
        self.redis_url = self.sets.get("redis_url") or redis_url_for(self.redis_db)
        self.port = self.port or free_port()
        self.name = self.name or Path(self.config).stem

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @cached_property
    def redis(self):
        """A client for the deployment's Redis database (one, reused)."""
        from config import load_settings
        from tasks import redis_conn

        overrides = [f"{k}={v}" for k, v in self.sets.items()]
        return redis_conn.client(load_settings(ROOT / self.config, [*overrides, f"redis_url={self.redis_url}"],
                                               environ={}))

    def argv(self) -> list[str]:
        sets = {"frontend.port": str(self.port), "flower.enabled": "false", "redis_url": self.redis_url, **self.sets}
        argv = [sys.executable, "-m", "launcher", "serve", "-f", self.config]
        for key, value in sets.items():
            argv += ["--set", f"{key}={value}"]
        return argv

    @property
    def num_decode(self) -> int:
        """The decode workers the config (with our --set overrides) starts."""
        from config import load_settings

        overrides = [f"{k}={v}" for k, v in self.sets.items()]
        return load_settings(ROOT / self.config, overrides, environ={}).workers.num_decode

    def _all_workers_live(self) -> bool:
        from tasks.registry import live_workers

        return len(live_workers(self.redis, role="decode")) >= self.num_decode

    def __enter__(self) -> LauncherDeployment:
        self.redis.flushdb()
        self.process = ManagedProcess(self.name, self.argv(), self.log_dir / f"{self.name}.log", env=_clean_env())
        self.process.start()
        try:
            # The launcher is ready once one worker is; a benchmark wants all of them.
            self.process.wait_until(lambda: LAUNCHER_READY in self.process.log_text() and self._all_workers_live(),
                                    self.ready_timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        logger.info("%s ready at %s (Redis db %d, %d decode workers)", self.name, self.base_url, self.redis_db,
                    self.num_decode)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stop()
            if LAUNCHER_STOPPED not in self.process.log_text():
                logger.warning("%s: no %r line in its log", self.name, LAUNCHER_STOPPED)
            trim_log(self.process.log_path)

    def process_tree(self) -> list[ProcessInfo]:
        return self.process.process_tree() if self.process else []


# -- vLLM's own server ----------------------------------------------------------------------------


def vllm_server_args(settings) -> list[str]:
    """vLLM's server flags for the engine our config describes (workers/engine.py engine_args),
    so the two cannot drift apart. The KV cache is sized in bytes, as ours is."""
    e = settings.engine
    args = ["--model", settings.model.resolved_path, "--served-model-name", settings.model.name,
            "--block-size", str(e.block_size), "--kv-cache-memory-bytes", str(int(e.kv_cache_gib * 2**30)),
            "--max-model-len", str(e.max_model_len), "--max-num-seqs", str(e.max_num_seqs),
            "--dtype", e.dtype, "--seed", str(e.seed),
            "--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details"]
    if e.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    if e.enforce_eager:
        args.append("--enforce-eager")
    return args


@dataclass
class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` with the engine arguments of `config`.

    VLLM_CPU_KVCACHE_SPACE is removed from its environment: on vLLM's CPU platform it overrides
    --kv-cache-memory-bytes (vllm/platforms/cpu.py), and ours is sized by bytes."""

    config: str
    log_dir: Path
    port: int = 0
    name: str = "vllm"
    # Place its scheduler process as our decode workers do (placement.py, place_scheduler).
    place_scheduler: bool = False
    ready_timeout_s: float = 300.0
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def settings(self):
        from config import load_settings

        return load_settings(ROOT / self.config, environ={})

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_server_args(self.settings()),
                "--host", "127.0.0.1", "--port", str(self.port)]

    def __enter__(self) -> VllmServer:
        self.process = ManagedProcess(self.name, self.argv(), self.log_dir / f"{self.name}.log", env=_clean_env())
        self.process.start()
        try:
            self.process.wait_until(lambda: _http_ok(f"{self.base_url}/models"), self.ready_timeout_s)
            if self.place_scheduler:
                from placement import place_scheduler

                e = self.settings().engine
                if not place_scheduler(e.scheduler_nice, e.scheduler_on_runner_cores, parent_pid=self.process.pid):
                    raise DeployError(f"{self.name}: found no vLLM scheduler process to place")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        logger.info("%s ready at %s", self.name, self.base_url)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stop()
            trim_log(self.process.log_path)

    def process_tree(self) -> list[ProcessInfo]:
        return self.process.process_tree() if self.process else []
