"""Where the processes of a deployment run on the CPU, and what stays out of the garbage collector.

- Which cores a vLLM engine's OpenMP threads are bound to (``engine.omp_threads_bind``): the
  launcher gives several engines a core each, and an engine that moves KV over NIXL runs unbound.
- Where everything else a launcher starts runs (``disagg.isolate_decode_cores``): off its decode
  engines' cores, on its prefill engines'.
- Where a vLLM scheduler process runs (``engine.scheduler_on_runner_cores``,
  ``engine.scheduler_nice``): on its model runner's cores, or else niced.
- How NIXL's agents poll (``disagg.nixl_progress_delay_us``): their progress thread sleeps between
  idle polls instead of busy-polling a core.
- How an unbound engine waits (``unbound_engine_env``, ``spin_less_when_unbound``): its OpenMP
  threads sleep at a barrier, and its two processes sleep between looks at their queues, instead
  of spinning, since they share their cores with everything else.
- A process's CPU priority where the kernel shares the CPU out by session (``set_niceness``,
  ``may_lower_niceness``): ``workers.nice`` for the engines, ``frontend.gate_nice`` for the gate.
- A short section of a thread at real-time priority (``RealtimeSection``): a KV WRITE's copy.
- The gc freezes (``frontend.gc_freeze``, and always in a worker): a heap built at start-up is
  frozen, so collections while serving do not walk it.

The frontend and the launcher import this module, and vLLM's engine processes import it through
kvtransfer/nixl_agents.py. It therefore imports only the standard library at module level (psutil
lazily), never vLLM, torch or NIXL, and nothing of the project: the frontend must start fast and
must not import ``workers/`` or ``router/``.

Functions that decide on environment variables return them; the caller applies them in the
process that spawns the engine, before it spawns it, because the engine's processes inherit them.
The measurements behind the defaults are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# -- the OpenMP bind mode ----------------------------------------------------------------------

# vLLM's CPU backend binds the model runner's OpenMP threads to the cores this names: "auto" (or
# unset) lets vLLM choose, "nobind" leaves them unbound, otherwise a core list such as "0" or "0-1".
OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
NOBIND = "nobind"


def engine_cores(num_engines: int, bind: str, moves_kv: bool = False,
                 environ: Mapping[str, str] = os.environ) -> list[dict[str, str]]:
    """The launcher's per-engine environment, for the engines it starts on one node.

    With "auto", vLLM binds every engine to the same first core, so several engines get a core
    each, round robin. Engines that move KV get disjoint ranges of the cores where there are at
    least two of them and enough cores; otherwise they run unbound (``engine_bind_env``), each
    with an OpenMP team of its share of the cores, at least one thread, unless the operator set
    ``OMP_NUM_THREADS`` (in ``environ``, which the workers inherit). One engine that moves no KV,
    or an explicit ``engine.omp_threads_bind``, gets nothing from the launcher."""
    cores = os.cpu_count() or 1
    if bind == "auto" and moves_kv:
        if OMP_THREADS_ENV in environ or OMP_BIND_ENV in environ:
            return [{} for _ in range(num_engines)]
        if 2 <= num_engines <= cores:
            # Passive waits as well, as unbound engines have them (unbound_engine_env).
            passive = {} if OMP_WAIT_POLICY_ENV in environ else {OMP_WAIT_POLICY_ENV: "PASSIVE"}
            return [{OMP_BIND_ENV: core_range(i, num_engines, cores), **passive} for i in range(num_engines)]
        # One engine on this node has nothing to be kept apart from here, but may share the host
        # with engines another launcher started (tests/test_multinode.py runs two "nodes" on one
        # host): bound to every core, two such engines starve each other's NIXL threads and a
        # remote prefill misses its deadline. So it runs unbound, as engines that outnumber the
        # cores do.
        return [{OMP_THREADS_ENV: str(max(1, cores // num_engines))} for _ in range(num_engines)]
    if bind != "auto" or num_engines < 2:
        return [{} for _ in range(num_engines)]
    return [{OMP_BIND_ENV: str(i % cores)} for i in range(num_engines)]


def engine_bind_env(bind: str, moves_kv: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a worker sets for its own engine before starting it.

    An explicit ``engine.omp_threads_bind`` wins. Otherwise an engine that moves KV over NIXL runs
    unbound: bound to one core, its NIXL threads (handshake, progress) share that core with its
    spinning OpenMP threads, and a KV transfer waits until the other engine's hold on the blocks
    expires. An unbound engine also gets ``unbound_engine_env``. An empty result keeps what the
    launcher set, or vLLM's own choice."""
    if bind == "auto" and moves_kv and environ.get(OMP_BIND_ENV, NOBIND) not in (NOBIND, "auto"):
        return {}  # the launcher's cores for this engine (engine_cores)
    bound = bind if bind != "auto" else (NOBIND if moves_kv else None)
    if bound is None:
        return {}
    return {OMP_BIND_ENV: bound, **(unbound_engine_env(environ) if bound == NOBIND else {})}


