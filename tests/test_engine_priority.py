"""A deployed decode worker puts vLLM's busy-polling scheduler process on its model runner's cores
while it holds more than one request and frees it at one, at the runner's niceness, workers.nice
(placement.place_scheduler and AdaptiveScheduler are tested in test_placement.py); the engine and
the gate run at their niceness in sessions of their own (placement.set_niceness)."""

import os
import re
import threading
import urllib.request

import psutil
import pytest

from conftest import live_status, wait_for
from placement import (
    RUNNER_PROCESS_TITLE,
    SCHEDULER_PROCESS_TITLE,
    may_lower_niceness,
    may_renice_up_to,
    session_niceness,
)


def engine_niceness(settings) -> int:
    """workers.nice where the launcher may take it; below this process's niceness without
    CAP_SYS_NICE, the launcher's own (the tests start it at theirs)."""
    nice = settings.workers.nice
    return nice if may_lower_niceness(nice) else os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.integration
def test_deployed_engine_scheduler_takes_its_runners_core_under_load_at_the_workers_niceness(deployment):
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    by_title = {" ".join(p.cmdline()): p for p in tree}
    scheduler = [p for title, p in by_title.items() if title.startswith(SCHEDULER_PROCESS_TITLE)]
    runner = [p for title, p in by_title.items() if title.startswith(RUNNER_PROCESS_TITLE)]
    assert len(scheduler) == 1 and len(runner) == 1, sorted(by_title)
    assert deployment.settings.engine.scheduler_nice == 10  # applies to a scheduler never pinned only
    assert deployment.settings.engine.scheduler_free_max_requests == 1
    nice = engine_niceness(deployment.settings)
    assert runner[0].nice() == nice
    # The runner is bound (one engine, vLLM's own binding).
    assert len(runner[0].cpu_affinity()) < (os.cpu_count() or 1)
    # Pinned: on the runner's cores at the runner's niceness. Free: on the worker's cores (which
    # it inherited) at engine.scheduler_nice, where the worker may bring it back (tests run as
    # root), else it stays pinned.
    pinned = {(tuple(runner[0].cpu_affinity()), nice)}
    free = {(tuple(scheduler[0].parent().cpu_affinity()), max(nice, 10))} if may_renice_up_to(nice) else pinned

    def placed() -> set[tuple[tuple[int, ...], int]]:
        return {(tuple(sorted(os.sched_getaffinity(t.id))), os.getpriority(os.PRIO_PROCESS, t.id))
                for t in scheduler[0].threads()}

    # Idle, or at one stream, it runs free; held more than one request, it is pinned.
    wait_for(lambda: placed() == free, 30, "the idle engine's scheduler to run free")
    client = deployment.client()
    seen: list[set] = []

    def stream() -> None:
        for _ in client.completions.create(model=deployment.settings.model.name, prompt="the load", max_tokens=400,
                                           stream=True, extra_body={"ignore_eos": True}):
            seen.append(placed())

    streams = [threading.Thread(target=stream) for _ in range(3)]
    for each in streams:
        each.start()
    for each in streams:
        each.join(timeout=120)
    assert not any(each.is_alive() for each in streams)
    assert pinned in seen  # while the three streamed
    wait_for(lambda: placed() == free, 30, "the scheduler to run free again")
    if free != pinned:  # the worker's /metrics says where it is, and that it moved
        status = next(w for w in live_status(deployment) if w.metrics_address)
        with urllib.request.urlopen(f"http://{status.metrics_address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert "llmq_decode_scheduler_pinned 0.0" in text
        moves = float(re.search(r"^llmq_decode_scheduler_moves_total (\S+)$", text, re.M).group(1))
        assert moves >= 3  # freed at start, pinned under the three streams, freed again


@pytest.mark.integration
def test_deployed_engine_and_gate_run_at_their_niceness_in_sessions_of_their_own(deployment):
    # Under autogroup a niceness weighs only against the processes of one's own session, so the
    # engine's and the gate's are set on their sessions' groups too.
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    engine = [p for p in tree if " ".join(p.cmdline()).startswith((SCHEDULER_PROCESS_TITLE, RUNNER_PROCESS_TITLE))]
    gate = [p for p in tree if p.cmdline()[1:3] == ["-m", "app.gate"]]
    assert len(engine) == 2 and len(gate) == 1, [p.cmdline() for p in tree]
    settings = deployment.settings
    for proc in engine:
        assert session_niceness(proc.pid) in (None, engine_niceness(settings))
    gate_pid = gate[0].pid
    assert os.getsid(gate_pid) == gate_pid
    assert settings.frontend.gate_nice == -10
    # As root (CAP_SYS_NICE) it runs at -10; as anyone else, at the launcher's niceness.
    expected = settings.frontend.gate_nice if os.geteuid() == 0 else os.getpriority(os.PRIO_PROCESS, 0)
    assert gate[0].nice() == expected
    assert session_niceness(gate_pid) in (None, expected)
