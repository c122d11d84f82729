"""Aggregated against disaggregated serving, same number of engines: `python -m bench.disagg [--out DIR]`.

In one run, one after another:

1. raw NIXL READ bandwidth between two processes (bench/nixl_bandwidth.py), as our workers'
   connector sets NIXL up ("deployment") and at its best on 2 cores ("direct");
2. configs/agg.yaml with 2 decode workers (2 engines, each prefills its own prompts);
3. configs/disagg.yaml: 1 decode + 1 prefill worker (2 engines; prompts longer than
   disagg.max_local_prefill_length are prefilled on the prefill worker and pulled over NIXL).

Both deployments get the harness's `mixed` workload (long prompts with short answers beside short
prompts with long answers) at the same concurrencies and seeds. Around each load point the
decode worker's lease is read (kv_transfer_bytes / kv_transfer_seconds, remote prefills, local
fallbacks); the difference after minus before is that point's KV traffic.

Deployments use Redis databases 6 (agg) and 7 (disagg), flushed before each start.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.flags import add_dataclass_flags, from_flags, help_text
from bench.output import default_out
from bench.records import LoadMode, LoadPoint, RequestRecord
from bench.runner import RunOptions
from bench.scenario import MachineState, Workload, fmt, measure, table, write_json
from bench.stats import Distribution, Summary, summarize
from bench.workloads import WorkloadKind, WorkloadParams

logger = logging.getLogger(__name__)

# A `python -m bench SUBCOMMAND` run (run, kv-routing, vs-vllm, ...), which would share the machine;
# not `python -m bench.disagg` itself.
OTHER_BENCH = r"-m bench [a-z]"
DEPLOYMENTS = {  # label -> (config, --set overrides, Redis db)
    "agg": ("configs/agg.yaml", {"workers.num_decode": "2"}, 6),
    "disagg": ("configs/disagg.yaml", {}, 7),
}



@dataclass(frozen=True)
class DisaggSpec:
    concurrency: str = field(default="2,6", metadata=help_text("closed-loop concurrencies"))
    num_requests: int = field(default=24, metadata=help_text("requests per deployment and load point (half long)"))
    long_input_len: int = field(default=1280, metadata=help_text("long prompts, tokens"))
    long_output_len: int = field(default=16, metadata=help_text("long prompts' max_tokens"))
    short_input_len: int = field(default=32, metadata=help_text("short prompts, tokens"))
    short_output_len: int = field(default=192, metadata=help_text("short prompts' max_tokens"))
    seed: int = field(default=0, metadata=help_text("load point i uses seed + i on both deployments"))
    connector: str = field(default="push", metadata=help_text("the disagg deployment's disagg.connector: push "
                                                              "(prefill writes the KV) or pull (decode reads it)"))
    point_deadline_s: float = field(default=240.0, metadata=help_text("bound on each load point"))

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.concurrency.split(",") if c.strip())

    def workload(self, concurrency: int, seed: int, num_requests: int) -> Workload:
        params = WorkloadParams(long_input_len=self.long_input_len, long_output_len=self.long_output_len,
                                short_input_len=self.short_input_len, short_output_len=self.short_output_len)
        options = RunOptions(num_requests=num_requests, seed=seed, request_timeout_s=120.0,
                             deadline_s=self.point_deadline_s, warmup_sessions=0)
        return Workload(WorkloadKind.MIXED, params, (concurrency,), options)


# -- pure: KV transfer deltas, per-class latencies ----------------------------------------------


@dataclass(frozen=True)
class TransferCounters:
    """A decode worker's disaggregation counters, as its lease carries them."""

    kv_bytes: int = 0
    kv_seconds: float = 0.0
    remote_prefills: int = 0
    local_fallbacks: int = 0

    @classmethod
    def of(cls, status) -> TransferCounters:
        return cls(status.kv_transfer_bytes, status.kv_transfer_seconds, status.num_remote_prefills,
                   status.num_local_fallbacks)

    def __sub__(self, earlier: TransferCounters) -> TransferCounters:
        return TransferCounters(self.kv_bytes - earlier.kv_bytes, self.kv_seconds - earlier.kv_seconds,
                                self.remote_prefills - earlier.remote_prefills,
                                self.local_fallbacks - earlier.local_fallbacks)

    def __add__(self, other: TransferCounters) -> TransferCounters:
        return TransferCounters(self.kv_bytes + other.kv_bytes, self.kv_seconds + other.kv_seconds,
                                self.remote_prefills + other.remote_prefills,
                                self.local_fallbacks + other.local_fallbacks)

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
        if min(delta.kv_bytes, delta.kv_seconds, delta.remote_prefills, delta.local_fallbacks) < 0:
            delta = now
        total = total + delta
    return total


