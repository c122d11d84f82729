"""An engine process never outlives the worker that owns it, however the worker dies.

vLLM 0.32's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn while it builds its config, so the
worker's engine-loop thread spawns ``VLLM::EngineCore`` (a fresh ``python -c`` from multiprocessing's
``spawn.get_command_line``) while it builds ``AsyncLLM`` (workers/engine.py), and EngineCore's main
thread spawns ``VLLM::Worker`` the same way. Only the Worker watches its parent (a death pipe);
EngineCore blocks on its ZMQ input and lived on, with about 1.5 GB of RSS, once the Celery process
was SIGKILLed.

So each child asks the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``) as
the first thing it runs:

- spawned children: ``install`` wraps ``multiprocessing.spawn.get_command_line`` so that the
  child's ``-c`` program calls ``tie_to_parent`` before multiprocessing's own ``spawn_main``. That
  call installs the same wrapper in the child, so EngineCore's own children are tied to it too;
- forked children (the fork method, should vLLM use it): an ``os.register_at_fork`` hook does the
  same in the child.

The Celery process dies, the kernel kills EngineCore, then the Worker. Neither the launcher nor
anyone else has to clean up.

The kernel's "parent" is the thread that forked, not the process: the death signal fires when
that thread exits. EngineCore is started by the engine-loop thread, which lives until after the
engine's shutdown (EngineHost.shutdown), and the Worker by EngineCore's main thread.

A child whose parent died before the signal was set would miss it, so it checks its parent once
the signal is set and leaves if the parent is gone. Processes started with ``subprocess`` are not
covered (they run no Python of ours). Linux only: elsewhere ``install`` warns and does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.spawn
import os
import signal
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The directory that holds the ``workers`` package: a spawned child imports this module from it
# before multiprocessing has restored the parent's sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)

_parent_pid = 0  # the forking process's pid, set just before each fork
_installed = False


def _set_death_signal(parent_pid: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:  # the parent died before the death signal was set
        os._exit(1)


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    _set_death_signal(_parent_pid)


def _child_prologue(parent_pid: int) -> str:
    """Python run first in a spawned child: ties it to ``parent_pid``, gets it AMX permission
    (placement.request_amx_permission: an engine process without it dies of SIGILL in vLLM's
    attention), then leaves sys.path as multiprocessing expects to find it."""
    return (f"import sys; sys.path.insert(0, {_ROOT!r}); from workers import orphans; "
            f"orphans.tie_to_parent({parent_pid}); import placement; placement.request_amx_permission(); "
            f"sys.path.remove({_ROOT!r}); ")


def _wrap(get_command_line):
    def get_command_line_tied(**kwds) -> list[str]:
        argv = list(get_command_line(**kwds))
        if "-c" in argv:  # not frozen: [python, flags..., "-c", program, "--multiprocessing-fork"]
            i = argv.index("-c") + 1
            argv[i] = _child_prologue(os.getpid()) + argv[i]
        return argv

    setattr(get_command_line_tied, "tied", True)  # noqa: B010  (a marker, so install wraps once)
    return get_command_line_tied


def tie_to_parent(parent_pid: int) -> None:
    """In a spawned child, first thing: dies when ``parent_pid`` does, and ties its own children
    to itself in turn."""
    _set_death_signal(parent_pid)
    install()


def install() -> bool:
    """Makes every child this process forks or spawns from now on, and theirs, die with its
    parent. Call it before the engine starts. Returns whether it is in place (Linux only)."""
    global _installed
    if _installed:
        return True
    if not sys.platform.startswith("linux"):
        logger.warning("engine processes are not tied to their worker on %s: they may outlive it", sys.platform)
        return False
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    if not getattr(multiprocessing.spawn.get_command_line, "tied", False):
        multiprocessing.spawn.get_command_line = _wrap(multiprocessing.spawn.get_command_line)
    _installed = True
    return True
