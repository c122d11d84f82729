"""Fresh disaggregated deployments in a row, each answering long prompts remotely:
`python -m bench.disagg_stall [--runs 5] [--out DIR]`.

Issue 12's "disaggregated stall": a fresh `configs/disagg.yaml` deployment's first KV transfers
froze every process for seconds to minutes. Per run, this starts the deployment fresh, sends
`--long` long prompts (`--input-len` tokens, temperature 0) one at a time, then `--pairs` pairs of
long prompts at once, and one short prompt. It records each request's latency, the decode worker's
remote prefills and local fallbacks (from its lease), and the deployment log's lines that show a
stall: Celery's "missed heartbeat" and clock "drift", vLLM's "No available shared memory
broadcast block", a lost worker. With `--trace` (the default), bench/cpu_trace.py samples every
thread on the machine from just before the first request to the end of the run; with `--perf`,
`perf record -a -g` records the same span.

A run passes when every long prompt was prefilled remotely, no request took longer than
`--max-request-s`, and the log has none of those lines. Results: `runs.jsonl` (a line per run),
`report.md`, and per run the trimmed deployment log and the trace, under the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.deploy import LauncherDeployment
from bench.output import default_out

logger = logging.getLogger(__name__)

# Lines in a deployment's log that mean some process stopped for seconds.
STALL_PATTERNS = {
    "missed_heartbeats": re.compile(r"missed heartbeat", re.I),
    "drift": re.compile(r"Substantial drift", re.I),
    "shm_broadcast": re.compile(r"No available shared memory broadcast block", re.I),
    "lost_worker": re.compile(r"was lost", re.I),
    "push_timeouts": re.compile(r"no push arrived within", re.I),
}


@dataclass
class RunResult:
    run: int
    started_unix: float
    startup_s: float
    latencies_s: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    remote_prefills: int = 0
    local_fallbacks: int = 0
    long_prompts: int = 0
    log_hits: dict[str, int] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)

    @property
    def longest_s(self) -> float:
        return max(self.latencies_s, default=0.0)

    def passed(self, max_request_s: float) -> bool:
        return (not self.errors and self.longest_s <= max_request_s and self.remote_prefills == self.long_prompts
                and not self.local_fallbacks and not any(self.log_hits.values()))


def prompt(run: int, k: int, length: int) -> list[int]:
    """Token ids of the tiny model's vocabulary, distinct per run and request (no prefix hits)."""
    return [10 + (i * 37 + run * 101 + k * 13) % 1500 for i in range(length)]