def core_range(index: int, num_engines: int, cores: int) -> str:
    """Engine ``index``'s share of ``cores``, as vLLM's bind list: contiguous, disjoint."""
    per = cores // num_engines
    first = index * per
    last = cores - 1 if index == num_engines - 1 else first + per - 1
    return str(first) if first == last else f"{first}-{last}"


def cores_of(spec: str) -> set[int]:
    """The cores a bind list names: "1", "0-3" or "0,2-3"."""
    cores: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


# Set by the launcher in the environment of a decode engine whose cores it keeps for that engine.
OWN_CORES_ENV = "LLMQ_ENGINE_OWNS_ITS_CORES"


def host_cores(envs: Sequence[Mapping[str, str]], decode: Sequence[bool]) -> set[int] | None:
    """Where a launcher runs everything it starts besides its engines (the frontend, Celery's
    worker processes, Flower, a Redis), when it keeps its decode engines' cores for them: the
    cores of its prefill engines. None (anywhere) unless it starts both kinds and every engine got
    cores of its own (``engine_cores``; ``envs`` in the order of ``decode``, which says which
    engines decode).

    A decode engine steps every few milliseconds for every stream it holds, and whatever runs on
    its core meanwhile (a frontend thread, Celery, Redis) delays that step for all of them; a
    prefill step is long, and the same interruption costs it a far smaller share."""
    if not (any(decode) and not all(decode)) or not all(OMP_BIND_ENV in env for env in envs):
        return None
    return set().union(*(cores_of(env[OMP_BIND_ENV]) for env, dec in zip(envs, decode) if not dec))


# OpenMP's own variables, read by the engine's processes when they start.
OMP_THREADS_ENV = "OMP_NUM_THREADS"
OMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def unbound_engine_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """OpenMP settings for an engine whose threads are bound to no core; a value already in
    ``environ`` (the launcher's thread count, or the operator's) is kept.

    Unbound, vLLM sets neither, and libgomp then starts a team of one thread per core in every
    engine, whose threads spin at each barrier before they sleep. Several engines on the same
    cores then outnumber them: a team's thread that has lost its core holds up the barrier while
    the others spin out their time slices, and every other process of the machine (Celery's
    heartbeats, Redis) waits for a core meanwhile. So the team is one thread unless the launcher
    shared out the cores (``engine_cores``), and a waiting thread sleeps (passive) instead of
    spinning. docs/disaggregation.md, "CPU notes"."""
    env = {OMP_THREADS_ENV: "1", OMP_WAIT_POLICY_ENV: "PASSIVE"}
    return {k: v for k, v in env.items() if k not in environ}


