"""Where a deployment's time goes under load: `python -m bench profile`.

Starts a deployment, drives the synthetic workload at each concurrency, and meanwhile runs
`py-spy record --format raw` on every Python process of the deployment (the gunicorn workers,
the Celery decode worker, vLLM's EngineCore and Worker processes) for a fixed window. It also
reads each process's CPU time over the same window (psutil), so the report says both how the
CPU is split between processes and, inside each, which functions and packages take it.

py-spy samples only threads that are running (not idle in a system call) and does not pause the
target (--nonblocking), so percentages are of a process's busy samples. The summaries are pure
functions of the collapsed-stack text, below.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.deploy import LauncherDeployment, ProcessInfo
from bench.flags import help_text
from bench.runner import RunOptions
from bench.scenario import MachineState, Workload, fmt, measure, table, write_json
from bench.workloads import WorkloadKind, WorkloadParams

logger = logging.getLogger(__name__)

# A frame as py-spy writes it with --nolineno: "function (path/of/file.py)".
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
# What a sample of a thread with no Python frame (a native thread, e.g. torch's OpenMP pool) counts as.
NATIVE = "(no Python frame)"
TOP_N = 15



@dataclass(frozen=True)
class ProfileSpec:
    """The scenario's knobs; `python -m bench profile`'s flags are generated from these."""

    config: str = field(default="configs/agg.yaml", metadata=help_text("the deployment to profile"))
    concurrency: str = field(default="1,32", metadata=help_text("closed-loop concurrencies, one window each"))
    duration_s: float = field(default=20.0, metadata=help_text("py-spy's window at each concurrency"))
    rate_hz: int = field(default=50, metadata=help_text("py-spy samples per second"))
    input_len: int = field(default=100, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request"))
    redis_db: int = field(default=3, metadata=help_text("Redis database (1-5), flushed before the start"))
    sets: str = field(default="", metadata=help_text(
        "config overrides, comma-separated KEY=VALUE (model.path=...,model.name=...,engine.dtype=float32)"))

    @property
    def overrides(self) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in self.sets.split(",") if kv.strip())

    @property
    def model_name(self) -> str:
        return self.overrides.get("model.name", "tiny-llama")


# -- collapsed stacks: pure --------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    func: str
    file: str

    @property
    def package(self) -> str:
        """The top-level package or project folder a frame's file belongs to."""
        path = self.file.split("site-packages/")[-1]
        head = path.split("/")[0]
        return head[:-3] if head.endswith(".py") else head

    @property
    def label(self) -> str:
        return f"{self.func} ({self.file})"


def parse_frame(text: str) -> Frame:
    m = FRAME.match(text.strip())
    return Frame(m["func"], m["file"]) if m else Frame(text.strip(), "")


def parse_collapsed(text: str) -> list[tuple[tuple[Frame, ...], int]]:
    """py-spy's raw format: one stack per line, root first, frames joined by ';', then a count.
    A leading "process ..." or "thread ..." pseudo-frame is dropped."""
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f.strip() and not f.startswith(("process ", "thread "))]
        stacks.append((tuple(parse_frame(f) for f in frames) or (Frame(NATIVE, "native"),), int(count)))
    return stacks


@dataclass(frozen=True)
class Share:
    name: str
    samples: int
    percent: float


def _shares(counts: Counter, total: int, n: int) -> list[Share]:
    return [Share(name, c, 100 * c / total if total else 0.0) for name, c in counts.most_common(n)]


def self_time(stacks: Iterable[tuple[tuple[Frame, ...], int]], n: int = TOP_N) -> list[Share]:
    """Functions by the samples in which they were the innermost frame."""
    stacks = list(stacks)
    counts = Counter({})
    for frames, c in stacks:
        if frames:
            counts[frames[-1].label] += c
    return _shares(counts, sum(c for _, c in stacks), n)


def inclusive_time(stacks: Iterable[tuple[tuple[Frame, ...], int]], n: int = TOP_N) -> list[Share]:
    """Functions by the samples in which they were anywhere on the stack (counted once each)."""
    stacks = list(stacks)
    counts = Counter({})
    for frames, c in stacks:
        for label in {f.label for f in frames}:
            counts[label] += c
    return _shares(counts, sum(c for _, c in stacks), n)


def by_package(stacks: Iterable[tuple[tuple[Frame, ...], int]], n: int = TOP_N) -> list[Share]:
    """Self time grouped by the innermost frame's package (vllm, torch, redis, app, ...)."""
    stacks = list(stacks)
    counts = Counter({})
    for frames, c in stacks:
        if frames:
            counts[frames[-1].package] += c
    return _shares(counts, sum(c for _, c in stacks), n)


