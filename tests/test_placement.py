"""placement.py: the OpenMP bind mode, the scheduler's placement, NIXL's progress delay and the gc
freezes. Each probe that changes process-wide state (affinity, the collector) runs in a fresh
interpreter, since the test runner's own state is not the test's to change."""

import os
import subprocess
import sys

import psutil
import pytest

import placement
from config import load_settings
from conftest import ROOT, wait_for
from placement import (
    NOBIND,
    OMP_BIND_ENV,
    OMP_THREADS_ENV,
    OMP_WAIT_POLICY_ENV,
    PROGRESS_DELAY_ENV,
    RUNNER_PROCESS_TITLE,
    SCHEDULER_PROCESS_TITLE,
    engine_bind_env,
    engine_cores,
    nixl_agent_env,
    no_amx_when_unbound,
    patch_progress_delay,
    place_scheduler,
    progress_delay_us,
    spin_less_when_unbound,
    unbound_engine_env,
)


def probe(code: str, env: dict | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_imports_nothing_heavy_and_nothing_of_the_workers():
    # The frontend and the launcher import it, and both must start fast; the frontend must not
    # import workers/ or router/.
    heavy = ("vllm", "torch", "nixl", "nixl_cu12", "psutil", "workers", "router", "kvtransfer", "tasks", "app")
    out = probe(f"import sys, placement; print(sorted(m for m in {heavy!r} if m in sys.modules))")
    assert out == ["[]"]


# -- the OpenMP bind mode ----------------------------------------------------------------------

def test_several_engines_get_a_core_each_round_robin(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    envs = engine_cores(3, "auto")
    assert [e[OMP_BIND_ENV] for e in envs] == ["0", "1", "0"]


def test_engines_that_move_kv_get_cores_of_their_own_where_there_are_enough_and_wait_passively(monkeypatch):
    monkeypatch.delenv(OMP_THREADS_ENV, raising=False)
    monkeypatch.delenv(OMP_BIND_ENV, raising=False)
    monkeypatch.delenv(OMP_WAIT_POLICY_ENV, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cores = lambda n: [env[OMP_BIND_ENV] for env in engine_cores(n, "auto", moves_kv=True)]  # noqa: E731
    assert cores(2) == ["0", "1"]
    assert engine_cores(1, "auto", moves_kv=True) == [{OMP_THREADS_ENV: "2"}]  # alone on its node: unbound
    assert all(env[OMP_WAIT_POLICY_ENV] == "PASSIVE" for env in engine_cores(2, "auto", moves_kv=True))
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cores(2) == ["0-3", "4-7"] and cores(3) == ["0-1", "2-3", "4-7"]
    monkeypatch.setenv(OMP_WAIT_POLICY_ENV, "ACTIVE")  # the operator's choice is kept
    assert engine_cores(2, "auto", moves_kv=True) == [{OMP_BIND_ENV: "0-3"}, {OMP_BIND_ENV: "4-7"}]


def test_engines_that_move_kv_and_outnumber_the_cores_run_unbound_and_share_them_out(monkeypatch):
    monkeypatch.delenv(OMP_THREADS_ENV, raising=False)
    monkeypatch.delenv(OMP_BIND_ENV, raising=False)
    # They run unbound (engine_bind_env); the launcher must not pin them first, but sizes their
    # OpenMP teams so that together they have no more threads than the node has cores.
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert engine_cores(3, "auto", moves_kv=True) == [{OMP_THREADS_ENV: "1"}] * 3
    assert engine_cores(2, "nobind", moves_kv=True) == [{}, {}]
    # The operator's own thread count or binding reaches the workers unchanged.
    assert engine_cores(2, "auto", moves_kv=True, environ={OMP_THREADS_ENV: "3"}) == [{}, {}]
    assert engine_cores(2, "auto", moves_kv=True, environ={OMP_BIND_ENV: NOBIND}) == [{}, {}]


def test_one_engine_or_an_explicit_binding_is_left_to_vllm_and_the_config():
    assert engine_cores(1, "auto") == [{}]
    assert engine_cores(2, "0-1") == [{}, {}]


UNBOUND = {OMP_BIND_ENV: NOBIND, OMP_THREADS_ENV: "1", OMP_WAIT_POLICY_ENV: "PASSIVE"}


@pytest.mark.parametrize("bind,moves_kv,env", [
    ("auto", False, {}),                        # the launcher's core, or vLLM's own choice
    ("auto", True, UNBOUND),                    # an engine that moves KV runs unbound, and waits passively
    ("0-1", True, {OMP_BIND_ENV: "0-1"}),       # the config wins
    ("nobind", False, UNBOUND),
])
def test_a_worker_binds_its_engine_as_configured_or_unbound_when_it_moves_kv(bind, moves_kv, env):
    assert engine_bind_env(bind, moves_kv, environ={}) == env


def test_a_worker_keeps_the_cores_the_launcher_gave_its_engine():
    assert engine_bind_env("auto", True, environ={OMP_BIND_ENV: "1"}) == {}
    assert engine_bind_env("auto", True, environ={OMP_BIND_ENV: NOBIND}) == UNBOUND


def test_a_bind_list_names_its_cores():
    assert placement.cores_of("1") == {1}
    assert placement.cores_of("0-3") == {0, 1, 2, 3}
    assert placement.cores_of("0,2-3") == {0, 2, 3}


def test_the_launcher_keeps_decode_cores_for_decode_engines_only_where_each_engine_has_its_own():
    bound = [{OMP_BIND_ENV: "0-1"}, {OMP_BIND_ENV: "2"}, {OMP_BIND_ENV: "3"}]
    assert placement.host_cores(bound, [True, False, False]) == {2, 3}
    assert placement.host_cores(bound[:2], [True, True]) is None     # aggregated: no prefill engine's core
    assert placement.host_cores(bound[:2], [False, False]) is None   # a prefill-only node
    assert placement.host_cores([{OMP_THREADS_ENV: "1"}] * 2, [True, False]) is None  # unbound engines


@pytest.mark.parametrize("sets,roles,cores", [
    ([], {"decode", "prefill", "frontend"}, {1}),
    (["disagg.isolate_decode_cores=false"], {"decode", "prefill", "frontend"}, None),
    ([], {"decode", "frontend"}, None),  # a node of decode workers only
])
def test_the_launcher_runs_the_rest_on_the_prefill_engines_cores(monkeypatch, sets, roles, cores):
    from launcher.__main__ import host_cores

    for var in (OMP_THREADS_ENV, OMP_BIND_ENV, OMP_WAIT_POLICY_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    settings = load_settings(ROOT / "configs" / "disagg.yaml", sets, environ={})
    assert host_cores(settings, roles) == cores


def test_only_decode_engines_whose_cores_the_launcher_keeps_are_told_so(monkeypatch):
    from launcher.__main__ import worker_children

    for var in (OMP_THREADS_ENV, OMP_BIND_ENV, OMP_WAIT_POLICY_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    for sets, told in (([], {"decode0": "1", "prefill0": None}),
                       (["disagg.isolate_decode_cores=false"], {"decode0": None, "prefill0": None})):
        settings = load_settings(ROOT / "configs" / "disagg.yaml", sets, environ={})
        children = worker_children(settings, {"decode", "prefill"})
        assert {c.name: c.env.get(placement.OWN_CORES_ENV) for c in children} == told


def test_an_unbound_engine_keeps_the_thread_count_and_wait_policy_it_was_given():
    # The launcher's share of the cores (engine_cores), or the operator's own settings.
    assert unbound_engine_env({OMP_THREADS_ENV: "4"}) == {OMP_WAIT_POLICY_ENV: "PASSIVE"}
    assert unbound_engine_env({OMP_THREADS_ENV: "4", OMP_WAIT_POLICY_ENV: "ACTIVE"}) == {}
    assert engine_bind_env("auto", True, environ={OMP_THREADS_ENV: "2"}) == {
        OMP_BIND_ENV: NOBIND, OMP_WAIT_POLICY_ENV: "PASSIVE"}


# -- niceness ----------------------------------------------------------------------------------

def test_lowering_a_niceness_needs_cap_sys_nice_or_an_rlimit_nice_that_reaches_it(monkeypatch):
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setattr(placement, "_has_capability", lambda cap: False)
    monkeypatch.setattr("resource.getrlimit", lambda which: (0, 0))
    assert placement.may_lower_niceness(ours) and placement.may_lower_niceness(min(ours + 3, 19))
    assert not placement.may_lower_niceness(ours - 1)
    # RLIMIT_NICE counts 20 - niceness: 25 reaches -5, not -6.
    monkeypatch.setattr("resource.getrlimit", lambda which: (25, 25))
    assert placement.may_lower_niceness(-5) and not placement.may_lower_niceness(-6)
    monkeypatch.setattr(placement, "_has_capability", lambda cap: cap == placement.CAP_SYS_NICE)
    assert placement.may_lower_niceness(-20)


@pytest.mark.parametrize("allowed", [True, False])
def test_the_launcher_starts_workers_below_its_niceness_only_where_it_may(monkeypatch, allowed):
    from launcher.__main__ import worker_children

    monkeypatch.setattr(placement, "may_lower_niceness", lambda niceness: allowed)
    settings = load_settings(ROOT / "configs" / "agg.yaml", ["workers.nice=-5"], environ={})
    [child] = worker_children(settings, {"decode"})
    if allowed:
        assert child.argv[:3] == ["nice", "-n", "-5"] and child.nice == -5
    else:  # as without CAP_SYS_NICE: at the launcher's own niceness, the session's group untouched
        assert child.argv[0] != "nice" and child.nice == 0


def test_builders_leave_the_environment_alone(monkeypatch):
    monkeypatch.delenv(OMP_BIND_ENV, raising=False)
    monkeypatch.delenv(PROGRESS_DELAY_ENV, raising=False)
    before = dict(os.environ)
    engine_cores(3, "auto")
    engine_bind_env("auto", moves_kv=True)
    nixl_agent_env(250)
    assert dict(os.environ) == before


UNPIN_PROBE = """
import os, threading, placement
allowed = os.sched_getaffinity(0)
with placement.unpinned_from_kv_core():
    os.sched_setaffinity(0, {min(allowed)})  # as vLLM's NIXL worker pins the runner's thread
    seen = []
    started = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    started.start(); started.join()  # a thread started meanwhile inherits the pin
print(os.sched_getaffinity(0) == allowed, seen == [{min(allowed)}])
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to one of them")
@pytest.mark.parametrize("bind", [NOBIND, "0"])
def test_building_nixls_worker_half_leaves_the_engine_on_its_own_cores(bind):
    # Unbound, or bound by the launcher: vLLM's pin would move it onto the other engine's core.
    assert probe(UNPIN_PROBE, env=dict(os.environ, **{OMP_BIND_ENV: bind})) == ["True", "True"]


# -- the scheduler's placement -----------------------------------------------------------------

def test_pins_the_scheduler_to_its_runners_core_and_renices_it_only_when_unpinned():
    # A stand-in for an engine: the scheduler, and under it the runner it spawned, bound to one
    # core as vLLM binds it. argv[0] is what vLLM's setproctitle shows.
    core = min(os.sched_getaffinity(0))
    runner_cmd = f"taskset -c {core} bash -c 'exec -a {RUNNER_PROCESS_TITLE} sleep 60'"
    scheduler_cmd = f'(exec -a {SCHEDULER_PROCESS_TITLE} bash -c "{runner_cmd} & wait") & wait'
    parent = subprocess.Popen(["bash", "-c", scheduler_cmd])
    try:
        def engine():
            tree = psutil.Process(parent.pid).children(recursive=True)
            by_title = {p.cmdline()[0]: p for p in tree if p.cmdline()}
            return {SCHEDULER_PROCESS_TITLE, RUNNER_PROCESS_TITLE} <= set(by_title) and by_title
        procs = wait_for(engine, 10, "the stand-in engine to exec")
        scheduler, runner = procs[SCHEDULER_PROCESS_TITLE], procs[RUNNER_PROCESS_TITLE]
        assert runner.cpu_affinity() == [core]
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert place_scheduler(7, True, parent_pid=parent.pid) == [scheduler.pid]
        assert scheduler.cpu_affinity() == [core]
        assert os.getpriority(os.PRIO_PROCESS, scheduler.pid) == ours  # pinned: it takes turns, unniced
        assert place_scheduler(7, False, parent_pid=parent.pid) == [scheduler.pid]
        assert os.getpriority(os.PRIO_PROCESS, scheduler.pid) == 7  # free: niced behind our processes
        assert runner.nice() == ours
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.wait(timeout=10)



class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to one of them")
def test_the_scheduler_is_pinned_under_load_and_freed_once_the_load_settles_at_one_request():
    # A stand-in scheduler process with two threads, as the worker left it: pinned to one core.
    free = os.sched_getaffinity(0)
    pinned = {min(free)}
    stand_in = subprocess.Popen([sys.executable, "-c", "import threading, time\n"
                                 "threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"])
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{stand_in.pid}/task")) == 2, 10, "the stand-in's second thread")
        for tid in os.listdir(f"/proc/{stand_in.pid}/task"):
            os.sched_setaffinity(int(tid), pinned)

        ours = os.getpriority(os.PRIO_PROCESS, 0)
        free_nice = min(ours + 3, 19) if placement.may_renice_up_to(ours) else ours

        def threads_on() -> set[tuple[frozenset[int], int]]:
            return {(frozenset(os.sched_getaffinity(int(t))), os.getpriority(os.PRIO_PROCESS, int(t)))
                    for t in os.listdir(f"/proc/{stand_in.pid}/task")}

        clock = Clock()
        adaptive = placement.AdaptiveScheduler([stand_in.pid], pinned, free, free_max=1, settle_s=1.0, clock=clock,
                                               nice=(ours, free_nice))
        adaptive.enter()
        assert adaptive.leave()  # one request came and went: free it once the settle has passed
        clock.now = 0.5
        adaptive.settle()
        assert threads_on() == {(frozenset(pinned), ours)}  # not yet
        clock.now = 1.0
        adaptive.settle()
        assert threads_on() == {(frozenset(free), free_nice)} and not adaptive.pinned
        adaptive.enter()
        assert threads_on() == {(frozenset(free), free_nice)}  # one request: stays free
        adaptive.enter()
        assert threads_on() == {(frozenset(pinned), ours)} and adaptive.pinned  # two: pinned at once
        clock.now = 1.5
        assert adaptive.leave()  # back at one: quiet from now
        clock.now = 1.9
        adaptive.enter()  # a closed loop at the boundary: two again before the settle
        assert adaptive.leave()  # and one again: quiet from 1.9, not 1.5
        clock.now = 2.6
        adaptive.settle()  # the first drop's timer: 1.1 s after it, 0.7 after the last
        assert adaptive.pinned and threads_on() == {(frozenset(pinned), ours)}
        clock.now = 2.9
        adaptive.settle()
        assert not adaptive.pinned and threads_on() == {(frozenset(free), free_nice)}
        assert adaptive.adapts and adaptive.moves == 3  # freed, pinned, freed
    finally:
        stand_in.kill()
        stand_in.wait(timeout=10)


def test_no_scheduler_moves_where_nothing_was_pinned_or_free_max_is_0():
    cores = os.sched_getaffinity(0)
    for adaptive in (placement.AdaptiveScheduler([os.getpid()], cores, cores, free_max=1),  # the runner is unbound
                     placement.AdaptiveScheduler([os.getpid()], {min(cores)}, cores, free_max=0)):
        adaptive.enter()
        assert not adaptive.leave()  # nothing to settle, ever
        adaptive.settle()
        assert os.sched_getaffinity(0) == cores
        assert not adaptive.adapts and adaptive.moves == 0


# -- NIXL's agents -----------------------------------------------------------------------------

class FakeAgentConfig:
    pthrDelay = 0


class FakeBindings:
    """Stands in for NIXL's compiled bindings: records the config each agent was made with."""

    def __init__(self):
        self.made = []

    def nixlAgent(self, name, config):  # noqa: N802  the bindings' own spelling
        self.made.append((name, config.pthrDelay))
        return name


def test_progress_delay_reaches_every_agent_and_patches_once():
    bindings = FakeBindings()
    patch_progress_delay(bindings, 1000)
    patch_progress_delay(bindings, 5)  # a second import of the module must not stack wrappers
    assert bindings.nixlAgent("a", FakeAgentConfig()) == "a"
    assert bindings.made == [("a", 1000)]


def test_the_engines_processes_read_the_delay_the_worker_chose():
    assert progress_delay_us(nixl_agent_env(250)) == 250
    assert progress_delay_us(nixl_agent_env(0)) == 0
    assert progress_delay_us({}) == placement.DEFAULT_PROGRESS_DELAY_US == 1000


# -- the gc freezes ----------------------------------------------------------------------------

def test_the_start_up_heap_leaves_the_collectors_reach():
    out = probe("import gc, placement; held = [[] for _ in range(1000)]; placement.freeze_startup_heap(); "
                "seen = {id(o) for o in gc.get_objects()}; "
                "print(gc.get_freeze_count() >= 1000, gc.isenabled(), any(id(x) in seen for x in held))")
    # Frozen: the collector no longer sees the objects, and it still runs for new ones.
    assert out == ["True", "True", "False"]


@pytest.mark.parametrize("enabled", [True, False])
def test_prefork_freeze_stops_collections_in_the_master_and_freezes_before_each_fork(enabled):
    out = probe(f"import gc, placement; f = placement.PreforkFreeze({enabled}); f.in_master(); a = gc.isenabled(); "
                "f.before_fork(); b = gc.get_freeze_count() > 0; f.after_fork(); print(a, b, gc.isenabled())")
    assert out == (["False", "True", "True"] if enabled else ["True", "False", "True"])


def test_no_amx_when_unbound_only_touches_unbound_engines(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setenv(OMP_BIND_ENV, "0")
    assert not no_amx_when_unbound()
    assert torch.cpu._is_amx_tile_supported()
    monkeypatch.setenv(OMP_BIND_ENV, NOBIND)
    assert no_amx_when_unbound()
    assert not torch.cpu._is_amx_tile_supported()


class _FakeShmBroadcast:
    """vLLM's shm_broadcast as far as spin_less_when_unbound touches it."""

    def __init__(self):
        waits = self.waits = []

        class SpinCondition:
            def __init__(self):
                self.busy_loop_s = 1.0
                self.last_read = 0.0

            def wait(self, timeout_ms=None):  # vLLM's: sched_yield in the busy second, else poll
                waits.append(timeout_ms)

        self.SpinCondition = SpinCondition


def test_an_unbound_engines_queue_readers_nap_instead_of_spinning_and_keep_vllms_wait(monkeypatch):
    import time

    shm = _FakeShmBroadcast()
    existing = shm.SpinCondition()  # made before the patch, as the runner's step queue is
    monkeypatch.setenv(OMP_BIND_ENV, "0")
    assert not spin_less_when_unbound(shm)
    existing.wait(5)
    assert shm.waits == [5]
    monkeypatch.setenv(OMP_BIND_ENV, NOBIND)
    assert spin_less_when_unbound(shm) and spin_less_when_unbound(shm)  # patches once
    existing.last_read = time.monotonic()  # within the busy second: a nap, not vLLM's spin
    started = time.monotonic()
    existing.wait(5)
    assert shm.waits == [5] and time.monotonic() - started >= placement.UNBOUND_SHM_NAP_S
    existing.last_read = time.monotonic() - 2  # past it: vLLM's own wait for the notification
    existing.wait(7)
    shm.SpinCondition().wait(None)
    assert shm.waits == [5, 7, None]


def test_engines_that_move_kv_nap_even_when_bound_unless_their_cores_are_their_own(monkeypatch):
    # They have a core each and none is left over for the frontend, Celery and Redis, unless the
    # launcher keeps a decode engine's core for it.
    monkeypatch.setenv(OMP_BIND_ENV, "0")
    monkeypatch.setenv(placement.OWN_CORES_ENV, "1")
    assert not spin_less_when_unbound(_FakeShmBroadcast(), moves_kv=True)
    monkeypatch.delenv(placement.OWN_CORES_ENV)
    assert spin_less_when_unbound(_FakeShmBroadcast(), moves_kv=True)


_AMX_CHILD = """
import ctypes, multiprocessing, sys

def granted(queue):
    perm = ctypes.c_uint64(0)
    ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(perm))  # ARCH_GET_XCOMP_PERM
    queue.put(bool(perm.value & (1 << 18)))  # XTILEDATA

if __name__ == "__main__":
    from workers import orphans
    orphans.install()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ctx.Process(target=granted, args=(queue,)).start()
    print(queue.get(timeout=60))
"""


@pytest.mark.skipif("amx_tile" not in open("/proc/cpuinfo").read(), reason="this CPU has no AMX")
def test_every_process_a_worker_spawns_has_amx_permission_before_it_runs(tmp_path):
    # vLLM's AMX attention kernel never asks for the permission itself; a process without it dies
    # of SIGILL there. A freshly spawned Python process does not have it on its own.
    script = tmp_path / "amx.py"
    script.write_text(_AMX_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "True"
    bare = subprocess.run([sys.executable, "-c", _AMX_CHILD.split("if __name__")[0] +
                           "import queue; q = queue.Queue(); granted(q); print(q.get())"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert bare.strip() == "False"


# -- a short section at real-time priority -----------------------------------------------------

_REALTIME_CHILD = """
import logging, os, threading, placement
logging.basicConfig(level=logging.INFO, format="LOG:%(message)s")
rt = placement.RealtimeSection(what="probe")
seen = []
def thread():
    os.setpriority(os.PRIO_PROCESS, 0, 3)  # this thread's niceness (Linux keeps one per thread)
    with rt.section():
        seen.append((os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(0).sched_priority))
    seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))
t = threading.Thread(target=thread)
t.start()
t.join()
print(rt.enabled, *seen[0], *seen[1], os.sched_getscheduler(0), flush=True)
"""


def test_realtime_section_raises_only_the_calling_thread_and_restores_its_policy_and_niceness():
    enabled, inside, prio, after, nice, main = probe(_REALTIME_CHILD)
    if enabled == "False":
        pytest.skip("SCHED_FIFO is refused here (no CAP_SYS_NICE): the refusal has its own test")
    assert (int(inside), int(prio)) == (os.SCHED_FIFO, placement.REALTIME_PRIORITY)
    assert (int(after), int(nice)) == (os.SCHED_OTHER, 3)
    assert int(main) == os.SCHED_OTHER


def test_realtime_section_refused_logs_once_and_runs_at_normal_priority(monkeypatch, caplog):
    calls = []

    def refuse(pid, policy, param):
        calls.append(policy)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    rt = placement.RealtimeSection(what="probe")
    ran = 0
    with caplog.at_level("WARNING", logger=placement.logger.name):
        for _ in range(3):
            with rt.section():
                ran += 1
    assert ran == 3 and not rt.enabled and len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "the probe runs at normal priority: SCHED_FIFO 1 refused ([Errno 1] Operation not permitted)"]


def test_realtime_section_leaves_a_thread_that_is_not_sched_other_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_BATCH)
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: pytest.fail("changed a batch thread's policy"))
    with placement.RealtimeSection().section():
        pass


# -- niceness, by session ----------------------------------------------------------------------

def test_set_niceness_sets_a_session_leaders_group_and_only_the_process_of_a_session_it_does_not_lead():
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)
    member = subprocess.Popen(["sleep", "60"])  # in the test runner's session
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert placement.set_niceness(ours + 5, leader.pid).startswith(f"niceness {ours + 5}")
        assert os.getpriority(os.PRIO_PROCESS, leader.pid) == ours + 5
        assert placement.set_niceness(ours + 3, member.pid) == f"niceness {ours + 3}"
        assert os.getpriority(os.PRIO_PROCESS, member.pid) == ours + 3
        if not os.path.exists(placement.AUTOGROUP.format(pid=leader.pid)):
            pytest.skip("this kernel has no autogroup: the process's niceness is all there is")
        assert placement.session_niceness(leader.pid) == ours + 5
        # The runner's session is left alone (None when it is the root group, as in a container
        # whose init runs the tests in its own session).
        assert placement.session_niceness(member.pid) == placement.session_niceness(os.getpid())
    finally:
        for proc in (leader, member):
            proc.kill()
            proc.wait(timeout=10)
