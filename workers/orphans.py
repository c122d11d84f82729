"""An engine process never outlives the worker that owns it, however the worker dies.

vLLM (0.32, CPU) starts its processes with multiprocessing's fork method (VLLM_WORKER_MULTIPROC_METHOD
defaults to fork, and nothing on CPU forces spawn): the worker's engine-loop thread forks
``VLLM::EngineCore`` while it builds ``AsyncLLM`` (workers/engine.py), and EngineCore's main thread
forks ``VLLM::Worker``. Only the Worker watches its parent (a death pipe); EngineCore blocks on
its ZMQ input and lives on, with about 1.5 GB of RSS, once the Celery process is SIGKILLed.

So every child forked in a worker process asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), from an ``os.register_at_fork`` hook. The hook is process state that
a forked child keeps, so EngineCore's own fork of the Worker sets it too: the Celery process dies,
the kernel kills EngineCore, then the Worker. Neither the launcher nor anyone else has to clean up.

The kernel's "parent" is the thread that forked, not the process: the death signal fires when
that thread exits. EngineCore is forked by the engine-loop thread, which lives until after the
engine's shutdown (EngineHost.shutdown), and the Worker by EngineCore's main thread.

A child whose parent died between the fork and the prctl would miss the signal, so it checks its
parent once the signal is set and leaves if the parent is gone. Subprocesses started with
``subprocess`` do not run at-fork hooks; a process started with the spawn method does not either
(set VLLM_WORKER_MULTIPROC_METHOD=spawn and this does not hold: ``install`` warns).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None
_parent_pid = 0  # the forking process's pid, set just before each fork
_installed = False


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _libc is None or _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != _parent_pid:  # the parent died before the death signal was set
        os._exit(1)


def install() -> bool:
    """Makes every child this process forks from now on, and theirs, die with its parent.
    Call it before the engine starts. Returns whether it is in place (Linux only)."""
    global _installed, _libc
    if _installed:
        return True
    if not sys.platform.startswith("linux"):
        logger.warning("engine processes are not tied to their worker on %s: they may outlive it", sys.platform)
        return False
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        logger.warning("VLLM_WORKER_MULTIPROC_METHOD=spawn: engine processes are not tied to their worker "
                       "and may outlive it")
    _libc = ctypes.CDLL(None, use_errno=True)
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True
    return True
