"""CPU, context switches and hot symbols per output token, process by process, under steady load.

    python -m bench.proc_sample --servers agg,vllm --rounds 2 --concurrency 128 --redis-db 4 \\
        --port 8400 --out bench/out/proc-sample

Each server (``agg``: configs/agg.yaml through the launcher; ``vllm``: stock ``vllm serve`` with
the same engine arguments, bench/vs_vllm.py's baseline) is started alone and given a closed loop
of synthetic requests (100 prompt tokens, 64 output tokens, ignore_eos) that runs until the
samples are taken. After ``--warm-s`` of streaming:

1. a counter window (``--window-s``): for every thread of every process of interest,
   /proc/PID/task/TID: utime and stime (stat), time on a CPU (schedstat), voluntary and
   involuntary context switches (status); and the output tokens the server counted (its
   /metrics) and the SSE chunks the client received, in the same window;
2. then a perf window (``--perf-s``): ``perf record -g`` on the same processes, reported per
   process as ``perf report --no-children --sort dso,sym``. perf's own sampling costs the processes
   some CPU, so the counters come from the window before it, and the tokens of both are kept.

The processes, found by command line: the frontend's gunicorn workers (and its master and gate),
the decode worker's Celery process (not its engine), the Redis server on :6379, vLLM's API server
process, and everything else in the server's tree (the engines) as ``engine``. Needs root for
perf (kernel symbols). Every start goes through the machine lock (``/work/wt/locked``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.deploy import LauncherDeployment, ProcessInfo, VllmServer
from bench.scenario import MachineState
from bench.vs_vllm import ENGINE_CONFIG
from bench.workloads import WorkloadParams, synthetic

logger = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
# The server's own count of output tokens, from its /metrics.
TOKEN_COUNTERS = {"agg": "llmq_frontend_completion_tokens_total", "vllm": "vllm:generation_tokens_total"}


@dataclass(frozen=True)
class ThreadCounters:
    utime: int  # clock ticks
    stime: int
    run_ns: int  # on a CPU (schedstat)
    voluntary: int
    involuntary: int

    def minus(self, other: ThreadCounters | None) -> ThreadCounters:
        if other is None:
            return self
        return ThreadCounters(self.utime - other.utime, self.stime - other.stime, self.run_ns - other.run_ns,
                              self.voluntary - other.voluntary, self.involuntary - other.involuntary)


def read_thread(pid: int, tid: int) -> ThreadCounters | None:
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/stat") as f:
            text = f.read()
        with open(f"{base}/schedstat") as f:
            run_ns = int(f.read().split()[0])
        with open(f"{base}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    except (OSError, ValueError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # rest[0] is field 3 (state): utime is field 14
    return ThreadCounters(int(rest[11]), int(rest[12]), run_ns, int(status["voluntary_ctxt_switches"]),
                          int(status["nonvoluntary_ctxt_switches"]))


def read_process(pid: int) -> dict[int, ThreadCounters]:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    found = {}
    for tid in tids:
        c = read_thread(pid, tid)
        if c is not None:
            found[tid] = c
    return found


def classify(tree: list[ProcessInfo], vllm_root: int | None) -> dict[str, list[int]]:
    """Role -> pids. Anything in the tree not named is the engine's (vLLM's processes)."""
    by_pid = {p.pid: p for p in tree}
    roles: dict[str, list[int]] = {}
    for p in tree:
        text = f"{p.name} {p.cmdline}"
        try:
            parent = psutil.Process(p.pid).ppid()
        except psutil.NoSuchProcess:
            continue
        parent_text = f"{by_pid[parent].name} {by_pid[parent].cmdline}" if parent in by_pid else ""
        if p.pid == vllm_root:
            role = "vllm_api"
        elif "gunicorn" in text:
            role = "frontend_worker" if "gunicorn" in parent_text else "frontend_master"
        elif "app.gate" in text:
            role = "gate"
        elif "celery" in text and "-Q decode" in text and "VLLM" not in text:
            role = "decode_celery"
        elif "launcher" in text and "serve" in text:
            role = "launcher"
        else:
            role = "engine"
        roles.setdefault(role, []).append(p.pid)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if (proc.info["name"] or "").startswith("redis-server") and ":6379" in " ".join(proc.info["cmdline"] or []):
            roles.setdefault("redis", []).append(proc.pid)
    return roles


def server_tokens(base_url: str, label: str) -> float | None:
    """The server's own output-token counter (summed over its label sets), or None."""
    name = TOKEN_COUNTERS[label]
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        logger.warning("could not read %s's metrics: %s", label, e)
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(re.escape(name) + r"(\{| )", line))