# -- running py-spy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """A deployment process worth profiling, recognised by its name or command line."""

    name: str
    pid: int


def roles_of(tree: list[ProcessInfo]) -> list[Role]:
    found = []
    for p in tree:
        text = f"{p.name} {p.cmdline}"
        if "gunicorn: worker" in text:
            found.append(Role(f"frontend-{p.pid}", p.pid))
        elif "VLLM::EngineCore" in text:
            found.append(Role(f"engine-core-{p.pid}", p.pid))
        elif "VLLM::Worker" in text:
            found.append(Role(f"engine-worker-{p.pid}", p.pid))
        elif "celery" in text and "-Q decode" in text:
            found.append(Role(f"decode-worker-{p.pid}", p.pid))
        elif "celery" in text and "-Q router" in text:
            found.append(Role(f"router-{p.pid}", p.pid))
    return found


def py_spy() -> str:
    path = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(path).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return path


@dataclass
class Window:
    """One profiling window at one concurrency: per process, CPU seconds and collapsed stacks."""

    load: str
    duration_s: float
    machine: MachineState
    cpu_s: dict[str, float] = field(default_factory=dict)
    stacks: dict[str, str] = field(default_factory=dict)
    output_tokens: int = 0
    # From the decode workers' leases after the window: the largest batch each engine has run so
    # far, and its steps that ran two or more requests together.
    engines: dict[str, dict[str, int]] = field(default_factory=dict)