def ratio(ours: float | None, base: float | None) -> float | None:
    return ours / base if ours is not None and base else None


@dataclass(frozen=True)
class ClassLatencies:
    """The two request classes apart: long prompts (TTFT is their prefill) and short prompts
    with long answers (ITL is what a long prefill beside them disturbs)."""

    long_ttft_ms: Distribution
    short_ttft_ms: Distribution
    short_itl_ms: Distribution
    short_tpot_ms: Distribution
    long_ok: int
    short_ok: int


def class_latencies(records: Sequence[RequestRecord], long_output_len: int) -> ClassLatencies:
    ok = [r for r in records if r.ok]
    long = [r for r in ok if r.max_tokens == long_output_len]
    short = [r for r in ok if r.max_tokens != long_output_len]
    return ClassLatencies(
        long_ttft_ms=Distribution.of([r.ttft_ms for r in long if r.ttft_ms is not None]),
        short_ttft_ms=Distribution.of([r.ttft_ms for r in short if r.ttft_ms is not None]),
        short_itl_ms=Distribution.of([g for r in short for g in r.itl_ms]),
        short_tpot_ms=Distribution.of([r.tpot_ms for r in short if r.tpot_ms is not None]),
        long_ok=len(long), short_ok=len(short))


# -- the machine and the deployments -------------------------------------------------------------