class Load:
    """A closed loop of streaming completions on its own thread, until ``stop``; the client's
    chunk arrival times (monotonic, in order) are kept for counting a window."""

    def __init__(self, base_url: str, concurrency: int, seed: int = 0):
        params = WorkloadParams(input_len_mean=100, input_len_std=0.0, output_len_mean=64, output_len_std=0.0)
        self.prompts = [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens)
                        for s in synthetic(random.Random(f"proc-sample:{seed}"), params, 4096)]
        self.base_url, self.concurrency = base_url, concurrency
        self.chunks: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def count(self, t0: float, t1: float) -> int:
        return bisect.bisect_left(self.chunks, t1) - bisect.bisect_left(self.chunks, t0)

    async def _run(self) -> None:
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=120)

        async def loop(k: int) -> None:
            i = k
            while not self._stop.is_set():
                prompt, max_tokens = self.prompts[i % len(self.prompts)]
                i += self.concurrency
                try:
                    stream = await client.completions.create(
                        model="tiny-llama", prompt=prompt, max_tokens=max_tokens, stream=True, temperature=0,
                        extra_body={"ignore_eos": True})
                    async with stream:
                        async for chunk in stream:
                            if chunk.choices:
                                self.chunks.append(time.monotonic())
                except (openai.OpenAIError, OSError) as e:
                    self.failed += 1
                    logger.warning("request failed: %s", e)
                    await asyncio.sleep(0.1)

        try:
            await asyncio.gather(*(loop(k) for k in range(self.concurrency)))
        finally:
            await client.close()


def _window(roles: dict[str, list[int]], before: dict[int, dict[int, ThreadCounters]],
            after: dict[int, dict[int, ThreadCounters]]) -> dict[str, dict]:
    """Per role: the sums over its processes' threads, and per process its threads' deltas."""
    out: dict[str, dict] = {}
    for role, pids in roles.items():
        procs = {}
        for pid in pids:
            threads = {tid: c.minus(before.get(pid, {}).get(tid)) for tid, c in after.get(pid, {}).items()}
            procs[pid] = {tid: asdict(c) for tid, c in threads.items()}
        out[role] = procs
    return out


def measure(label: str, base_url: str, tree: list[ProcessInfo], vllm_root: int | None, args, folder: Path) -> dict:
    roles = classify(tree, vllm_root)
    logger.info("[%s] processes: %s", label, {k: v for k, v in roles.items()})
    load = Load(base_url, args.concurrency)
    load.start()
    started = time.monotonic()
    while not load.chunks and time.monotonic() - started < 120:
        time.sleep(0.1)
    time.sleep(args.warm_s)
    pids = [pid for pids in roles.values() for pid in pids]
    tok0, t0 = server_tokens(base_url, label), time.monotonic()
    before = {pid: read_process(pid) for pid in pids}
    time.sleep(args.window_s)
    after = {pid: read_process(pid) for pid in pids}
    t1, tok1 = time.monotonic(), server_tokens(base_url, label)
    perf_file = folder / f"{label}.perf.data"
    perf_pids = [p for role in ("frontend_worker", "frontend_master", "gate", "decode_celery", "redis", "vllm_api")
                 for p in roles.get(role, [])]
    p0 = time.monotonic()
    subprocess.run(["perf", "record", "-F", str(args.perf_hz), "-g", "-q", "-o", str(perf_file),
                    "-p", ",".join(map(str, perf_pids)), "--", "sleep", str(args.perf_s)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p1 = time.monotonic()
    tok2 = server_tokens(base_url, label)
    names = {pid: thread_names(pid) for role in ("frontend_worker", "decode_celery", "vllm_api")
             for pid in roles.get(role, [])}
    load.stop()
    return {"label": label, "roles": roles, "window_s": t1 - t0,
            "server_tokens": None if tok0 is None or tok1 is None else tok1 - tok0,
            "client_chunks": load.count(t0, t1), "perf_window_s": p1 - p0,
            "perf_server_tokens": None if tok1 is None or tok2 is None else tok2 - tok1,
            "perf_client_chunks": load.count(p0, p1), "failed": load.failed, "perf_file": str(perf_file),
            "threads": _window(roles, before, after),
            "thread_names": names}


def thread_names(pid: int) -> dict[int, str]:
    """tid -> the Python thread's name (py-spy dump), for the threads Python knows."""
    try:
        text = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "dump", "--pid", str(pid)],
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("py-spy dump of %d failed: %s", pid, e)
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \([^)]*\): "(.*)"', text, re.M)}