@contextlib.contextmanager
def unpinned_from_kv_core(log: logging.Logger = logger) -> Iterator[None]:
    """Gives every thread of this process back the cores it was allowed on entry: all of them
    for an unbound engine, its own for one the launcher bound (``engine_cores``). For building
    vLLM's NIXL worker half inside an engine process; ``log`` is a logger that process has a
    handler for.

    On CPU, vLLM's NIXL worker pins the model runner's thread to the last core of each NUMA node
    (nixl/base_worker.py, "reserve different cores for start_load_kv"), in every engine, and the
    NIXL threads it starts next inherit that core. The decode and the prefill engine's runners and
    all their NIXL threads would then share one core, which a decode engine waiting for KV takes
    by stepping without pause: pushes time out, and a pull can stall until the prefill engine's
    hold on the blocks expires."""
    allowed = os.sched_getaffinity(0)
    yield
    moved = []
    for tid in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):  # a thread that has ended meanwhile
            if os.sched_getaffinity(tid) != allowed:
                os.sched_setaffinity(tid, allowed)
                moved.append(tid)
    if moved:
        log.info("unpinned %d thread(s) of the model runner from vLLM's KV-transfer core (cores %s)",
                 len(moved), sorted(allowed))


# How long an unbound engine's shared-memory queue readers sleep between looks at their queue,
# where vLLM would call sched_yield: short next to a model step, long next to a look.
UNBOUND_SHM_NAP_S = 0.0001


def spin_less_when_unbound(shm_broadcast, log: logging.Logger = logger, moves_kv: bool = False) -> bool:
    """Makes the readers of vLLM's shared-memory queues (``shm_broadcast``, vLLM's module) in an
    engine that runs unbound sleep ``UNBOUND_SHM_NAP_S`` between looks at their queue, where vLLM
    has them call ``sched_yield``. Returns whether it did.

    The model runner reads its steps from the scheduler through such a queue, and the scheduler
    reads the results back through another. vLLM has each reader spin with ``sched_yield`` for a
    second after every message, then wait for the writer's notification. A decode engine waiting
    for a pushed KV still steps every millisecond or so (to poll its connector), so its runner
    never stops spinning, on a core that the prefill engine computing that very KV needs.
    ``sched_yield`` gives the core up only to a thread already queued on it, and the spinner is
    runnable again at once.

    The second of looking and the wait after it stay vLLM's: a reader that switches to waiting
    for the notification after every message can miss one (vLLM's notification sockets hold at
    most one at either end), and then the scheduler and the runner each wait for the other until
    a poll times out. Bound engines keep vLLM's spin, theirs being on their own core, unless they
    move KV (``moves_kv``): such engines have a core each and none is left over, so their spin
    would take the frontend's, Celery's and Redis's time. A decode engine whose cores the launcher
    keeps for it (``OWN_CORES_ENV``, ``host_cores``) keeps the spin too: nothing else waits for
    its core, and each nap's wake-up would preempt its own runner mid-step."""
    if os.environ.get(OWN_CORES_ENV) == "1":
        return False
    if not moves_kv and os.environ.get(OMP_BIND_ENV) != NOBIND:
        return False
    cls = shm_broadcast.SpinCondition
    if getattr(cls, "_llmq_nap_s", None) is not None:
        return True
    original = cls.wait

    def wait(self, timeout_ms=None):
        if time.monotonic() <= self.last_read + self.busy_loop_s:
            time.sleep(UNBOUND_SHM_NAP_S)  # in place of sched_yield
            return None
        return original(self, timeout_ms)

    cls.wait = wait
    cls._llmq_nap_s = UNBOUND_SHM_NAP_S
    log.info("engine on shared cores: its shared-memory queue readers sleep %.1f ms between looks instead of "
             "spinning", UNBOUND_SHM_NAP_S * 1e3)
    return True


def no_amx_when_unbound(log: logging.Logger = logger) -> bool:
    """Keeps vLLM's CPU attention off its AMX kernels in an engine that runs unbound. Returns
    whether it did.

    An unbound model runner's threads move between cores, and on some virtual machines that
    advertise AMX a tile instruction then raises SIGILL inside vLLM's attention kernel: the engine
    dies. The AVX-512 kernels have no such state; vLLM picks them when AMX is not reported."""
    if os.environ.get(OMP_BIND_ENV) != NOBIND:
        return False
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return False
    torch.cpu._is_amx_tile_supported = lambda: False
    log.info("unbound engine: vLLM's CPU attention uses its AVX-512 kernels, not AMX")
    return True


