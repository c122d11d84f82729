"""bench/proc_sample.py: its pure parts, and the /proc reader on this process."""

from __future__ import annotations

import os
import threading

from bench import proc_sample


def test_reads_this_threads_counters():
    got = proc_sample.read_thread(os.getpid(), threading.get_native_id())
    assert got is not None and got.run_ns > 0 and got.voluntary >= 0
    assert got.minus(got) == proc_sample.ThreadCounters(0, 0, 0, 0, 0)
    assert threading.get_native_id() in proc_sample.read_process(os.getpid())


def test_perf_rows_are_grouped_by_the_threads_given():
    rows = [(6, 10, "libpython3.11.so.1.0", "_PyEval_EvalFrameDefault"), (2, 11, "[kernel.kallsyms]", "schedule"),
            (2, 10, "[kernel.kallsyms]", "schedule"), (90, 99, "libc.so.6", "memcpy")]
    assert proc_sample.perf_top(rows, {10, 11}, 5) == [(60.0, "libpython3.11.so.1.0", "_PyEval_EvalFrameDefault"),
                                                       (40.0, "[kernel.kallsyms]", "schedule")]
    assert proc_sample.perf_top(rows, {10, 11}, 1, by_dso=True) == [(60.0, "libpython3.11.so.1.0", "")]


def test_thread_kinds_fold_numbers_and_keys_come_back_as_ints():
    assert proc_sample.thread_kind("ThreadPoolExecutor-0_12") == "ThreadPoolExecutor-#_#"
    assert proc_sample.thread_kind(None) == "native"
    assert proc_sample._int_keys({"12": {"34": [{"a": 1}]}}) == {12: {34: [{"a": 1}]}}
