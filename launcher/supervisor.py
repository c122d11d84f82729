"""Starts a deployment's processes, prefixes their logs, and stops them all cleanly.

Each child runs in its own session, so a terminal's Ctrl-C reaches only the supervisor, which
then stops the children in order: frontend first (no new requests), then workers (a warm Celery
shutdown lets in-flight requests finish), then Flower and Redis. A second Ctrl-C, or a child that
outlives its grace period, gets SIGKILL sent to its whole process group, which includes the
vLLM engine processes it spawned. No kill_tree ritual is needed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import placement

logger = logging.getLogger("launcher")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 120


@dataclass
class Child:
    name: str
    argv: list[str]
    # Lower stops first.
    stop_order: int
    # Restart when it exits on its own (a crashed worker, an engine that died), as circus does
    # for Dynamo; a child that keeps crashing stops the deployment instead.
    restart: bool = True
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's
    # The niceness of the child's session (placement.set_niceness), set as it starts; its argv
    # sets the process's own (nice(1)), before its first thread.
    nice: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    restarts: list[float] = field(default_factory=list, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _relay(name: str, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
        sys.stdout.flush()


class Supervisor:
    def __init__(self, env: dict[str, str], grace_s: float = 30.0,
                 on_exit: Callable[[Child], None] | None = None):
        self.env = env
        self.grace_s = grace_s
        # Told of a child that exited on its own, before it is restarted: the launcher drops a
        # dead worker's lease there, so nobody waits for it to lapse.
        self.on_exit = on_exit
        self.children: list[Child] = []
        self._stopping = threading.Event()
        self._forced = False

    def start(self, child: Child) -> None:
        logger.info("starting %s: %s", child.name, " ".join(child.argv))
        self._spawn(child)
        self.children.append(child)

    def _spawn(self, child: Child) -> None:
        proc = subprocess.Popen(
            child.argv, env={**self.env, **child.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child.proc = proc
        if child.nice:
            # The child has called setsid() and exec'd by now; the processes it starts later (an
            # engine's) join its session and so its group. The process's own niceness is its
            # argv's to set: nice(1) adds to whatever it finds, and may not have run yet.
            try:
                if placement.set_session_niceness(child.nice, proc.pid):
                    logger.info("%s's session runs at niceness %d", child.name, child.nice)
            except OSError as e:
                logger.warning("%s: could not set its session's niceness to %d: %s", child.name, child.nice, e)
        threading.Thread(target=_relay, args=(child.name, proc.stdout), daemon=True).start()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self._stopping.is_set():
            logger.warning("second %s: killing every process now", signal.Signals(signum).name)
            self._forced = True
            for child in self.children:
                self._kill(child)
            return
        logger.info("%s: stopping (again to force)", signal.Signals(signum).name)
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait(self, poll_s: float = 0.2) -> int:
        """Blocks until a stop is asked for, restarting children that exit on their own.
        Returns the exit code to use: 0 after a requested stop, 1 when a child gave up."""
        while not self._stopping.wait(poll_s):
            for child in self.children:
                if child.running or self._stopping.is_set():
                    continue
                if self.on_exit is not None:
                    try:
                        self.on_exit(child)
                    except Exception:  # a failed notice must not stop the restart
                        logger.exception("handling the exit of %s failed", child.name)
                if not self._revive(child):
                    self._stopping.set()
                    return 1
        return 0

    def _revive(self, child: Child) -> bool:
        code = child.proc.returncode if child.proc is not None else None
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
        if not child.restart or len(child.restarts) >= MAX_RESTARTS:
            logger.error("%s exited with code %s; stopping the deployment", child.name, code)
            return False
        self._kill(child)  # reap anything left in its process group, such as an engine
        child.restarts.append(now)
        logger.warning("%s exited with code %s; restarting it (%d/%d in %ds)", child.name, code,
                       len(child.restarts), MAX_RESTARTS, RESTART_WINDOW_S)
        self._spawn(child)
        return True

    def stop_all(self) -> None:
        self._stopping.set()
        for order in sorted({c.stop_order for c in self.children}):
            # A running child has a process (Child.running); the pairs say so to the type checker.
            group = [(c, c.proc) for c in self.children
                     if c.stop_order == order and c.running and c.proc is not None]
            for child, proc in group:
                logger.info("stopping %s (pid %d)", child.name, proc.pid)
                # The child alone, not its process group: a Celery worker shuts its engine down
                # in order, and an engine process signalled directly dies under it instead
                # (EngineDeadError tracebacks in the log). The group is killed after the grace.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for child, proc in group:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop within %.0fs; killing it", child.name, self.grace_s)
            for child, _proc in group:
                self._kill(child)  # also reaps engine processes left in the child's group
        for child in self.children:
            # A child that had already exited (killed while the deployment was starting, say) may
            # have left processes in its group.
            self._kill(child)
        logger.info("all processes stopped")

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _kill(self, child: Child) -> None:
        proc = child.proc
        if proc is None:
            return
        self._signal(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) survived SIGKILL", child.name, proc.pid)
