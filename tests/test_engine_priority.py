"""The decode worker puts vLLM's busy-polling scheduler process on its model runner's cores, and
lowers the priority of a scheduler that it cannot pin, and only of it."""

import os
import subprocess

import psutil
import pytest

from conftest import wait_for
from workers.engine import RUNNER_PROCESS_TITLE, SCHEDULER_PROCESS_TITLE, place_scheduler


def test_pins_the_scheduler_to_its_runners_core_and_renices_it_only_when_unpinned():
    # A stand-in for an engine: the scheduler, and under it the runner it spawned, bound to one
    # core as vLLM binds it. argv[0] is what vLLM's setproctitle shows.
    core = min(os.sched_getaffinity(0))
    runner_cmd = f"taskset -c {core} bash -c 'exec -a {RUNNER_PROCESS_TITLE} sleep 60'"
    parent = subprocess.Popen(
        ["bash", "-c", f'(exec -a {SCHEDULER_PROCESS_TITLE} bash -c "{runner_cmd} & wait") & wait'])
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


@pytest.mark.integration
def test_deployed_engine_scheduler_shares_its_runners_core_unniced(deployment):
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    by_title = {" ".join(p.cmdline()): p for p in tree}
    scheduler = [p for title, p in by_title.items() if title.startswith(SCHEDULER_PROCESS_TITLE)]
    runner = [p for title, p in by_title.items() if title.startswith("VLLM::Worker")]
    assert len(scheduler) == 1 and len(runner) == 1, sorted(by_title)
    assert deployment.settings.engine.scheduler_nice == 10  # applies to a free-running scheduler only
    assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in scheduler[0].threads()} == {0}
    assert runner[0].nice() == 0
    # The runner is bound (one engine, vLLM's own binding), and the scheduler shares its cores.
    assert len(runner[0].cpu_affinity()) < (os.cpu_count() or 1)
    assert {tuple(os.sched_getaffinity(t.id)) for t in scheduler[0].threads()} == {tuple(runner[0].cpu_affinity())}
