"""A Redis primary, its replica and three Sentinels on loopback ports, for the failover test
(tests/test_redis_ha.py) and benchmark (bench/failover.py). Started from the machine's
redis-server (as ``redis-server --sentinel`` where redis-sentinel is not installed), stopped by
the context manager; only the processes it started are ever signalled.

    with SentinelSet(tmp, password="s3cret") as ha:
        ha.redis_url          # sentinel://:s3cret@127.0.0.1:p1;sentinel://...
        ha.kill_primary()     # SIGKILL; then ha.wait_failover() -> seconds until a new master
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from bench.deploy import free_port

MASTER_NAME = "llmq"
# Sentinels call the primary down after this long without an answer: short, so that a test and
# the benchmark see a failover within seconds. Production Sentinels default to 30 s.
DOWN_AFTER_MS = 1000


class SentinelSet:
    def __init__(self, workdir: Path, password: str | None = None, sentinels: int = 3):
        self.dir = workdir
        self.password = password
        self.ports = [free_port(), free_port()]  # primary, replica
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.primary_port = self.ports[0]

    # -- addresses --------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def server(self, port: int, **kwargs) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_connect_timeout=1, socket_timeout=2, **kwargs)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2)

    def master_port(self) -> int | None:
        """The master the Sentinels name (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                addr = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    # -- lifecycle --------------------------------------------------------------------------

    def _start(self, port: int, argv: list[str]) -> None:
        log = (self.dir / f"redis-{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def __enter__(self) -> SentinelSet:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        sentinel_bin = shutil.which("redis-sentinel")
        self.dir.mkdir(parents=True, exist_ok=True)
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        try:
            for port in self.ports:
                replica = [] if port == self.primary_port else ["--replicaof", "127.0.0.1", str(self.primary_port)]
                self._start(port, [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", *auth, *replica])
            for port in self.sentinel_ports:
                conf = self.dir / f"sentinel-{port}.conf"
                lines = [f"port {port}", "bind 127.0.0.1", f"dir {self.dir}",
                         f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} 2",
                         f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                         f"sentinel failover-timeout {MASTER_NAME} 10000"]
                if self.password:
                    lines.append(f"sentinel auth-pass {MASTER_NAME} {json.dumps(self.password)}")
                conf.write_text("\n".join(lines) + "\n")
                argv = [sentinel_bin, str(conf)] if sentinel_bin else [server, str(conf), "--sentinel"]
                self._start(port, argv)
            self._wait_ready(timeout_s=30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the replica is in sync and every Sentinel knows the replica and the others."""
        deadline = time.monotonic() + timeout_s
        others = len(self.sentinel_ports) - 1
        while time.monotonic() < deadline:
            try:
                synced = self.server(self.ports[1]).info("replication").get("master_link_status") == "up"
                known = all(
                    int(m["num-slaves"]) >= 1 and int(m["num-other-sentinels"]) >= others
                    for m in (self.sentinel(p).sentinel_master(MASTER_NAME) for p in self.sentinel_ports))
                if synced and known:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the Sentinel set was not ready within {timeout_s:.0f}s (logs in {self.dir})")

    def kill_primary(self) -> int:
        """SIGKILLs the current master; returns its port."""
        port = self.master_port() or self.primary_port
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=10)
        return port

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> float:
        """Seconds from now until the Sentinels name a new master that accepts writes."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            port = self.master_port()
            if port is not None and port != old_port:
                try:
                    if self.server(port).set("llmq:failover:probe", 1, ex=60):
                        return time.monotonic() - start
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"no new master within {timeout_s:.0f}s (logs in {self.dir})")

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
