"""Aggregated against disaggregated serving on the same two cores: `python -m bench.disagg [--out DIR]`.

Issue 14, item 4. In one run, one after another:

1. raw NIXL READ bandwidth between two processes (bench/nixl_bandwidth.py), as our workers'
   connector sets NIXL up ("deployment") and at its best on 2 cores ("direct");
2. configs/agg.yaml with 2 decode workers: 2 engines, a core each, each prefilling its own prompts
   (and, with `--agg-chunk N`, the same again with `engine.max_num_batched_tokens` N: smaller
   prefill chunks, vLLM's own knob against long prefills stalling decodes);
3. configs/disagg.yaml: 1 decode + 1 prefill worker, an engine on each core; prompts longer than
   disagg.max_local_prefill_length are prefilled on the prefill engine and their KV moved over NIXL.

The workload is `steady`: `--num-streams` decode streams, each a closed loop of short prompts with
long answers, plus long prompts (`--long-input-len` to `--long-input-max` tokens, short answers)
arriving open loop at `--long-rate` per second (Poisson), for `--duration-s`. Each rate is a load
point, with the same prompts and arrival times on every deployment. A point is judged on its
window, from `--warm-s` after it started to `--duration-s`, when the streams stop starting new
requests: the streams' inter-token gaps that end in it, every token that arrived in it (output
tok/s), the time-to-first-token of the requests sent in it, and the CPU each process used over it.
Around each point the workers' leases are read (KV bytes and seconds, remote prefills, local
fallbacks, long prompts kept local by the prefill backlog); after minus before is that point's KV
traffic.

Deployments use Redis databases 4 (agg) and 5 (disagg), or all `--redis-db`, flushed before each start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

from bench.client import ClientOptions, HttpClient, SessionRunner, run_open
from bench.flags import add_dataclass_flags, from_flags, help_text
from bench.output import default_out
from bench.records import LoadMode, LoadPoint, RequestRecord, Target
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import Distribution, percentile
from bench.workloads import Session, Turn, WorkloadParams, poisson_arrivals, token_ids

logger = logging.getLogger(__name__)

# A `python -m bench SUBCOMMAND` run (run, kv-routing, vs-vllm, ...), which would share the machine;
# not `python -m bench.disagg` itself.
OTHER_BENCH = r"-m bench [a-z]"
AGG, DISAGG = "agg", "disagg"
CONFIGS = {  # kind -> (config, --set overrides, Redis db)
    AGG: ("configs/agg.yaml", {"workers.num_decode": "2"}, 4),
    DISAGG: ("configs/disagg.yaml", {}, 5),
}


@dataclass(frozen=True)
class DisaggSpec:
    num_streams: int = field(default=8, metadata=help_text("decode streams, each a closed loop of short requests"))
    stream_input_len: int = field(default=32, metadata=help_text("the streams' prompts, tokens"))
    stream_output_len: int = field(default=256, metadata=help_text("the streams' max_tokens (ignore_eos)"))
    long_rate: str = field(default="0.2,0.4", metadata=help_text("long prompts per second, open loop; a load "
                                                                 "point each"))
    long_input_len: int = field(default=2048, metadata=help_text("shortest long prompt, tokens"))
    long_input_max: int = field(default=3072, metadata=help_text("longest long prompt, tokens (uniform between)"))
    long_output_len: int = field(default=16, metadata=help_text("long prompts' max_tokens; must differ from "
                                                                 "--stream-output-len"))
    duration_s: float = field(default=30.0, metadata=help_text("seconds of arrivals per load point"))
    warm_s: float = field(default=3.0, metadata=help_text("the measured window starts this long into a point"))
    seed: int = field(default=0, metadata=help_text("prompts and arrival times; the same on every deployment"))
    connector: str = field(default="push", metadata=help_text("the disagg deployment's disagg.connector: push "
                                                              "(prefill writes the KV) or pull (decode reads it)"))
    agg_chunk: str = field(default="", metadata=help_text("also measure agg with engine.max_num_batched_tokens "
                                                          "= each of these (comma-separated)"))
    disagg_sets: str = field(default="", metadata=help_text(
        "disagg deployments to measure, '|'-separated, each comma-separated KEY=VALUE overrides (empty: one, "
        "as configured); e.g. 'disagg.connector=push|disagg.connector=pull'"))
    client_on_host_cores: bool = field(default=True, metadata=help_text(
        "run the load generator on the cores of the deployment's own processes (the launcher's), not on an isolated "
        "decode engine's (disagg.isolate_decode_cores), as a client on another host would"))
    model_path: str = field(default="", metadata=help_text("model.path of every deployment (empty: the tiny "
                                                            "model; the benchmark model: "
                                                            "~/.cache/llmq/models/bench-llama)"))
    model_name: str = field(default="tiny-llama", metadata=help_text("model.name of every deployment"))
    max_model_len: int = field(default=4096, metadata=help_text("engine.max_model_len of every deployment"))
    redis_db: int = field(default=0, metadata=help_text("Redis database (1-5) of every deployment, flushed before "
                                                         "each start (0: 4 for agg, 5 for disagg)"))
    dtype: str = field(default="", metadata=help_text("engine.dtype of every deployment (empty: the config's, "
                                                       "bfloat16); float32 on a CPU without AVX-512 BF16 or AMX, "
                                                       "where bfloat16 is emulated and 3-4.5x slower"))

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(float(r) for r in self.long_rate.split(",") if r.strip())

    @property
    def deployments(self) -> list[Deployment]:
        """agg, agg with each chunk size, then disagg."""
        sets = {"engine.max_model_len": str(self.max_model_len), "model.name": self.model_name}
        if self.model_path:
            sets["model.path"] = str(Path(self.model_path).expanduser())
        if self.dtype:
            sets["engine.dtype"] = self.dtype
        chunks = [int(c) for c in self.agg_chunk.split(",") if c.strip()]
        return ([Deployment(AGG, AGG, sets)]
                + [Deployment(f"agg-chunk{c}", AGG, {**sets, "engine.max_num_batched_tokens": str(c)})
                   for c in chunks]
                + [Deployment(DISAGG + (f"[{variant}]" if variant else ""), DISAGG,
                              {**sets, "disagg.connector": self.connector, **overrides})
                   for variant, overrides in self.disagg_variants])

    @property
    def disagg_variants(self) -> list[tuple[str, dict[str, str]]]:
        """(label, overrides) of each disagg deployment: one unlabelled without --disagg-sets."""
        groups = [g.strip() for g in self.disagg_sets.split("|") if g.strip()]
        return [(g, dict(kv.strip().split("=", 1) for kv in g.split(",") if kv.strip())) for g in groups] or [("", {})]


@dataclass(frozen=True)
class Deployment:
    label: str
    kind: str  # agg or disagg
    sets: dict[str, str]

    @property
    def num_decode(self) -> int:
        return 2 if self.kind == AGG else 1


# -- the workload: pure ---------------------------------------------------------------------------


def long_sessions(spec: DisaggSpec, rate_per_s: float, seed: int) -> list[Session]:
    """The long prompts of one point: one per Poisson arrival before duration_s (run_open draws
    the same arrivals from the same seed), each of a fresh length between the two bounds."""
    arrivals = poisson_arrivals(rate_per_s, int(rate_per_s * spec.duration_s * 3) + 10, seed)
    count = sum(1 for t in arrivals if t < spec.duration_s)
    rng = random.Random(f"disagg-long:{seed}:{rate_per_s}")
    params = WorkloadParams()
    lengths = [rng.randint(spec.long_input_len, max(spec.long_input_len, spec.long_input_max)) for _ in range(count)]
    return [Session(i, (Turn(spec.long_output_len, token_ids(rng, n, params)),)) for i, n in enumerate(lengths)]


def stream_session(spec: DisaggSpec, rng: random.Random, session_id: int) -> Session:
    prompt = token_ids(rng, spec.stream_input_len, WorkloadParams())
    return Session(session_id, (Turn(spec.stream_output_len, prompt),))


# -- a point's window: pure -----------------------------------------------------------------------


def chunk_times_s(record: RequestRecord) -> list[float]:
    """When each chunk of a request arrived, in seconds since its point started."""
    if record.start_s is None or record.ttft_ms is None:
        return []
    times = [record.start_s + record.ttft_ms / 1000]
    for gap in record.itl_ms:
        times.append(times[-1] + gap / 1000)
    return times


STALL_MS = 100.0  # a gap this long is several decode steps (10-20 ms at batch 8), not one


@dataclass(frozen=True)
class WindowStats:
    """One deployment at one load point, over the window [start_s, end_s)."""

    start_s: float
    end_s: float
    stream_itl_ms: Distribution
    stream_itl_p999_ms: float | None
    stream_ttft_ms: Distribution
    long_ttft_ms: Distribution
    output_tok_per_s: float
    stream_tok_per_s: float
    num_long_sent: int  # in the window
    num_long_ok: int
    num_failed: int  # requests of the whole point, either class
    num_stalls: int = 0  # streams' gaps of STALL_MS or more: a prefill (chunk) beside them, or a hold-up
    stall_s: float = 0.0  # those gaps summed

    @property
    def window_s(self) -> float:
        return self.end_s - self.start_s


def window_stats(records: Sequence[RequestRecord], start_s: float, end_s: float,
                 stream_output_len: int) -> WindowStats:
    """Streams are the requests with `stream_output_len` max_tokens; the rest are long prompts.
    A chunk carries output_tokens / num_chunks tokens (one, unless the server coalesced some)."""
    def inside(t: float) -> bool:
        return start_s <= t < end_s

    gaps: list[float] = []
    tokens = stream_tokens = 0.0
    stream_ttft: list[float] = []
    long_ttft: list[float] = []
    num_long_sent = num_long_ok = 0
    for r in records:
        is_stream = r.max_tokens == stream_output_len
        sent_inside = r.start_s is not None and inside(r.start_s)
        if not is_stream and sent_inside:
            num_long_sent += 1
            num_long_ok += r.ok
        if not r.ok:
            continue
        times = chunk_times_s(r)
        per_chunk = r.output_tokens / r.num_chunks if r.num_chunks else 1.0
        arrived = per_chunk * sum(1 for t in times if inside(t))
        tokens += arrived
        if is_stream:
            stream_tokens += arrived
            gaps += [gap for gap, t in zip(r.itl_ms, times[1:]) if inside(t)]
        if sent_inside and r.ttft_ms is not None:
            (stream_ttft if is_stream else long_ttft).append(r.ttft_ms)
    seconds = end_s - start_s
    stalls = [g for g in gaps if g >= STALL_MS]
    return WindowStats(start_s, end_s, Distribution.of(gaps), percentile(gaps, 99.9), Distribution.of(stream_ttft),
                       Distribution.of(long_ttft), tokens / seconds, stream_tokens / seconds, num_long_sent,
                       num_long_ok, sum(not r.ok for r in records), len(stalls), sum(stalls) / 1000)


@dataclass(frozen=True)
class TransferCounters:
    """A decode worker's disaggregation counters, as its lease carries them."""

    kv_bytes: int = 0
    kv_seconds: float = 0.0
    remote_prefills: int = 0
    local_fallbacks: int = 0
    local_by_backlog: int = 0

    @classmethod
    def of(cls, status) -> TransferCounters:
        return cls(status.kv_transfer_bytes, status.kv_transfer_seconds, status.num_remote_prefills,
                   status.num_local_fallbacks, status.num_local_by_backlog)

    def __sub__(self, earlier: TransferCounters) -> TransferCounters:
        return TransferCounters(*(a - b for a, b in zip(astuple(self), astuple(earlier), strict=True)))

    def __add__(self, other: TransferCounters) -> TransferCounters:
        return TransferCounters(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def gbytes_per_s(self) -> float | None:
        """Bytes over the summed transfer durations: the rate while a transfer was in flight."""
        return self.kv_bytes / self.kv_seconds / 1e9 if self.kv_seconds > 0 else None

    @property
    def bytes_per_remote_prefill(self) -> float | None:
        return self.kv_bytes / self.remote_prefills if self.remote_prefills else None

    @property
    def ms_per_remote_prefill(self) -> float | None:
        return self.kv_seconds * 1e3 / self.remote_prefills if self.remote_prefills else None


def transfer_delta(before: Sequence, after: Sequence) -> TransferCounters:
    """Summed over the decode workers in `after`: counters minus those in `before`. A worker that
    was not there before, or restarted in between (another pid or start time, or a counter that
    went down), counts from zero."""
    earlier = {w.worker_id: w for w in before}
    total = TransferCounters()
    for w in after:
        now, old = TransferCounters.of(w), earlier.get(w.worker_id)
        restarted = old is None or (old.pid, old.started_unix) != (w.pid, w.started_unix)
        delta = now if restarted else now - TransferCounters.of(old)
        if min(astuple(delta)) < 0:
            delta = now
        total = total + delta
    return total


def ratio(ours: float | None, base: float | None) -> float | None:
    return ours / base if ours is not None and base else None




# -- the machine ----------------------------------------------------------------------------------


def wait_for_other_benchmarks(poll_s: float = 20.0, max_wait_s: float = 1200.0) -> float:
    """Waits while another engineer's benchmark runs; returns the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < max_wait_s:
        listed = subprocess.run(["pgrep", "-af", "--", OTHER_BENCH], capture_output=True, text=True).stdout
        # Only a Python process is running one: a wrapper (flock, timeout) may be queued for the
        # lock this run holds, and waiting for it would wait for ourselves.
        found = "\n".join(line for line in listed.splitlines() if "python" in (line.split() + ["", ""])[1])
        if not found:
            return time.monotonic() - began
        logger.info("another benchmark is running; waiting %.0f s:\n%s", poll_s, found)
        time.sleep(poll_s)
    logger.warning("another benchmark still runs after %.0f s; measuring anyway", max_wait_s)
    return time.monotonic() - began


WORKER_NAME = re.compile(r"celery.* -n (\w+)@")


def process_labels(root_pid: int) -> dict[int, str]:
    """Every process of a deployment by what it is: "frontend" (gunicorn), a Celery worker by its
    name (decode0, prefill0), a vLLM engine's process under the worker that owns it ("decode0
    VLLM::Worker"), the launcher; and the shared Redis server, "redis"."""
    import psutil

    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    workers: dict[int, str] = {}
    for p in procs:
        with _gone_ok():
            # Celery rewrites its process title ("[celeryd: decode0@host:MainProcess] ... -n decode0@%h"),
            # so the name is read from the text, not from argv's items.
            named = WORKER_NAME.search(" ".join(p.cmdline()))
            if named:
                workers[p.pid] = named.group(1)
    labels: dict[int, str] = {}
    for p in procs:
        with _gone_ok():
            owner = next((workers[a.pid] for a in [p, *p.parents()] if a.pid in workers), None)
            if p.pid in workers:
                labels[p.pid] = workers[p.pid]
            elif owner:
                labels[p.pid] = f"{owner} {p.name()}"
            elif "gunicorn" in " ".join(p.cmdline()):
                labels[p.pid] = "frontend"
            else:
                labels[p.pid] = "launcher" if p.pid == root_pid else p.name()
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "redis-server":
            labels[p.pid] = "redis"
    return labels


class _gone_ok:
    """Skips a process that ended while we looked at it."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        import psutil

        return kind is not None and issubclass(kind, psutil.Error)


def cpu_sample(labels: dict[int, str]) -> dict:
    """CPU seconds so far of each labelled process (all its threads), and of the whole machine."""
    import psutil

    seconds: dict[str, float] = {}
    for pid, label in labels.items():
        with _gone_ok():
            t = psutil.Process(pid).cpu_times()
            seconds[label] = seconds.get(label, 0.0) + t.user + t.system
    machine = psutil.cpu_times()
    return {"at": time.monotonic(), "seconds": seconds,
            "machine_busy": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)}


def cpu_use(first: dict, second: dict) -> dict[str, float]:
    """Cores each label used between two samples, plus "machine" (all processes) and "other"
    (processes outside the deployment: the load generator, other users)."""
    wall = second["at"] - first["at"]
    if wall <= 0:
        return {}
    used = {k: (v - first["seconds"].get(k, 0.0)) / wall for k, v in second["seconds"].items()}
    machine = (second["machine_busy"] - first["machine_busy"]) / wall
    return {**dict(sorted(used.items(), key=lambda kv: -kv[1])), "machine": machine,
            "other": machine - sum(used.values())}


# -- one load point -------------------------------------------------------------------------------


async def run_steady(target: Target, spec: DisaggSpec, rate_per_s: float, seed: int,
                     labels: dict[int, str]) -> tuple[list[RequestRecord], dict[str, float]]:
    """The streams and the long prompts together for duration_s, then until the last request
    ends; with the CPU each process used over the window."""
    client = HttpClient(target, ClientOptions(request_timeout_s=120.0))
    origin = time.perf_counter()
    point = LoadPoint(LoadMode.OPEN, rate_per_s)
    streams, longs = SessionRunner(client, point, origin), SessionRunner(client, point, origin)
    sessions = long_sessions(spec, rate_per_s, seed)
    rng, ids = random.Random(f"disagg-streams:{seed}:{rate_per_s}"), itertools.count(len(sessions))

    async def stream_loop() -> None:
        while time.perf_counter() - origin < spec.duration_s:
            await streams.run_session(stream_session(spec, rng, next(ids)))

    async def cpu_at(t: float) -> dict:
        await asyncio.sleep(max(0.0, origin + t - time.perf_counter()))
        return await asyncio.to_thread(cpu_sample, labels)

    samples = [asyncio.create_task(cpu_at(spec.warm_s)), asyncio.create_task(cpu_at(spec.duration_s))]
    work = asyncio.gather(run_open(longs, sessions, rate_per_s, seed),
                          *(stream_loop() for _ in range(spec.num_streams)))
    try:
        await asyncio.wait_for(work, timeout=spec.duration_s + 180.0)
    except TimeoutError:
        logger.warning("[%s %s] cut short after %.0f s", target.label, point.label, spec.duration_s + 180.0)
    finally:
        await client.close()
    longs.add_unsent(sessions)
    first, second = await asyncio.gather(*samples)
    return streams.records + longs.records, cpu_use(first, second)


# -- the scenario ---------------------------------------------------------------------------------


@dataclass
class PointResult:
    deployment: str
    kind: str
    rate_per_s: float
    seed: int
    uptime: str
    window: WindowStats
    cpu: dict[str, float]
    transfers: TransferCounters | None  # disagg only
    prefill_served: int | None

    def to_json(self) -> dict:
        t = self.transfers
        return {"deployment": self.deployment, "kind": self.kind, "rate_per_s": self.rate_per_s, "seed": self.seed,
                "uptime": self.uptime, "window": {**asdict(self.window), "window_s": self.window.window_s},
                "cpu_cores": self.cpu,
                "transfers": None if t is None else {**asdict(t), "gbytes_per_s": t.gbytes_per_s,
                                                     "bytes_per_remote_prefill": t.bytes_per_remote_prefill,
                                                     "ms_per_remote_prefill": t.ms_per_remote_prefill},
                "prefill_served": self.prefill_served}


def run_deployment(dep: Deployment, spec: DisaggSpec, out: Path, points: list[PointResult],
                   records: list[dict]) -> None:
    """Appends each point to `points` as soon as it is measured, so a failure keeps the earlier ones."""
    from bench.cache_stats import fresh_leases
    from bench.deploy import LauncherDeployment

    config, sets, db = CONFIGS[dep.kind]
    wait_for_other_benchmarks()
    with LauncherDeployment(config, out / "logs", spec.redis_db or db, sets={**sets, **dep.sets},
                            name=dep.label) as launched:
        if dep.kind == DISAGG:
            fresh_leases(launched.redis, 1, since_unix=0, timeout_s=180, role="prefill")
        target = Target(dep.label, launched.base_url, spec.model_name)
        labels = process_labels(launched.process.pid) if launched.process else {}
        with client_cores(launched.process.pid if launched.process and spec.client_on_host_cores else None):
            run_points(dep, spec, launched, target, labels, points, records)


@contextlib.contextmanager
def client_cores(launcher_pid: int | None) -> Iterator[None]:
    """This thread, the load generator's event loop, on the launcher's cores while inside."""
    everywhere = os.sched_getaffinity(0)
    if launcher_pid is not None and (host := os.sched_getaffinity(launcher_pid)) != everywhere:
        logger.info("the load generator runs on cores %s, the deployment's own processes'",
                    ",".join(map(str, sorted(host))))
        os.sched_setaffinity(0, host)
    try:
        yield
    finally:
        os.sched_setaffinity(0, everywhere)


def run_points(dep: Deployment, spec: DisaggSpec, launched, target: Target, labels: dict[int, str],
               points: list[PointResult], records: list[dict]) -> None:
    from bench.cache_stats import fresh_leases

    redis = launched.redis
    warm = replace(spec, duration_s=8.0, warm_s=0.0)  # unrecorded: the first transfers' handshake
    asyncio.run(run_steady(target, warm, max(0.5, min(spec.rates)), spec.seed + 1000, labels))
    time.sleep(2.0)
    for i, rate in enumerate(spec.rates):
        before = fresh_leases(redis, dep.num_decode, since_unix=time.time())
        prefill_before = fresh_leases(redis, 1, time.time(), role="prefill") if dep.kind == DISAGG else []
        uptime = MachineState.now().uptime
        logger.info("[%s rate=%g/s] %s", dep.label, rate, uptime)
        point_records, cpu = asyncio.run(run_steady(target, spec, rate, spec.seed + i, labels))
        time.sleep(1.5)  # the engines' last steps reach their stat loggers
        after = fresh_leases(redis, dep.num_decode, since_unix=time.time())
        transfers, served = None, None
        if dep.kind == DISAGG:
            prefill_after = fresh_leases(redis, 1, time.time(), role="prefill")
            transfers = transfer_delta(before, after)
            if spec.connector == "push":
                # The side that moves the KV counts its bytes and time: with push, the prefill
                # worker WRITEs it (the remote prefills and fallbacks stay the decode side's).
                moved = transfer_delta(prefill_before, prefill_after)
                transfers = replace(transfers, kv_bytes=moved.kv_bytes, kv_seconds=moved.kv_seconds)
            served = sum(w.num_prefills_served for w in prefill_after) - sum(
                w.num_prefills_served for w in prefill_before)
        window = window_stats(point_records, spec.warm_s, spec.duration_s, spec.stream_output_len)
        points.append(PointResult(dep.label, dep.kind, rate, spec.seed + i, uptime, window, cpu, transfers,
                                  served))
        logger.info("[%s rate=%g/s] stream ITL p99 %s ms, %s output tok/s", dep.label, rate,
                    fmt(window.stream_itl_ms.p99, 1), fmt(window.output_tok_per_s, 0))
        records += [{**r.to_json(), "deployment": dep.label, "rate_per_s": rate} for r in point_records]


def run(spec: DisaggSpec, out: Path) -> Path:
    from bench import nixl_bandwidth

    if spec.long_output_len == spec.stream_output_len:
        raise ValueError("--long-output-len must differ from --stream-output-len: it tells the classes apart")
    out.mkdir(parents=True, exist_ok=True)
    wait_for_other_benchmarks()
    started = MachineState.now()
    raw = nixl_bandwidth.run(out, list(nixl_bandwidth.SETUPS), prompt_tokens=spec.long_input_len,
                             dtype_bytes=4 if spec.dtype in ("float32", "float") else 2)
    raw.pop("markdown")
    points: list[PointResult] = []
    records: list[dict] = []
    errors = []
    for dep in spec.deployments:
        try:
            run_deployment(dep, spec, out, points, records)
        except Exception as e:  # keep what was measured; the report says what failed
            logger.exception("%s failed", dep.label)
            errors.append(f"{dep.label}: {type(e).__name__}: {e}")
    finished = MachineState.now()
    body = {"scenario": "disagg", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "nixl_raw": raw, "points": [p.to_json() for p in points],
            "goals": [asdict(g) for g in goals(points)], "transfer_vs_raw": transfer_vs_raw(points, raw),
            "errors": errors, "records": records}
    write_json(out / "results.json", body)
    plots = write_plots(spec, points, records, out) if points else []
    path = out / "report.md"
    path.write_text(markdown(spec, points, raw, started, finished)
                    + "".join(f"\n![{name}]({name})\n" for name in plots)
                    + "".join(f"\n**Failed:** {e}\n" for e in errors))
    return path


def window_gaps(records: Sequence[dict], deployment: str, rate: float, spec: DisaggSpec) -> list[float]:
    """The streams' inter-token gaps that end in the window, of one deployment at one rate, from
    results.json's records (as window_stats counts them)."""
    ours = [RequestRecord.from_json({k: v for k, v in r.items() if k not in ("deployment", "rate_per_s")})
            for r in records if r["deployment"] == deployment and r.get("rate_per_s") == rate]
    gaps = []
    for r in ours:
        if r.ok and r.max_tokens == spec.stream_output_len:
            gaps += [g for g, t in zip(r.itl_ms, chunk_times_s(r)[1:]) if spec.warm_s <= t < spec.duration_s]
    return gaps


def write_plots(spec: DisaggSpec, points: Sequence[PointResult], records: Sequence[dict], out: Path) -> list[str]:
    """itl_cdf.png: the streams' ITL CDF (log x), a colour per deployment and a line style per
    rate; throughput.png: output tok/s and streams' ITL p99 per rate and deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deployments = list(dict.fromkeys(p.deployment for p in points))
    rates = list(dict.fromkeys(p.rate_per_s for p in points))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d, dep in enumerate(deployments):
        for i, rate in enumerate(rates):
            gaps = sorted(window_gaps(records, dep, rate, spec))
            if gaps:
                ax.step(gaps, [(k + 1) / len(gaps) for k in range(len(gaps))], where="post", color=f"C{d % 10}",
                        linestyle=styles[i % len(styles)], label=f"{dep} {rate:g}/s")
    ax.set(xlabel="streams' inter-token gap (ms)", ylabel="fraction of gaps", title="Streams' ITL CDF")
    ax.set_xscale("log")
    ax.set_xlim(left=1.0)  # coalesced chunks arrive ~0 ms apart; the steps and the stalls are above 1 ms
    ax.set_ylim(0.9, 1.001)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "itl_cdf.png", dpi=90)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(deployments))
    for d, dep in enumerate(deployments):
        xs = [i + d * width for i in range(len(rates))]
        here = [next((p for p in points if p.deployment == dep and p.rate_per_s == r), None) for r in rates]
        left.bar(xs, [p.window.output_tok_per_s if p else 0 for p in here], width, label=dep, color=f"C{d % 10}")
        right.bar(xs, [(p.window.stream_itl_ms.p99 or 0) if p else 0 for p in here], width, label=dep,
                  color=f"C{d % 10}")
    for ax, label in ((left, "output tok/s"), (right, "streams' ITL p99 (ms)")):
        ax.set_xticks([i + width * (len(deployments) - 1) / 2 for i in range(len(rates))],
                      [f"{r:g} long prompts/s" for r in rates])
        ax.set(ylabel=label, title=label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
    return ["itl_cdf.png", "throughput.png"]


def _raw_rate(raw: dict, setup: str, index: int) -> float:
    return raw["setups"][setup]["cases"][index]["gbytes_per_s"]


def _push_write_rate(raw: dict, setup: str) -> float | None:
    """The raw rate of the push connector's own shape (a WRITE of one prompt, a descriptor per
    layer, between warm buffers), or None where the run did not measure it."""
    cases = raw["setups"].get(setup, {}).get("cases", [])
    return next((c["gbytes_per_s"] for c in cases if c.get("op") == "WRITE" and not c.get("fresh_far")), None)


def transfer_vs_raw(points: list[PointResult], raw: dict) -> list[dict]:
    """Each disagg point's KV transfer rate as a ratio of the raw rates measured in this run:
    the vLLM-like case (the same descriptors for one long prompt) and the 256 MiB case of every
    setup, and the push's WRITE as our workers set NIXL up (what a push moves, the way it moves it)."""
    rows = []
    for p in points:
        if p.transfers is None:
            continue
        rate = p.transfers.gbytes_per_s
        rows.append({"load": f"{p.deployment} rate={p.rate_per_s:g}/s", "kv_gbytes_per_s": rate,
                     **{f"ratio_to_{s}_{c}": ratio(rate, _raw_rate(raw, s, i))
                        for s in raw["setups"] for i, c in ((0, "vllm_like"), (-1, "256MiB"))},
                     "ratio_to_deployment_push_write": ratio(rate, _push_write_rate(raw, "deployment"))})
    return rows