# <asm/prctl.h> and <asm/fpu/xstate.h>, x86_64.
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """Asks Linux, without torch, for this process's permission to use AMX tiles; it holds for
    every thread of the process, those started later included. Returns whether it is granted
    (False on a CPU or kernel without AMX, where nothing needs it).

    Called first thing in every process a worker spawns (workers/orphans.py), so no engine
    process can reach vLLM's AMX attention kernel unpermitted, whatever its first step is: oneDNN
    asks only on its first AMX matmul, and not every model's first matmul takes that path."""
    import ctypes
    import platform

    if not (os.uname().sysname == "Linux" and platform.machine() == "x86_64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return False
    granted = ctypes.c_uint64(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
        return False
    return bool(granted.value & (1 << _XFEATURE_XTILEDATA))


def amx_allowed(log: logging.Logger = logger) -> bool:
    """Asks Linux for this process's permission to use AMX tiles (arch_prctl XTILEDATA), where
    the CPU has them; without it, AMX instructions raise SIGILL. Returns whether AMX is usable.

    oneDNN asks for it on its first AMX matmul, and vLLM's CPU attention never does. An engine
    whose first step with a long context is a decode engine's first step after a remote prefill
    (one new token over a received KV) reaches the attention's AMX kernel before any AMX matmul
    ran in its process, and dies of SIGILL. Where the permission is refused, vLLM is told there
    is no AMX, so it picks its AVX-512 kernels."""
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return False
    if torch.cpu._init_amx():
        return True
    torch.cpu._is_amx_tile_supported = lambda: False
    log.warning("Linux refused this process AMX; vLLM's CPU attention uses its AVX-512 kernels")
    return False


# -- niceness, by session ------------------------------------------------------------------------

# With autogroup (CONFIG_SCHED_AUTOGROUP, on by default in most distributions' kernels, and
# kernel.sched_autogroup_enabled = 1), the CPU is shared out between sessions first, then between
# the processes of a session; a process's niceness only weighs against its own session's. The
# launcher starts every child in a session of its own, so a niceness alone moves nothing between
# them: the session's group has a niceness of its own, in /proc/PID/autogroup.
AUTOGROUP = "/proc/{pid}/autogroup"
# Without CAP_SYS_ADMIN, the kernel takes one autogroup change in the whole machine per 100 ms
# and answers EAGAIN to the others.
AUTOGROUP_TRIES = 5
AUTOGROUP_RETRY_S = 0.11


def set_niceness(niceness: int, pid: int = 0) -> str:
    """Sets process ``pid``'s niceness (0: this process's; every thread's, as a whole process's
    is set when it has one thread) and, if it leads a session under autogroup, its session's
    group's too. Raises OSError when refused: lowering a niceness below the current one needs
    CAP_SYS_NICE (or RLIMIT_NICE). Returns what was set, for a log line."""
    pid = pid or os.getpid()
    os.setpriority(os.PRIO_PROCESS, pid, niceness)
    return f"niceness {niceness}" + (", its session's group too" if set_session_niceness(niceness, pid) else "")


# Linux's capability number (<linux/capability.h>): a thread with it may lower any niceness.
CAP_SYS_NICE = 23


def may_lower_niceness(niceness: int) -> bool:
    """Whether this process may take ``niceness`` (so start a child at it), as Linux decides
    (kernel/sched/core.c, can_nice): a niceness at or above its own always; a lower one with
    CAP_SYS_NICE, or where RLIMIT_NICE reaches it (the limit counts 20 - niceness)."""

    if niceness >= os.getpriority(os.PRIO_PROCESS, 0):
        return True
    return may_renice_up_to(niceness)


def may_renice_up_to(niceness: int) -> bool:
    """Whether this process may give any process of its user ``niceness`` however high that
    process's is now: with CAP_SYS_NICE, or where RLIMIT_NICE reaches it (Linux's set_one_prio
    asks the target's limit, and a child inherits ours)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - niceness <= soft:
        return True
    return _has_capability(CAP_SYS_NICE)


def _has_capability(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def session_niceness(pid: int) -> int | None:
    """The niceness of the session group the kernel schedules ``pid`` in; None without autogroup,
    or for a session in the root group (the kernel's own and the init's: their file reads empty)."""
    try:
        with open(AUTOGROUP.format(pid=pid)) as f:
            line = f.read().split()  # ["/autogroup-17", "nice", "10"]
    except FileNotFoundError:
        return None
    return int(line[-1]) if line else None


def set_session_niceness(niceness: int, pid: int) -> bool:
    """Sets the niceness of the session group of ``pid``, if it leads its session under autogroup
    (False otherwise: nothing to do). Raises OSError when refused, as set_niceness."""
    path = AUTOGROUP.format(pid=pid)
    if os.getsid(pid) != pid or not os.path.exists(path):
        return False
    for attempt in range(AUTOGROUP_TRIES):
        try:
            with open(path, "w") as f:
                f.write(str(niceness))
            break
        except BlockingIOError:
            if attempt == AUTOGROUP_TRIES - 1:
                raise
            time.sleep(AUTOGROUP_RETRY_S)
    return True


# -- a short section at real-time priority -------------------------------------------------------

# SCHED_FIFO's lowest priority: above every SCHED_OTHER thread, whatever its niceness or session
# group, and below any real-time thread the system runs.
REALTIME_PRIORITY = 1


class RealtimeSection:
    """Runs short sections of the calling thread at SCHED_FIFO ``priority``, back at its own
    policy (and niceness, which the kernel keeps) after each.

    On a shared core, a thread woken for a short piece of latency-bound work (a KV WRITE's copy)
    otherwise waits for, or is preempted by, whatever else runs there; a real-time thread runs
    until it blocks. So only bounded work that never waits in a loop belongs in a section: a
    thread that spun at this priority would starve its core's other threads (the kernel's RT
    throttling leaves them 5%). Linux keeps the policy per thread, so a section changes the
    calling thread only; SCHED_RESET_ON_FORK keeps a child forked meanwhile off real time.

    Where the kernel refuses (no CAP_SYS_NICE and RLIMIT_RTPRIO 0, or a cgroup without real-time
    runtime), logs once on ``log`` and runs every later section at the thread's own priority.
    A thread that is not SCHED_OTHER on entry (already real time, or batch/idle) is left as is."""

    def __init__(self, priority: int = REALTIME_PRIORITY, log: logging.Logger = logger, what: str = "section"):
        self.priority = priority
        self.enabled = True
        self._log = log
        self._what = what

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        if not self.enabled or os.sched_getscheduler(0) != os.SCHED_OTHER:
            yield
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(self.priority))
        except OSError as e:
            self.enabled = False
            self._log.warning("the %s runs at normal priority: SCHED_FIFO %d refused (%s)", self._what,
                              self.priority, e)
            yield
            return
        try:
            yield
        finally:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except OSError as e:  # lowering one's own priority is never refused; if it were, stop
                self.enabled = False
                self._log.error("the %s could not leave SCHED_FIFO (%s); no more sections", self._what, e)


# -- the scheduler's placement -----------------------------------------------------------------

# vLLM names its processes so (setproctitle): the scheduler, and the model runner it spawns.
SCHEDULER_PROCESS_TITLE = "VLLM::EngineCore"
RUNNER_PROCESS_TITLE = "VLLM::Worker"


def place_scheduler(niceness: int, share_runner_cores: bool, parent_pid: int | None = None) -> list[int]:
    """Pins each vLLM scheduler process under this process (or ``parent_pid``) to the cores of
    its own model runner, with ``share_runner_cores``; renices one that stays unpinned. It acts
    on every thread, since Linux keeps a niceness and an affinity per thread (threads started
    later inherit both). Needs no privilege. Returns the pids placed.

    On a CPU, vLLM schedules and runs the model in turn, and whichever side waits busy-polls the
    shared-memory queue with sched_yield. Left free, the scheduler spins on a core of its own,
    the one the frontend, Celery and Redis need; on its runner's cores the waiting side yields to
    the working one, and the engine costs those cores only. Only a scheduler that runs free is
    niced, to keep its spin behind our processes: a pinned one keeps the runner's niceness, or it
    loses its turns to the runner's spin. docs/benchmarks.md, "Scheduler placement"."""
    import psutil

    placed = []
    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if not _titled(child, SCHEDULER_PROCESS_TITLE):
                continue
            cores = _runner_cores(child) if share_runner_cores else None
            nice = 0 if cores else niceness
            for thread in child.threads():
                # Only ever up: the worker may run niced already (workers.nice), and lowering a
                # niceness needs a privilege.
                if nice and nice > os.getpriority(os.PRIO_PROCESS, thread.id):
                    os.setpriority(os.PRIO_PROCESS, thread.id, nice)
                if cores:
                    os.sched_setaffinity(thread.id, cores)
        except (psutil.Error, OSError) as e:
            logger.warning("could not place engine process %d: %s", child.pid, e)
            continue
        placed.append(child.pid)
        logger.info("vLLM scheduler process %d runs at niceness %d on cores %s", child.pid, nice,
                    ",".join(map(str, sorted(cores or child.cpu_affinity()))))
    if not placed:
        logger.warning("found no %s process to place", SCHEDULER_PROCESS_TITLE)
    return placed


class AdaptiveScheduler:
    """Moves pinned vLLM schedulers between their runner's cores and the worker's, by load.

    Pinned (``place_scheduler``), the scheduler and its runner take turns on one core, and a step
    hand-over waits for a ``sched_yield`` to come round; free, each busy-polls their queue from a
    core of its own and the hand-over is immediate, as in vLLM's own server. At one stream free
    is the faster; at many, the free scheduler's spin takes the
    core the frontend, Celery and Redis need, and pinned is far faster. So: pinned while the
    engine holds more than ``free_max`` requests, free once it has held at most that many for
    ``settle_s``. A burst pins at once; its tail frees only after the settle, so a closed loop at
    the boundary does not flap. ``free_max`` 0 keeps them pinned.

    Free, it runs at ``nice[1]`` (``engine.scheduler_nice``), pinned at ``nice[0]`` (the runner's):
    a free scheduler spinning at the frontend's and Celery's priority on their core starves the
    delivery of tokens, and a stream's tokens then arrive together at its end, as from vLLM's own
    server under load. The caller moves a scheduler only where it may renice it back.

    ``enter`` and ``leave`` run on the engine's loop thread, the only caller: no lock. A move
    sets the affinity and niceness of each scheduler thread (Linux keeps both per thread)."""

    def __init__(self, scheduler_pids: list[int], pinned: set[int], free: set[int], free_max: int,
                 settle_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 nice: tuple[int, int] = (0, 0)):
        self._pids = scheduler_pids if pinned and free != pinned and free_max > 0 else []
        self._cores = {True: pinned, False: free}
        self._nice = {True: nice[0], False: nice[1]}
        self.free_max, self.settle_s = free_max, settle_s
        self.held = 0
        self.pinned = True  # as place_scheduler left them
        self.moves = 0
        self._clock = clock
        self._quiet_since = clock()

    @property
    def adapts(self) -> bool:
        """Whether there is a scheduler to move."""
        return bool(self._pids)

    def enter(self) -> None:
        self.held += 1
        if self.held > self.free_max and not self.pinned:
            self._move(pinned=True)

    def leave(self) -> bool:
        """True when the engine is quiet enough to free the scheduler ``settle_s`` from now
        (call ``settle`` then)."""
        self.held -= 1
        if self.held > self.free_max:
            return False
        if self.held == self.free_max:
            self._quiet_since = self._clock()
        return self.adapts and self.pinned

    def settle(self) -> None:
        if self.pinned and self.held <= self.free_max and self._clock() - self._quiet_since >= self.settle_s:
            self._move(pinned=False)

    def _move(self, pinned: bool) -> None:
        self.pinned = pinned
        self.moves += 1
        cores, nice = self._cores[pinned], self._nice[pinned]
        for pid in self._pids:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                        # Pinned, niceness first: a free scheduler at its niceness would lose its
                        # turns on the runner's core for as long as it took.
                        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                        os.sched_setaffinity(int(tid), cores)
            except OSError as e:
                logger.warning("could not move scheduler process %d: %s", pid, e)
        logger.info("vLLM scheduler %s (cores %s, niceness %d) at %d request(s) held", "pinned" if pinned else "free",
                    ",".join(map(str, sorted(cores))), nice, self.held)


def _runner_cores(scheduler) -> set[int]:
    """The cores the scheduler's model runner(s) are bound to, or an empty set if none runs."""
    cores: set[int] = set()
    for proc in scheduler.children(recursive=True):
        if _titled(proc, RUNNER_PROCESS_TITLE):
            cores.update(proc.cpu_affinity())
    return cores


def _titled(proc, title: str) -> bool:
    return " ".join(proc.cmdline()).startswith(title)


# -- NIXL's agents -----------------------------------------------------------------------------

# How long NIXL's progress thread sleeps between idle polls, in microseconds. The worker decides
# it and the engine's processes, which inherit the environment, read it (kvtransfer/nixl_agents.py).
PROGRESS_DELAY_ENV = "LLMQ_NIXL_PROGRESS_DELAY_US"
DEFAULT_PROGRESS_DELAY_US = 1000


def nixl_agent_env(progress_delay_us: int) -> dict[str, str]:
    """The environment that gives the engine's NIXL agents this progress delay."""
    return {PROGRESS_DELAY_ENV: str(progress_delay_us)}


def progress_delay_us(environ: Mapping[str, str] = os.environ) -> int:
    """The progress delay the worker chose for this engine process (``nixl_agent_env``)."""
    return int(environ.get(PROGRESS_DELAY_ENV, DEFAULT_PROGRESS_DELAY_US))


def patch_progress_delay(bindings, delay_us: int) -> None:
    """Makes every NIXL agent created through ``bindings`` (NIXL's compiled ``nixlBind``) sleep
    ``delay_us`` between idle polls. Patches once: a second call leaves the first delay.

    NIXL's Python agent hard-codes a delay of 0, and its progress thread then busy-polls UCX, a
    whole core per idle agent. The thread stays on rather than off: UCX transports without
    one-sided reads (TCP, across hosts) need the side that holds the KV to make progress while
    its engine is idle. docs/benchmarks.md, "NIXL's progress delay"."""
    if not isinstance(bindings.nixlAgent, _AgentWithDelay):
        bindings.nixlAgent = _AgentWithDelay(bindings.nixlAgent, delay_us)


class _AgentWithDelay:
    """Stands in for NIXL's agent constructor, setting the delay in each agent's config."""

    def __init__(self, make_agent, delay_us: int):
        self.make_agent = make_agent
        self.delay_us = delay_us

    def __call__(self, name, config):
        config.pthrDelay = self.delay_us
        return self.make_agent(name, config)


# -- the gc freezes ----------------------------------------------------------------------------

def freeze_startup_heap() -> None:
    """Takes everything built so far out of the garbage collector's reach, as vLLM's own server
    does once it is up. For a worker whose engine has started: what start-up built (torch, vLLM,
    Celery) lives as long as the process, and a full collection of it is a pause for every stream
    on the worker; frozen, the collector walks only what serving allocates.
    docs/benchmarks.md, "The gc freeze"."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class PreforkFreeze:
    """Python's recipe for forking without exec (the gc module's docs), for gunicorn's master
    and its workers: no collections in the master, whose heap the workers share copy-on-write;
    its whole heap frozen before each fork; collections on again in each worker. A collection
    writes to the header of every object it walks, so without this a worker's first full
    collection copies the preloaded heap, inside the first requests after a start.
    docs/benchmarks.md, "The gc freeze". Disabled, every step does nothing."""

    enabled: bool = True

    def in_master(self) -> None:
        if self.enabled:
            gc.disable()

    def before_fork(self) -> None:
        if self.enabled:
            gc.freeze()

    def after_fork(self) -> None:
        if self.enabled:
            gc.enable()