def complete(base_url: str, ids: list[int], max_tokens: int, timeout_s: float) -> float:
    body = json.dumps({"model": "tiny-llama", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{base_url}/completions", body, {"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout_s) as reply:
        answer = json.loads(reply.read())
    if answer["usage"]["completion_tokens"] != max_tokens:
        raise RuntimeError(f"{answer['usage']['completion_tokens']} tokens, not {max_tokens}")
    return time.monotonic() - started


def decode_counters(dep: LauncherDeployment) -> tuple[int, int]:
    from tasks.registry import live_workers

    fresh = time.time()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = live_workers(dep.redis, role="decode")
        if workers and all(w.updated_unix > fresh for w in workers):
            return sum(w.num_remote_prefills for w in workers), sum(w.num_local_fallbacks for w in workers)
        time.sleep(0.2)
    raise RuntimeError("no fresh decode lease within 20 s")


def one_run(i: int, args: argparse.Namespace, out: Path) -> RunResult:
    sets = dict(s.split("=", 1) for s in args.set)
    dep = LauncherDeployment(args.config, out / f"run{i:02d}", redis_db=args.redis_db, sets=sets,
                             name="disagg", ready_timeout_s=300)
    started = time.monotonic()
    tracer = None
    with dep:
        result = RunResult(i, time.time(), time.monotonic() - started)
        if args.trace:
            # Real-time, so that it samples through a stall of ordinary processes.
            tracer = subprocess.Popen(["chrt", "-f", "20", sys.executable, "-m", "bench.cpu_trace", "record",
                                       "--out", str(out / f"run{i:02d}" / "trace.jsonl"), "--interval",
                                       str(args.trace_interval)])
            time.sleep(1)
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "199", "-o",
                                     str(out / f"run{i:02d}" / "perf.data")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        before_remote, before_fallback = decode_counters(dep)
        jobs: list[list[tuple[str, list[int]]]] = [[("long", prompt(i, k, args.input_len))] for k in range(args.long)]
        jobs += [[("long", prompt(i, 100 + 2 * k, args.input_len)), ("long", prompt(i, 101 + 2 * k, args.input_len))]
                 for k in range(args.pairs)]
        jobs += [[("short", prompt(i, 999, 32))]]
        with ThreadPoolExecutor(2) as pool:
            for batch in jobs:
                futures = [(kind, pool.submit(complete, dep.base_url, ids, args.max_tokens, args.timeout_s))
                           for kind, ids in batch]
                for kind, fut in futures:
                    result.kinds.append(kind)
                    result.long_prompts += kind == "long"
                    try:
                        result.latencies_s.append(round(fut.result(), 3))
                    except Exception as e:  # noqa: BLE001  recorded, the run goes on
                        result.latencies_s.append(args.timeout_s)
                        result.errors.append(f"{type(e).__name__}: {e}")
        after_remote, after_fallback = decode_counters(dep)
        result.remote_prefills = after_remote - before_remote
        result.local_fallbacks = after_fallback - before_fallback
        if tracer is not None:
            tracer.terminate()
            tracer.wait(10)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            perf_report(out / f"run{i:02d}")
        log = dep.process.log_text() if dep.process else ""
    for name, pattern in STALL_PATTERNS.items():
        hits = [line for line in log.splitlines() if pattern.search(line)]
        result.log_hits[name] = len(hits)
        result.log_lines += hits[:5]
    return result


def perf_report(run_dir: Path) -> None:
    """The samples by command and symbol, kernel and user, into perf.txt beside perf.data."""
    with (run_dir / "perf.txt").open("w") as f:
        subprocess.run(["perf", "report", "-i", str(run_dir / "perf.data"), "--stdio", "--no-children",
                        "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0.5"], stdout=f,
                       stderr=subprocess.DEVNULL, timeout=300, check=False)


def report(results: list[RunResult], args: argparse.Namespace) -> str:
    passed = [r.passed(args.max_request_s) for r in results]
    streak = 0
    for ok in passed:
        streak = streak + 1 if ok else 0
    rows = ["| run | start s | latencies s | longest s | remote / long | fallbacks | stall lines | pass |",
            "| ---: | ---: | --- | ---: | ---: | ---: | --- | --- |"]
    for r, ok in zip(results, passed, strict=True):
        hits = ", ".join(f"{k} {v}" for k, v in r.log_hits.items() if v) or "none"
        rows.append(f"| {r.run} | {r.startup_s:.0f} | {' '.join(f'{x:.2f}' for x in r.latencies_s)} | "
                    f"{r.longest_s:.2f} | {r.remote_prefills} / {r.long_prompts} | {r.local_fallbacks} | {hits} | "
                    f"{'yes' if ok else 'NO'} |")
    head = (f"{sum(passed)} of {len(results)} runs passed (no request over {args.max_request_s:g} s, every long "
            f"prompt remote, no stall line in the log); longest request "
            f"{max((r.longest_s for r in results), default=0):.2f} s; missed-heartbeat lines "
            f"{sum(r.log_hits.get('missed_heartbeats', 0) for r in results)}.")
    return "\n".join([f"# disagg stall: {args.config} {' '.join('--set ' + s for s in args.set)}", "", head, "",
                      *rows, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.disagg_stall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="configs/disagg.yaml")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override, repeatable")
    parser.add_argument("--long", type=int, default=3, help="long prompts one at a time, per run")
    parser.add_argument("--pairs", type=int, default=1, help="pairs of long prompts sent at once, per run")
    parser.add_argument("--input-len", type=int, default=900)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--max-request-s", type=float, default=2.0, help="a run fails past this")
    parser.add_argument("--redis-db", type=int, default=4)
    parser.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--perf", action="store_true", help="also `perf record -a -g` the request phase "
                        "(perf.data and perf.txt in the run's folder)")
    parser.add_argument("--trace-interval", type=float, default=0.2)
    parser.add_argument("--keep-traces", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the trace of a run that passed (a failed run's is always kept)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = args.out or default_out("disagg-stall")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(args.runs):
        r = one_run(i, args, out)
        results.append(r)
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps({**asdict(r), "longest_s": r.longest_s, "passed": r.passed(args.max_request_s)}) + "\n")
        logger.info("run %d: latencies %s, remote %d/%d, fallbacks %d, stall lines %s", i, r.latencies_s,
                    r.remote_prefills, r.long_prompts, r.local_fallbacks, r.log_hits)
        if r.passed(args.max_request_s) and not args.keep_traces:
            (out / f"run{i:02d}" / "trace.jsonl").unlink(missing_ok=True)
    (out / "report.md").write_text(report(results, args))
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
