"""A deployed decode worker puts vLLM's busy-polling scheduler process on its model runner's cores,
at the runner's niceness, workers.nice (placement.place_scheduler itself is tested in test_placement.py)."""

import os

import psutil
import pytest

from placement import RUNNER_PROCESS_TITLE, SCHEDULER_PROCESS_TITLE


@pytest.mark.integration
def test_deployed_engine_scheduler_shares_its_runners_core_at_the_workers_niceness(deployment):
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    by_title = {" ".join(p.cmdline()): p for p in tree}
    scheduler = [p for title, p in by_title.items() if title.startswith(SCHEDULER_PROCESS_TITLE)]
    runner = [p for title, p in by_title.items() if title.startswith(RUNNER_PROCESS_TITLE)]
    assert len(scheduler) == 1 and len(runner) == 1, sorted(by_title)
    assert deployment.settings.engine.scheduler_nice == 10  # applies to a free-running scheduler only
    nice = deployment.settings.workers.nice
    assert nice == 10
    assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in scheduler[0].threads()} == {nice}
    assert runner[0].nice() == nice
    # The runner is bound (one engine, vLLM's own binding), and the scheduler shares its cores.
    assert len(runner[0].cpu_affinity()) < (os.cpu_count() or 1)
    assert {tuple(os.sched_getaffinity(t.id)) for t in scheduler[0].threads()} == {tuple(runner[0].cpu_affinity())}
