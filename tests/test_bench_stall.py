"""bench/cpu_trace.py and bench/disagg_stall.py: their pure parts, and the sampler on this machine
for a moment (no engine, no server)."""

import argparse
import json
import os
import threading
import time

from bench import cpu_trace
from bench.disagg_stall import STALL_PATTERNS, RunResult, prompt, report


def test_stat_fields_survive_a_comm_with_spaces_and_parentheses():
    comm, rest = cpu_trace._stat_fields("42 (VLLM::Worker (x) y) R 1 2 3")
    assert comm == "VLLM::Worker (x) y" and rest[:2] == ["R", "1"]


def test_reads_this_threads_cpu_time_and_names_this_process():
    got = cpu_trace.read_thread(os.getpid(), threading.get_native_id())
    assert got is not None
    _, sample = got
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    _, later = cpu_trace.read_thread(os.getpid(), threading.get_native_id())
    assert later.run_ns > sample.run_ns and later.utime + later.stime >= sample.utime + sample.stime
    assert cpu_trace.process_name(os.getpid()) == "pytest"


def test_records_ticks_and_sums_them_per_process(tmp_path):
    out = tmp_path / "trace.jsonl"
    cpu_trace.record(out, interval=0.1, duration=0.5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert "header" in lines[0] and len(lines) >= 4
    assert all(len(tick["cpu"]) == 8 for tick in lines[1:])
    text = cpu_trace.summarize(cpu_trace.load(out))
    assert "machine CPU" in text and "per process" in text


def test_summary_sums_a_window_and_lists_late_ticks():
    row = [7, 8, "VLLM::Worker(decode0)", "VLLM::Worker", "R", 10, 5, 2_000_000_000, 3_000_000_000, 0, 900, 4, 1]
    ticks = [{"t": 100.0 + i, "gap": 1.0 if i < 2 else 9.0, "cost": 0.01, "cpu": [1, 0, 1, 0, 0, 0, 0, 0],
              "psi_us": 500_000, "thr": [row]} for i in range(3)]
    text = cpu_trace.summarize(ticks)
    assert "+9.0s" in text  # the third tick came 9 s late
    proc_line = next(line for line in text.splitlines() if line.endswith("7 VLLM::Worker(decode0)"))
    assert proc_line.split()[:2] == ["6.00", "9.00"]  # run and run-queue wait, summed over 3 ticks
    assert cpu_trace.summarize([]) == "no samples in the window"


def test_prompts_differ_per_run_and_request():
    assert prompt(0, 0, 900) != prompt(1, 0, 900) != prompt(1, 1, 900)
    assert len(prompt(3, 2, 900)) == 900 and all(10 <= t < 1510 for t in prompt(3, 2, 900))


def test_a_run_passes_only_if_fast_remote_and_quiet():
    ok = RunResult(0, 0.0, 30.0, latencies_s=[0.5, 1.9], kinds=["long", "long"], remote_prefills=2, long_prompts=2,
                   log_hits={name: 0 for name in STALL_PATTERNS})
    assert ok.passed(2.0)
    assert not RunResult(**{**vars(ok), "latencies_s": [0.5, 2.1]}).passed(2.0)
    assert not RunResult(**{**vars(ok), "remote_prefills": 1}).passed(2.0)
    assert not RunResult(**{**vars(ok), "local_fallbacks": 1}).passed(2.0)
    assert not RunResult(**{**vars(ok), "errors": ["timeout"]}).passed(2.0)
    assert not RunResult(**{**vars(ok), "log_hits": {"missed_heartbeats": 1}}).passed(2.0)
    args = argparse.Namespace(max_request_s=2.0, config="configs/disagg.yaml", set=[])
    text = report([ok, RunResult(**{**vars(ok), "run": 1, "latencies_s": [3.0]})], args)
    assert "1 of 2 runs passed" in text and "longest request 3.00 s" in text


def test_stall_patterns_match_the_lines_they_are_for():
    lines = {
        "missed_heartbeats": "[decode0] [..: WARNING/MainProcess] missed heartbeat from prefill0@vm",
        "drift": "Substantial drift from prefill0@vm may mean clocks are out of sync.  Current drift is 9 seconds.",
        "shm_broadcast": "No available shared memory broadcast block found in 60 seconds.",
        "lost_worker": "worker decode0@vm was lost; retry it",
        "push_timeouts": "[abc] no push arrived within 30.0s of registering; failing the receive",
    }
    for name, line in lines.items():
        assert STALL_PATTERNS[name].search(line), name