def wait_for_other_benchmarks(poll_s: float = 20.0, max_wait_s: float = 1200.0) -> float:
    """Waits while another engineer's benchmark runs; returns the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < max_wait_s:
        found = subprocess.run(["pgrep", "-af", "--", OTHER_BENCH], capture_output=True, text=True).stdout.strip()
        if not found:
            return time.monotonic() - began
        logger.info("another benchmark is running; waiting %.0f s:\n%s", poll_s, found)
        time.sleep(poll_s)
    logger.warning("another benchmark still runs after %.0f s; measuring anyway", max_wait_s)
    return time.monotonic() - began


class _Deployment:
    """`python -m launcher serve` on its own port and Redis db (6 or 7). bench.deploy's
    LauncherDeployment allows only databases 1-5, so this reuses its process handling only."""

    def __init__(self, label: str, log_dir: Path, extra_sets: dict | None = None):
        from bench.deploy import ManagedProcess, free_port

        config, sets, db = DEPLOYMENTS[label]
        sets = {**sets, **(extra_sets or {})}
        if db not in (6, 7):
            raise ValueError("this scenario uses Redis databases 6 and 7 only")
        self.label, self.redis_url, self.port = label, f"redis://127.0.0.1:6379/{db}", free_port()
        argv = [sys.executable, "-m", "launcher", "serve", "-f", config, "--set", f"frontend.port={self.port}",
                "--set", "flower.enabled=false", "--set", f"redis_url={self.redis_url}"]
        argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        drop = ("REDIS_URL", "PORT", "LLMQ_CONFIG", "VLLM_CPU_KVCACHE_SPACE", "UCX_TLS")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ__") and k not in drop}
        self.process = ManagedProcess(label, argv, log_dir / f"{label}.log", env=env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def __enter__(self) -> _Deployment:
        from bench.deploy import LAUNCHER_READY

        self.redis.flushdb()
        self.process.start()
        try:
            self.process.wait_until(lambda: LAUNCHER_READY in self.process.log_text(), 300)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        from bench.deploy import LAUNCHER_STOPPED, trim_log

        self.process.stop()
        if LAUNCHER_STOPPED not in self.process.log_text():
            logger.warning("%s: no %r line in its log", self.label, LAUNCHER_STOPPED)
        trim_log(self.process.log_path)


def idle_cpu(pids: Sequence[int], seconds: float = 5.0) -> dict:
    """CPU the deployment's processes burn with no request in flight: cores used in all, and the
    busiest threads by name (a NIXL progress thread that polls shows up here)."""
    import psutil

    def sample() -> dict[tuple[int, int], tuple[str, float]]:
        found = {}
        for pid in pids:
            try:
                for t in psutil.Process(pid).threads():
                    try:
                        name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
                    except OSError:
                        name = "?"
                    found[(pid, t.id)] = (name, t.user_time + t.system_time)
            except psutil.NoSuchProcess:
                continue
        return found

    first = sample()
    time.sleep(seconds)
    second = sample()
    used = {k: (second[k][0], (second[k][1] - first[k][1]) / seconds) for k in second if k in first}
    top = sorted(used.items(), key=lambda kv: -kv[1][1])[:6]
    return {"seconds": seconds, "cores_used": sum(v for _, v in used.values()),
            "top_threads": [{"pid": pid, "tid": tid, "name": name, "cores": round(c, 3)}
                            for (pid, tid), (name, c) in top]}


# -- the scenario ---------------------------------------------------------------------------------


@dataclass
class PointResult:
    deployment: str
    load: str
    seed: int
    uptime: str
    summary: Summary
    classes: ClassLatencies
    transfers: TransferCounters | None  # disagg only
    prefill_served: int | None
    idle: dict | None = None  # idle CPU, sampled once per deployment before its first point

    def to_json(self) -> dict:
        t = self.transfers
        return {"deployment": self.deployment, "load": self.load, "seed": self.seed, "uptime": self.uptime,
                "summary": asdict(self.summary), "classes": asdict(self.classes),
                "transfers": None if t is None else {**asdict(t), "gbytes_per_s": t.gbytes_per_s,
                                                     "bytes_per_remote_prefill": t.bytes_per_remote_prefill,
                                                     "ms_per_remote_prefill": t.ms_per_remote_prefill},
                "prefill_served": self.prefill_served, "idle_cpu": self.idle}


def run_deployment(label: str, spec: DisaggSpec, out: Path, model: str, points: list[PointResult],
                   records: list[dict]) -> None:
    """Appends each point to `points` as soon as it is measured, so a failure keeps the earlier ones."""
    from bench.cache_stats import fresh_leases

    wait_for_other_benchmarks()
    extra = {"disagg.connector": spec.connector} if label == "disagg" else {}
    with _Deployment(label, out / "logs", extra) as dep:
        num_decode = 2 if label == "agg" else 1
        fresh_leases(dep.redis, num_decode, since_unix=0, timeout_s=180)
        if label == "disagg":
            fresh_leases(dep.redis, 1, since_unix=0, timeout_s=180, role="prefill")
        measure(spec.workload(2, spec.seed + 1000, 4), label, dep.base_url, model)  # unrecorded warm-up
        time.sleep(2.0)
        idle = idle_cpu([p.pid for p in dep.process.process_tree()])
        logger.info("[%s] idle: %.2f cores; %s", label, idle["cores_used"], idle["top_threads"][:3])
        for i, concurrency in enumerate(spec.concurrencies):
            workload = spec.workload(concurrency, spec.seed + i, spec.num_requests)
            before = fresh_leases(dep.redis, num_decode, since_unix=time.time())
            prefill_before = fresh_leases(dep.redis, 1, time.time(), role="prefill") if label == "disagg" else []
            uptime = MachineState.now().uptime
            logger.info("[%s c=%d] %s", label, concurrency, uptime)
            result = measure(workload, label, dep.base_url, model)
            time.sleep(1.5)  # the engines' last steps reach their stat loggers
            after = fresh_leases(dep.redis, num_decode, since_unix=time.time())
            point = LoadPoint(LoadMode.CLOSED, concurrency)
            transfers, served = None, None
            if label == "disagg":
                prefill_after = fresh_leases(dep.redis, 1, time.time(), role="prefill")
                transfers = transfer_delta(before, after)
                if spec.connector == "push":
                    # The side that moves the KV counts its bytes and time: with push, the prefill
                    # worker WRITEs it (the remote prefills and fallbacks stay the decode side's).
                    moved = transfer_delta(prefill_before, prefill_after)
                    transfers = replace(transfers, kv_bytes=moved.kv_bytes, kv_seconds=moved.kv_seconds)
                served = sum(w.num_prefills_served for w in prefill_after) - sum(
                    w.num_prefills_served for w in prefill_before)
            points.append(PointResult(label, point.label, workload.options.seed, uptime,
                                      summarize(label, point, result.records, None),
                                      class_latencies(result.records, spec.long_output_len), transfers, served,
                                      idle if i == 0 else None))
            records += [r.to_json() for r in result.records]


def run(spec: DisaggSpec, out: Path, model: str = "tiny-llama") -> Path:
    from bench import nixl_bandwidth

    out.mkdir(parents=True, exist_ok=True)
    wait_for_other_benchmarks()
    started = MachineState.now()
    raw = nixl_bandwidth.run(out, list(nixl_bandwidth.SETUPS), prompt_tokens=spec.long_input_len)
    raw.pop("markdown")
    points, records, errors = [], [], []
    for label in DEPLOYMENTS:
        try:
            run_deployment(label, spec, out, model, points, records)
        except Exception as e:  # keep what was measured; the report says what failed
            logger.exception("%s failed", label)
            errors.append(f"{label}: {type(e).__name__}: {e}")
    finished = MachineState.now()
    body = {"scenario": "disagg", "spec": asdict(spec), "deployments": {k: v[:2] for k, v in DEPLOYMENTS.items()},
            "machine_start": asdict(started), "machine_end": asdict(finished), "nixl_raw": raw,
            "points": [p.to_json() for p in points], "transfer_vs_raw": transfer_vs_raw(points, raw),
            "errors": errors, "records": records}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, points, raw, started, finished)
                    + "".join(f"\n**Failed:** {e}\n" for e in errors))
    return path


def _raw_rate(raw: dict, setup: str, index: int) -> float:
    return raw["setups"][setup]["cases"][index]["gbytes_per_s"]


def transfer_vs_raw(points: list[PointResult], raw: dict) -> list[dict]:
    """Each disagg point's KV transfer rate as a ratio of the raw rates measured in this run:
    the vLLM-like case (the same descriptors for one long prompt) and the 256 MiB case."""
    rows = []
    for p in points:
        if p.transfers is None:
            continue
        rate = p.transfers.gbytes_per_s
        rows.append({"load": p.load, "kv_gbytes_per_s": rate,
                     **{f"ratio_to_{s}_{c}": ratio(rate, _raw_rate(raw, s, i))
                        for s in raw["setups"] for i, c in ((0, "vllm_like"), (3, "256MiB"))}})
    return rows


# -- report.md ------------------------------------------------------------------------------------


MOVES = {  # disagg.connector -> how the KV reaches the decode worker
    "pull": "the decode worker pulls the KV over NIXL (NixlConnector)",
    "push": "the prefill worker writes the KV over NIXL into blocks the decode worker registered "
            "(NixlPushConnector)",
}


def markdown(spec: DisaggSpec, points: list[PointResult], raw: dict, started: MachineState,
             finished: MachineState) -> str:
    lines = ["# Aggregated (2 decode workers) against disaggregated (1 decode + 1 prefill)", "",
             f"- started {started.at}; `uptime` at the start: `{started.uptime}`; at the end: `{finished.uptime}`; "
             f"{started.num_cpus} CPUs",
             f"- workload: mixed, {spec.num_requests} requests per load point, half long ({spec.long_input_len} "
             f"tokens in / {spec.long_output_len} out), half short ({spec.short_input_len} in / "
             f"{spec.short_output_len} out), closed loop, load point i uses seed {spec.seed} + i on both",
             "- disagg: prompts longer than 512 uncached tokens are prefilled on the prefill worker while the "
             "prefill queue holds fewer than 4; " + MOVES[spec.connector], ""]
    for load in dict.fromkeys(p.load for p in points):
        agg = next((p for p in points if p.load == load and p.deployment == "agg"), None)
        dis = next((p for p in points if p.load == load and p.deployment == "disagg"), None)
        if agg is None or dis is None:
            continue
        lines += [f"## {load}", "", f"- `uptime` before agg: `{agg.uptime}`",
                  f"- `uptime` before disagg: `{dis.uptime}`",
                  ""]
        lines += table(["", "agg", "disagg", "disagg / agg"], comparison_rows(agg, dis))
        if agg.idle and dis.idle:
            lines += ["Idle CPU before the first point (5 s, no request in flight; cores used by the "
                      "deployment's processes, and the busiest threads):", ""]
            for p in (agg, dis):
                tops = ", ".join(f"{t['name']} {t['cores']:.2f}" for t in p.idle["top_threads"][:4])
                lines += [f"- {p.deployment}: {p.idle['cores_used']:.2f} cores; {tops}"]
            lines += [""]
        t = dis.transfers
        mover = "prefill" if spec.connector == "push" else "decode"
        lines += table(["KV over NIXL (leases, after − before)", "value"], [
            ["remote prefills / local fallbacks (decode worker)", f"{t.remote_prefills} / {t.local_fallbacks}"],
            ["prefills served (prefill worker)", str(dis.prefill_served)],
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
    for name, s in raw["setups"].items():
        lines += [f"- {name} ({s['label']}): " + "; ".join(
            f"{c['name']}: {c['latency_ms_p50']:.3f} ms, {c['gbytes_per_s']:.2f} GB/s" for c in s["cases"])]
    lines += ["", "Interpretation: see [README.md](README.md).", ""]
    return "\n".join(lines)


def comparison_rows(agg: PointResult, dis: PointResult) -> list[list[str]]:
    def row(name, get, digits=1):
        a, b = get(agg), get(dis)
        return [name, fmt(a, digits), fmt(b, digits), "–" if ratio(b, a) is None else f"{ratio(b, a):.2f}x"]

    return [
        row("short: ITL p50 ms", lambda p: p.classes.short_itl_ms.p50, 2),
        row("short: ITL p99 ms", lambda p: p.classes.short_itl_ms.p99, 2),
        row("short: TPOT p50 ms", lambda p: p.classes.short_tpot_ms.p50, 2),
        row("short: TTFT p50 ms", lambda p: p.classes.short_ttft_ms.p50),
        row("short: TTFT p99 ms", lambda p: p.classes.short_ttft_ms.p99),
        row("long: TTFT p50 ms", lambda p: p.classes.long_ttft_ms.p50),
        row("long: TTFT p99 ms", lambda p: p.classes.long_ttft_ms.p99),
        row("all: ITL p50 ms", lambda p: p.summary.itl_ms.p50, 2),
        row("all: ITL p99 ms", lambda p: p.summary.itl_ms.p99, 2),
        row("all: TTFT p50 ms", lambda p: p.summary.ttft_ms.p50),
        row("all: TTFT p99 ms", lambda p: p.summary.ttft_ms.p99),
        row("all: E2E p50 ms", lambda p: p.summary.e2e_ms.p50),
        row("output tok/s", lambda p: p.summary.output_tok_per_s),
        row("req/s", lambda p: p.summary.req_per_s, 2),
        ["ok / total", f"{agg.summary.num_ok}/{agg.summary.num_requests}",
         f"{dis.summary.num_ok}/{dis.summary.num_requests}", ""],
    ]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m bench.disagg", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default: bench/out/disagg-TIMESTAMP, ignored by git)")
    parser.add_argument("--model", default="tiny-llama")
    add_dataclass_flags(parser, DisaggSpec, "scenario options")
    args = parser.parse_args()
    spec = from_flags(DisaggSpec, args)
    print(run(spec, args.out or default_out("disagg"), args.model))


if __name__ == "__main__":
    main()
