"""Who holds the CPU, thread by thread: a /proc sampler and its summary.

    python -m bench.cpu_trace record --out bench/out/trace.jsonl [--interval 0.2] [--duration 120]
    python -m bench.cpu_trace summary bench/out/trace.jsonl [--start UNIX --end UNIX] [--top 25]

``record`` reads, every interval, for every thread on the machine: its state, CPU time
(utime/stime), time on and waiting for a CPU (/proc/PID/task/TID/schedstat), page faults
(minflt/majflt) and context switches (voluntary/involuntary); and for the machine: /proc/stat's
CPU split (steal included) and CPU pressure (/proc/pressure/cpu). Each tick is one JSON line with
only the threads that changed, as deltas. Run it as root with a real-time priority
(``chrt -f 20``) so that it keeps sampling while ordinary processes are starved: a tick that comes
late even then means the whole machine (or the hypervisor under it) stopped, not a runaway thread.

``summary`` sums a window (by default the whole file) per process and per thread, and lists the
ticks that came late. bench/disagg_stall.py runs the recorder around each deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class ThreadSample:
    state: str
    utime: int
    stime: int
    minflt: int
    majflt: int
    run_ns: int
    wait_ns: int
    nvcsw: int = 0
    nivcsw: int = 0


def _stat_fields(text: str) -> tuple[str, list[str]]:
    """(comm, the fields after it): comm may hold spaces and parentheses."""
    close = text.rindex(")")
    return text[text.index("(") + 1:close], text[close + 2:].split()


def read_thread(pid: int, tid: int) -> tuple[str, ThreadSample] | None:
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/stat") as f:
            comm, rest = _stat_fields(f.read())
        with open(f"{base}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
    except (OSError, ValueError):
        return None
    # rest[0] is field 3 (state); minflt is field 10, majflt 12, utime 14, stime 15.
    return comm, ThreadSample(rest[0], int(rest[11]), int(rest[12]), int(rest[7]), int(rest[9]),
                              int(run_ns), int(wait_ns))


def read_switches(pid: int, tid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0, 0
    found = {k: int(v) for k, v in (line.split(":", 1) for line in lines
                                     if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))}
    return found.get("voluntary_ctxt_switches", 0), found.get("nonvoluntary_ctxt_switches", 0)


def read_cpu() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal


def read_psi() -> int:
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return 0


def process_name(pid: int) -> str:
    """The process title (vLLM sets VLLM::EngineCore / VLLM::Worker), else its comm."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    if cmd.startswith("VLLM::"):
        return f"{cmd.split()[0]}({_celery_name(pid)})"
    head = " ".join(cmd.split()[:3])  # the program and its module, not its arguments
    for marker, name in (("celery", "celery"), ("gunicorn", "gunicorn"), ("launcher", "launcher"),
                         ("redis-server", "redis"), ("bench", "bench"), ("pytest", "pytest")):
        if marker in head:
            return name
    if cmd.split(" ", 1)[0].rsplit("/", 1)[-1].startswith("python"):
        return "python " + " ".join(cmd.split()[1:3])[:40]
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _celery_name(pid: int) -> str:
    """The Celery worker name (``-n decode0@%h``) of the nearest ancestor that has one: tells the
    decode engine's processes from the prefill engine's."""
    for _ in range(6):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(_stat_fields(f.read())[1][1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            return "?"
        # Celery retitles its process ("[celeryd: decode0@vm:MainProcess] ... -n decode0@%h ...").
        found = re.search(r"(?:celeryd: |-n )([\w.-]+)@", cmd)
        if found:
            return found.group(1)
    return "?"


def record(out: Path, interval: float, duration: float | None) -> None:
    prev: dict[tuple[int, int], ThreadSample] = {}
    names: dict[int, str] = {}
    prev_cpu, prev_psi = read_cpu(), read_psi()
    end = time.monotonic() + duration if duration else float("inf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        f.write(json.dumps({"header": {"clk_tck": CLK_TCK, "interval": interval, "pid": os.getpid()}}) + "\n")
        last = time.monotonic()
        while time.monotonic() < end:
            started = time.monotonic()
            threads = []
            seen = set()
            for p in os.listdir("/proc"):
                if not p.isdigit():
                    continue
                pid = int(p)
                try:
                    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
                except OSError:
                    continue
                if pid not in names:
                    names[pid] = process_name(pid)
                for tid in tids:
                    got = read_thread(pid, tid)
                    if got is None:
                        continue
                    comm, s = got
                    key = (pid, tid)
                    seen.add(key)
                    old = prev.get(key)
                    if old is not None and (s.run_ns, s.minflt, s.majflt) == (old.run_ns, old.minflt, old.majflt) \
                            and s.state == old.state and s.state != "R":
                        s.nvcsw, s.nivcsw = old.nvcsw, old.nivcsw
                        prev[key] = s
                        continue
                    s.nvcsw, s.nivcsw = read_switches(pid, tid)
                    prev[key] = s
                    if old is None:
                        continue  # first sight: no delta yet
                    threads.append([pid, tid, names[pid], comm, s.state, s.utime - old.utime, s.stime - old.stime,
                                    s.run_ns - old.run_ns, s.wait_ns - old.wait_ns, s.nvcsw - old.nvcsw,
                                    s.nivcsw - old.nivcsw, s.minflt - old.minflt, s.majflt - old.majflt])
            for key in set(prev) - seen:
                del prev[key]
            for pid in set(names) - {k[0] for k in seen}:
                del names[pid]
            cpu, psi = read_cpu(), read_psi()
            now = time.monotonic()
            f.write(json.dumps({"t": round(time.time(), 3), "gap": round(started - last, 3),
                                "cost": round(now - started, 3),
                                "cpu": [a - b for a, b in zip(cpu, prev_cpu, strict=True)],
                                "psi_us": psi - prev_psi, "thr": threads}) + "\n")
            f.flush()
            prev_cpu, prev_psi, last = cpu, psi, started
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


THREAD_FIELDS = ("pid", "tid", "proc", "comm", "state", "utime", "stime", "run_ns", "wait_ns", "nvcsw", "nivcsw",
                 "minflt", "majflt")


def load(path: Path, start: float | None = None, end: float | None = None) -> list[dict]:
    ticks = []
    with path.open() as f:
        for line in f:
            tick = json.loads(line)
            if "header" in tick:
                continue
            if (start is None or tick["t"] >= start) and (end is None or tick["t"] - tick["gap"] <= end):
                ticks.append(tick)
    return ticks


def summarize(ticks: list[dict], top: int = 25) -> str:
    if not ticks:
        return "no samples in the window"
    span = ticks[-1]["t"] - ticks[0]["t"] + ticks[0]["gap"]
    cpu = [sum(t["cpu"][i] for t in ticks) for i in range(8)]
    total = sum(cpu) or 1
    lines = [f"window {span:.2f} s, {len(ticks)} ticks; machine CPU: user {cpu[0] / total:.0%} nice "
             f"{cpu[1] / total:.0%} system {cpu[2] / total:.0%} idle {cpu[3] / total:.0%} iowait "
             f"{cpu[4] / total:.0%} steal {cpu[7] / total:.0%}; CPU pressure (some) "
             f"{sum(t['psi_us'] for t in ticks) / 1e6 / span:.0%} of the window"]
    late = [t for t in ticks if t["gap"] > 1.0]
    if late:
        lines.append("late ticks (the sampler itself waited): " + ", ".join(
            f"{time.strftime('%H:%M:%S', time.gmtime(t['t']))} +{t['gap']:.1f}s" for t in late[:20]))
    per_proc: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0] * 7)
    per_thread: dict[tuple[int, int, str, str], list[float]] = defaultdict(lambda: [0.0] * 7)
    for tick in ticks:
        for row in tick["thr"]:
            rec = dict(zip(THREAD_FIELDS, row, strict=True))
            vals = [rec["run_ns"] / 1e9, rec["wait_ns"] / 1e9, (rec["utime"]) / CLK_TCK, rec["stime"] / CLK_TCK,
                    rec["nivcsw"], rec["minflt"], rec["majflt"]]
            for acc in (per_proc[(rec["pid"], rec["proc"])], per_thread[(rec["pid"], rec["tid"], rec["proc"],
                                                                          rec["comm"])]):
                for i, v in enumerate(vals):
                    acc[i] += v
    head = f"{'run s':>7} {'wait s':>7} {'user s':>7} {'sys s':>7} {'invol':>7} {'minflt':>8} {'majflt':>6}"

    def fmt(v: list[float]) -> str:
        return f"{v[0]:7.2f} {v[1]:7.2f} {v[2]:7.2f} {v[3]:7.2f} {v[4]:7.0f} {v[5]:8.0f} {v[6]:6.0f}"

    lines += ["", "per process (run = on a CPU, wait = runnable but waiting for one)", f"{head}  pid process"]
    for (pid, name), v in sorted(per_proc.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{fmt(v)}  {pid} {name}")
    lines += ["", f"{head}  pid/tid process:thread"]
    for (pid, tid, name, comm), v in sorted(per_thread.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{fmt(v)}  {pid}/{tid} {name}:{comm}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_trace", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="sample every thread on the machine into a JSON-lines file")
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--interval", type=float, default=0.2)
    rec.add_argument("--duration", type=float, default=None, help="seconds; default: until killed")
    summ = sub.add_parser("summary", help="sum a recorded window per process and thread")
    summ.add_argument("path", type=Path)
    summ.add_argument("--start", type=float, default=None, help="Unix time")
    summ.add_argument("--end", type=float, default=None, help="Unix time")
    summ.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.command == "record":
        try:
            record(args.out, args.interval, args.duration)
        except KeyboardInterrupt:
            pass
        return 0
    print(summarize(load(args.path, args.start, args.end), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