def thread_kind(name: str | None) -> str:
    """A thread's name with its numbers folded ("ThreadPoolExecutor-0_12" -> "ThreadPoolExecutor-#_#"),
    "native" for one Python does not know."""
    return re.sub(r"\d+", "#", name) if name else "native"


def perf_samples(perf_file: str) -> list[tuple[int, int, str, str]]:
    """(samples, tid, dso, symbol) rows of ``perf report --no-children --sort pid,dso,sym``. perf's
    ``pid`` key is the thread's id, and its --pid filter keeps only the main threads' samples, so
    the rows are grouped into processes here, by the tids the counter window saw."""
    try:
        text = subprocess.run(["perf", "report", "-i", perf_file, "--no-children", "--sort", "pid,dso,sym", "--stdio",
                               "-g", "none", "-n", "-t", "|"], capture_output=True, text=True, timeout=600).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("perf report failed: %s", e)
        return []
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 5 and parts[0].endswith("%") and parts[1].isdigit():
            rows.append((int(parts[1]), int(parts[2].split(":", 1)[0]), parts[3],
                         re.sub(r"^\[[.k]\]\s*", "", parts[4])))
    return rows


def perf_top(rows: list[tuple[int, int, str, str]], tids: set[int], top: int,
             by_dso: bool = False) -> list[tuple[float, str, str]]:
    """(percent of these threads' samples, dso, symbol or "" by dso), the top `top`."""
    totals: dict[tuple[str, str], int] = {}
    for n, tid, dso, sym in rows:
        if tid in tids:
            key = (dso, "" if by_dso else sym)
            totals[key] = totals.get(key, 0) + n
    whole = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(100 * n / whole, dso, sym) for (dso, sym), n in ranked]


def summarize(sample: dict, top: int) -> dict[str, dict]:
    tokens = sample["server_tokens"] or sample["client_chunks"]
    perf_rows = perf_samples(sample["perf_file"])
    rows: dict[str, dict] = {}
    for role, procs in sample["threads"].items():
        tids = {int(tid) for threads in procs.values() for tid in threads}
        per_proc = []
        for pid, threads in procs.items():
            t = {k: sum(c[k] for c in threads.values()) for k in ("utime", "stime", "run_ns", "voluntary",
                                                                  "involuntary")}
            busiest = max(threads.items(), key=lambda kv: kv[1]["run_ns"], default=(0, None))
            per_proc.append({"pid": int(pid), "threads": len(threads), **t,
                             "busiest_tid": int(busiest[0]), "busiest": busiest[1],
                             "main": threads.get(pid)})
        total = {k: sum(p[k] for p in per_proc) for k in ("utime", "stime", "run_ns", "voluntary", "involuntary")}
        ticks = total["utime"] + total["stime"]
        cpu_us = total["run_ns"] / 1e3
        kinds: dict[str, dict[str, float]] = {}
        for pid, threads in procs.items():
            names = sample.get("thread_names", {}).get(pid, {})
            for tid, c in threads.items():
                k = kinds.setdefault(thread_kind(names.get(tid)), dict.fromkeys(
                    ("threads", "utime", "stime", "run_ns", "voluntary", "involuntary"), 0))
                k["threads"] += 1
                for key in ("utime", "stime", "run_ns", "voluntary", "involuntary"):
                    k[key] += c[key]
        by_kind = {name: {"threads": k["threads"], "cpu_us_per_token": k["run_ns"] / 1e3 / tokens,
                          "sys_share": k["stime"] / (k["utime"] + k["stime"]) if k["utime"] + k["stime"] else None,
                          "voluntary_per_token": k["voluntary"] / tokens,
                          "involuntary_per_token": k["involuntary"] / tokens}
                   for name, k in kinds.items() if tokens}
        rows[role] = {"by_thread_kind": by_kind,
            "processes": len(per_proc), "tokens": tokens, "tok_per_s": tokens / sample["window_s"],
            "cpu_us_per_token": cpu_us / tokens if tokens else None,
            # schedstat's time on a CPU, split by the tick-sampled user/system ratio.
            "user_us_per_token": cpu_us * total["utime"] / ticks / tokens if ticks and tokens else None,
            "sys_us_per_token": cpu_us * total["stime"] / ticks / tokens if ticks and tokens else None,
            "cores": cpu_us / 1e6 / sample["window_s"],
            "voluntary_per_token": total["voluntary"] / tokens if tokens else None,
            "involuntary_per_token": total["involuntary"] / tokens if tokens else None,
            "per_process": per_proc,
            "perf_samples": sum(n for n, tid, _, _ in perf_rows if tid in tids),
            "perf_top": perf_top(perf_rows, tids, top), "perf_dso": perf_top(perf_rows, tids, 8, by_dso=True)}
    return rows


