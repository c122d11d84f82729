"""The decode worker lowers the priority of vLLM's busy-polling scheduler process, and only it."""

import os
import subprocess

import psutil
import pytest

from conftest import wait_for
from workers.engine import SCHEDULER_PROCESS_TITLE, lower_scheduler_priority


def test_renices_the_scheduler_process_and_leaves_the_model_runner():
    # A stand-in for an engine: two children whose argv[0] is what vLLM's setproctitle shows.
    parent = subprocess.Popen(["bash", "-c", f"(exec -a {SCHEDULER_PROCESS_TITLE} sleep 60) & "
                                             "(exec -a VLLM::Worker sleep 60) & wait"])
    try:
        def titles():
            kids = psutil.Process(parent.pid).children()
            return {p.cmdline()[0]: p.pid for p in kids if p.cmdline()}
        kids = wait_for(lambda: len(t := titles()) == 2 and "sleep" not in t and t, 10, "both children to exec")
        assert lower_scheduler_priority(7, parent_pid=parent.pid) == [kids[SCHEDULER_PROCESS_TITLE]]
        assert os.getpriority(os.PRIO_PROCESS, kids[SCHEDULER_PROCESS_TITLE]) == 7
        assert os.getpriority(os.PRIO_PROCESS, kids["VLLM::Worker"]) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        for child in psutil.Process(parent.pid).children():
            child.kill()
        parent.wait(timeout=10)


@pytest.mark.integration
def test_deployed_engine_scheduler_runs_niced(deployment):
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    by_title = {" ".join(p.cmdline()): p for p in tree}
    scheduler = [p for title, p in by_title.items() if title.startswith(SCHEDULER_PROCESS_TITLE)]
    runner = [p for title, p in by_title.items() if title.startswith("VLLM::Worker")]
    assert len(scheduler) == 1 and len(runner) == 1, sorted(by_title)
    assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in scheduler[0].threads()} == \
        {deployment.settings.engine.scheduler_nice} == {10}
    assert runner[0].nice() == 0