@dataclass(frozen=True)
class Goal:
    """Issue 14, item 4, at one rate: disagg against one aggregated deployment."""

    rate_per_s: float
    baseline: str
    itl_p99_gain: float | None  # the baseline's stream ITL p99 / disagg's; the goal is >= 2
    tok_per_s_ratio: float | None  # disagg's output tok/s / the baseline's; the goal is >= 1

    @property
    def met(self) -> bool:
        return (self.itl_p99_gain or 0) >= 2.0 and (self.tok_per_s_ratio or 0) >= 1.0


def goals(points: Sequence[PointResult]) -> list[Goal]:
    found = []
    for dis in (p for p in points if p.kind == DISAGG):
        for base in (p for p in points if p.kind == AGG and p.rate_per_s == dis.rate_per_s):
            found.append(Goal(dis.rate_per_s, base.deployment,
                              ratio(base.window.stream_itl_ms.p99, dis.window.stream_itl_ms.p99),
                              ratio(dis.window.output_tok_per_s, base.window.output_tok_per_s)))
    return found


# -- report.md ------------------------------------------------------------------------------------


MOVES = {  # disagg.connector -> how the KV reaches the decode worker
    "pull": "the decode worker pulls the KV over NIXL (NixlConnector)",
    "push": "the prefill worker writes the KV over NIXL into blocks the decode worker registered "
            "(NixlPushConnector)",
}