def _cpu_seconds(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def record_window(roles: list[Role], spec: ProfileSpec, raw_dir: Path, load: str) -> dict[str, tuple[float, str]]:
    """py-spy on every role at once for spec.duration_s; returns role -> (CPU s over exactly
    spec.duration_s, collapsed text). The CPU window is timed here, not by py-spy, which can take
    a while to attach and to write its output on a busy machine."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for r in roles:
        path = raw_dir / f"{load}-{r.name}.txt"
        argv = [py_spy(), "record", "--pid", str(r.pid), "--duration", str(int(spec.duration_s)), "--rate",
                str(spec.rate_hz), "--format", "raw", "--nolineno", "--nonblocking", "-o", str(path)]
        procs[r.name] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)
    cpu_before = {r.name: _cpu_seconds(r.pid) for r in roles}
    time.sleep(spec.duration_s)
    cpu = {r.name: _cpu_seconds(r.pid) - cpu_before[r.name] for r in roles}
    for name, (proc, _) in procs.items():
        try:
            _, err = proc.communicate(timeout=spec.duration_s + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode:
            logger.warning("py-spy on %s exited %s: %s", name, proc.returncode, err.decode(errors="replace")[-400:])
    return {r.name: (cpu[r.name], procs[r.name][1].read_text() if procs[r.name][1].exists() else "") for r in roles}


def _load_in_background(workload: Workload, base_url: str, model: str) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(measure(workload, "load", base_url, model)),
                              name="load", daemon=True)
    thread.start()
    return thread, box


def run(spec: ProfileSpec, out: Path) -> Path:
    started = MachineState.now()
    windows = []
    with LauncherDeployment(spec.config, out / "logs", spec.redis_db, sets=spec.overrides,
                            name=Path(spec.config).stem) as dep:
        roles = roles_of(dep.process_tree())
        logger.info("profiling %s", ", ".join(r.name for r in roles))
        for c in (int(x) for x in spec.concurrency.split(",")):
            window = _profile_at(c, spec, dep.base_url, roles, out)
            window.engines = _engine_batches(dep.redis)
            windows.append(window)
    finished = MachineState.now()
    body = {"scenario": "profile", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "windows": [_window_json(w) for w in windows]}
    write_json(out / "results.json", body)
    _gzip_raw(out / "raw")
    path = out / "report.md"
    path.write_text(markdown(spec, body))
    return path


def _profile_at(concurrency: int, spec: ProfileSpec, base_url: str, roles: list[Role], out: Path) -> Window:
    params = WorkloadParams(input_len_mean=spec.input_len, input_len_std=0.0, output_len_mean=spec.output_len)
    lead_s = 3.0  # load runs this long before py-spy starts
    total_s = lead_s + spec.duration_s + 30  # outlasts py-spy, which is slow to attach and finish when busy
    # More requests than the window can finish; the deadline cuts the rest.
    options = RunOptions(num_requests=int(50 * total_s), seed=7, deadline_s=total_s, warmup_sessions=0)
    workload = Workload(WorkloadKind.SYNTHETIC, params, (concurrency,), options)
    load = f"c={concurrency}"
    machine = MachineState.now()
    thread, box = _load_in_background(workload, base_url, spec.model_name)
    time.sleep(lead_s)
    recorded = record_window(roles, spec, out / "raw", load)
    thread.join(timeout=options.deadline_s + 60)
    window = Window(load, spec.duration_s, machine)
    for name, (cpu, text) in recorded.items():
        window.cpu_s[name], window.stacks[name] = cpu, text
    if box:
        window.output_tokens = sum(r.output_tokens for r in box[0].records if r.ok)
    return window


def _engine_batches(client) -> dict[str, dict[str, int]]:
    from tasks.registry import live_workers

    return {w.worker_id: {"max_running_seen": w.max_running_seen, "num_batched_steps": w.num_batched_steps}
            for w in live_workers(client, role="decode")}


def _window_json(w: Window) -> dict:
    processes = {}
    for name, text in w.stacks.items():
        stacks = parse_collapsed(text)
        processes[name] = {
            "cpu_s": w.cpu_s[name], "cpu_percent_of_core": 100 * w.cpu_s[name] / w.duration_s,
            "samples": sum(c for _, c in stacks),
            "by_package": [asdict(s) for s in by_package(stacks)],
            "self": [asdict(s) for s in self_time(stacks)],
            "inclusive": [asdict(s) for s in inclusive_time(stacks)],
        }
    return {"load": w.load, "duration_s": w.duration_s, "machine": asdict(w.machine),
            "output_tokens_during_load": w.output_tokens, "engines": w.engines, "processes": processes}


def _gzip_raw(raw_dir: Path) -> None:
    """py-spy's collapsed stacks, kept compressed for a closer look (flamegraph.pl or speedscope)."""
    import gzip

    for path in raw_dir.glob("*.txt"):
        with path.open("rb") as src, gzip.open(path.with_suffix(".txt.gz"), "wb") as dst:
            dst.write(src.read())
        path.unlink()


def markdown(spec: ProfileSpec, body: dict) -> str:
    m0 = body["machine_start"]
    lines = [f"# Profile of {spec.config}{' with ' + spec.sets if spec.sets else ''} under load (py-spy)", "",
             f"- started {m0['at']}; load average (1/5/15 min) {m0['load_1m']:.2f} / {m0['load_5m']:.2f} / "
             f"{m0['load_15m']:.2f} at the start; {m0['num_cpus']} CPUs",
             f"- workload: synthetic prompts of {spec.input_len} tokens, {spec.output_len} output tokens, closed loop; "
             f"py-spy --rate {spec.rate_hz} --nonblocking --nolineno for {spec.duration_s:g} s per concurrency, "
             "on every process at once",
             "- CPU = the process's user+system CPU seconds over the window (psutil), as % of one core (the "
             "machine has 200%, shared with everything else running); function and package shares are % of the "
             "process's busy samples. py-spy skips threads it sees idle, but counts some blocking socket reads "
             "(e.g. redis `SocketBuffer._read_from_socket`) as busy, so for a process with little CPU the shares "
             "are mostly of waits", ""]
    for w in body["windows"]:
        m = w["machine"]
        lines += [f"## {w['load']}", "",
                  f"Load average at the start of the window: {m['load_1m']:.2f} / {m['load_5m']:.2f} / "
                  f"{m['load_15m']:.2f}. Output tokens streamed while the load ran: "
                  f"{w['output_tokens_during_load']:,}. "
                  "Largest batch each engine has run so far (from its lease): "
                  + ", ".join(f"`{k}` {v['max_running_seen']}" for k, v in w.get("engines", {}).items()) + ".",
                  ""]
        procs = w["processes"]
        lines += table(["process", "CPU % of a core", "samples", "top packages (self time)"],
                       [[f"`{name}`", fmt(p["cpu_percent_of_core"]), str(p["samples"]),
                         ", ".join(f"{s['name']} {s['percent']:.0f}%" for s in p["by_package"][:5])]
                        for name, p in sorted(procs.items(), key=lambda kv: -kv[1]["cpu_s"])], align="lrrl")
        for name, p in sorted(procs.items(), key=lambda kv: -kv[1]["cpu_s"]):
            lines += [f"### `{name}` at {w['load']}", ""]
            lines += table(["self time: function (file)", "%"],
                           [[f"`{s['name']}`", f"{s['percent']:.1f}"] for s in p["self"][:10]], align="lr")
            lines += table(["inclusive: function (file)", "%"],
                           [[f"`{s['name']}`", f"{s['percent']:.1f}"] for s in p["inclusive"][:12]], align="lr")
    return "\n".join(lines)