def markdown(results: list[dict]) -> str:
    lines = ["# CPU and context switches per output token, by process", ""]
    for r in results:
        s = r["sample"]
        lines += [f"## `{r['label']}`, round {r['round']} (load average at start {r['machine']['load_1m']:.2f})", "",
                  f"- counter window {s['window_s']:.2f} s: {s['server_tokens']} tokens by the server's count, "
                  f"{s['client_chunks']} chunks at the client; perf window {s['perf_window_s']:.2f} s: "
                  f"{s['perf_server_tokens']} tokens; failed requests {s['failed']}", "",
                  "| process | n | tok/s | cores | CPU µs/tok (user / sys) | ctx sw/tok (vol / invol) "
                  "| top 5 symbols |",
                  "| --- | ---: | ---: | ---: | --- | --- | --- |"]
        for role, row in r["summary"].items():
            top5 = "; ".join(f"{pct:.1f}% {sym} ({dso})" for pct, dso, sym in row["perf_top"][:5])
            lines.append(f"| {role} | {row['processes']} | {row['tok_per_s']:.0f} | {row['cores']:.2f} | "
                         f"{_f(row['cpu_us_per_token'])} ({_f(row['user_us_per_token'])} / "
                         f"{_f(row['sys_us_per_token'])}) | {_f(row['voluntary_per_token'], 2)} / "
                         f"{_f(row['involuntary_per_token'], 2)} | {top5} |")
        lines += ["", "| process | thread kind | threads | CPU µs/tok | sys share | ctx sw/tok (vol / invol) |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for role, row in r["summary"].items():
            for kind, k in sorted(row["by_thread_kind"].items(), key=lambda kv: -kv[1]["cpu_us_per_token"]):
                if k["cpu_us_per_token"] >= 0.5 or k["voluntary_per_token"] >= 0.01:
                    lines.append(f"| {role} | {kind} | {k['threads']} | {k['cpu_us_per_token']:.1f} | "
                                 f"{_f(k['sys_share'], 2)} | {k['voluntary_per_token']:.3f} / "
                                 f"{k['involuntary_per_token']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _int_keys(value):
    """JSON's string keys back to the pids and tids they were."""
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="agg,vllm", help="agg and/or vllm, in the order of the first round")
    parser.add_argument("--rounds", type=int, default=1, help="every server this many times, the order reversed "
                                                              "each round")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--warm-s", type=float, default=8.0, help="streaming before the counter window")
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--perf-s", type=float, default=5.0)
    parser.add_argument("--perf-hz", type=int, default=999)
    parser.add_argument("--top", type=int, default=25, help="perf symbols kept per process role")
    parser.add_argument("--redis-db", type=int, default=4)
    parser.add_argument("--port", type=int, default=8400, help="agg's port; vllm's is the next one")
    parser.add_argument("--out", type=Path, default=Path("bench/out/proc-sample"))
    parser.add_argument("--from-samples", type=Path, help="only summarize an earlier run's samples.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    samples = _int_keys(json.loads(args.from_samples.read_text())) if args.from_samples else []
    for i in range(0 if args.from_samples else args.rounds):
        for label in servers if i % 2 == 0 else servers[::-1]:
            folder = args.out / f"round-{i + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            machine = MachineState.now()
            server: LauncherDeployment | VllmServer
            if label == "agg":
                server = LauncherDeployment("configs/agg.yaml", folder / "logs", args.redis_db, port=args.port,
                                            name=label)
            elif label == "vllm":
                server = VllmServer(ENGINE_CONFIG, folder / "logs", port=args.port + 1, name=label)
            else:
                raise SystemExit(f"unknown server {label!r}: agg or vllm")
            with server:
                root = server.process.pid if label == "vllm" and server.process else None
                sample = measure(label, server.base_url, server.process_tree(), root, args, folder)
            samples.append({"label": label, "round": i + 1, "machine": asdict(machine), "sample": sample})
            (args.out / "samples.json").write_text(json.dumps(samples, default=str))
    # perf report after the servers are gone: its CPU does not land in a window.
    results = [{**s, "summary": summarize(s["sample"], args.top)} for s in samples]
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "report.md").write_text(markdown(results))
    print(args.out / "report.md")


if __name__ == "__main__":
    main()