def markdown(spec: DisaggSpec, points: list[PointResult], raw: dict, started: MachineState,
             finished: MachineState) -> str:
    s = spec
    lines = ["# Aggregated (2 engines, a core each) against disaggregated (prefill and decode engine, a core each)",
             "",
             f"- started {started.at}; `uptime` at the start: `{started.uptime}`; at the end: `{finished.uptime}`; "
             f"{started.num_cpus} CPUs; model `{s.model_name}` ({s.model_path or 'the tiny model'})",
             f"- workload: {s.num_streams} decode streams ({s.stream_input_len} tokens in / {s.stream_output_len} "
             f"out, closed loop) and long prompts ({s.long_input_len}-{s.long_input_max} tokens in / "
             f"{s.long_output_len} out) arriving open loop (Poisson) for {s.duration_s:g} s; window "
             f"{s.warm_s:g}-{s.duration_s:g} s; rate i uses seed {s.seed} + i on every deployment",
             "- disagg: prompts longer than 512 uncached tokens are prefilled on the prefill worker while fewer "
             "than 4 remote prefills wait (the config's, unless `--disagg-sets` says otherwise); " + MOVES[s.connector],
             "- the load generator runs " + ("on the cores of each deployment's own processes (where a launcher keeps "
                                             "a decode engine's core for it, off that core)" if s.client_on_host_cores
                                             else "on any core"), ""]
    for rate in dict.fromkeys(p.rate_per_s for p in points):
        here = [p for p in points if p.rate_per_s == rate]
        lines += [f"## {rate:g} long prompts/s", ""]
        lines += [f"- `uptime` before {p.deployment}: `{p.uptime}`" for p in here] + [""]
        lines += table([""] + [p.deployment for p in here], window_rows(here))
        for g in (g for g in goals(points) if g.rate_per_s == rate):
            lines += [f"- against `{g.baseline}`: stream ITL p99 {_x(g.itl_p99_gain)} lower under disagg (goal "
                      f"≥ 2x), output tok/s {_x(g.tok_per_s_ratio)} (goal ≥ 1x): "
                      f"**{'met' if g.met else 'missed'}**"]
        lines += ["", "CPU over the window, cores (all threads of each process):", ""]
        names = list(dict.fromkeys(k for p in here for k in p.cpu))
        lines += table(["process"] + [p.deployment for p in here],
                       [[n] + [fmt(p.cpu.get(n), 2) for p in here] for n in names])
        for p in here:
            t = p.transfers
            if t is None:
                continue
            mover = "prefill" if s.connector == "push" else "decode"
            lines += table([f"{p.deployment}: KV over NIXL (leases, after − before)", "value"], [
                ["remote prefills / local fallbacks / local by backlog (decode worker)",
                 f"{t.remote_prefills} / {t.local_fallbacks} / {t.local_by_backlog}"],
                ["prefills served (prefill worker)", str(p.prefill_served)],
                [f"bytes moved ({mover} worker)", f"{t.kv_bytes:,}"],
                ["summed transfer time, s", fmt(t.kv_seconds, 4)],
                ["rate while transferring, GB/s", fmt(t.gbytes_per_s, 3)],
                ["bytes / ms per remote prefill", f"{fmt(t.bytes_per_remote_prefill, 0)} / "
                                                  f"{fmt(t.ms_per_remote_prefill, 3)}"],
            ])
    lines += ["## KV transfer rate against raw NIXL (same run)", ""]
    rows = transfer_vs_raw(points, raw)
    names = [k for k in (rows[0] if rows else {}) if k.startswith("ratio_to_")]
    lines += table(["load", "KV GB/s"] + [n.removeprefix("ratio_to_") for n in names],
                   [[r["load"], fmt(r["kv_gbytes_per_s"], 3)] + [fmt(r[n], 3) for n in names] for r in rows])
    lines += ["Raw NIXL figures ([nixl_bandwidth.md](nixl_bandwidth.md)):", ""]
    for name, setup in raw["setups"].items():
        lines += [f"- {name} ({setup['label']}): " + "; ".join(
            f"{c['name']}: {c['latency_ms_p50']:.3f} ms, {c['gbytes_per_s']:.2f} GB/s" for c in setup["cases"])]
    return "\n".join(lines + [""])


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def window_rows(here: Sequence[PointResult]) -> list[list[str]]:
    def row(name, get, digits=1):
        return [name] + [fmt(get(p.window), digits) for p in here]

    return [
        row("streams: ITL p50 ms", lambda w: w.stream_itl_ms.p50, 2),
        row("streams: ITL p90 ms", lambda w: w.stream_itl_ms.p90, 2),
        row("**streams: ITL p99 ms**", lambda w: w.stream_itl_ms.p99, 2),
        row("streams: ITL p99.9 ms", lambda w: w.stream_itl_p999_ms, 2),
        row("streams: gaps measured", lambda w: w.stream_itl_ms.count, 0),
        row(f"streams: gaps ≥ {STALL_MS:g} ms", lambda w: w.num_stalls, 0),
        row(f"streams: time in gaps ≥ {STALL_MS:g} ms, s", lambda w: w.stall_s, 1),
        row("streams: TTFT p50 ms", lambda w: w.stream_ttft_ms.p50),
        row("streams: TTFT p99 ms", lambda w: w.stream_ttft_ms.p99),
        row("long: TTFT p50 ms", lambda w: w.long_ttft_ms.p50),
        row("long: TTFT p99 ms", lambda w: w.long_ttft_ms.p99),
        ["long: sent in the window / ok"] + [f"{p.window.num_long_sent} / {p.window.num_long_ok}" for p in here],
        row("**output tok/s**", lambda w: w.output_tok_per_s, 0),
        row("streams' tok/s", lambda w: w.stream_tok_per_s, 0),
        row("failed requests (whole point)", lambda w: w.num_failed, 0),
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default: bench/out/disagg-TIMESTAMP, ignored by git)")
    add_dataclass_flags(parser, DisaggSpec, "scenario options")
    args = parser.parse_args()
    spec = from_flags(DisaggSpec, args)
    print(run(spec, args.out or default_out("disagg")))


if __name__ == "__main__":
    main()
