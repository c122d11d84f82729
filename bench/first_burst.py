"""The first burst after a start: `python -m bench first-burst`.

A fresh deployment per run. It serves 4 requests one at a time, as a health check or the harness's
warm-up would, then `--bursts` bursts of `--burst-size` requests at once, `--gap-s` apart. Per
burst: TTFT, and its split into dispatch (sent → the worker's Accepted) and engine (Accepted →
first token) from the request's output stream, as `bench stages` splits it. Over the first burst:
what each process of the deployment grew by, in page faults and private memory, from /proc.

With `--compare-set KEY=VALUE`, each round runs the config as it is and then with that override,
so the two alternate on the same machine: e.g. `--compare-set frontend.gc_freeze=false`. With
`--vllm` (the default), each round also runs vLLM's own server on the same engine arguments, for
TTFT only: it writes no output streams to split it by.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.deploy import LauncherDeployment, VllmServer
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stages import _closed_loop, read_events, stage_times
from bench.stats import Distribution
from bench.workloads import WorkloadParams, synthetic

logger = logging.getLogger(__name__)

VLLM = "vllm serve"


@dataclass(frozen=True)
class FirstBurstSpec:
    """The scenario's knobs; `python -m bench first-burst`'s flags are generated from these."""

    config: str = field(default="configs/agg.yaml", metadata=help_text("the deployment to measure"))
    rounds: int = field(default=3, metadata=help_text("fresh deployments per variant"))
    bursts: int = field(default=3, metadata=help_text("bursts per deployment"))
    burst_size: int = field(default=32, metadata=help_text("requests sent at once in a burst"))
    gap_s: float = field(default=2.0, metadata=help_text("pause between bursts, seconds"))
    input_len: int = field(default=128, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    compare_set: str = field(default="", metadata=help_text("KEY=VALUE: also run every round with this override"))
    vllm: bool = field(default=True, metadata=help_text("also run vLLM's own server every round"))
    redis_db: int = field(default=3, metadata=help_text("Redis database (1-5), flushed before each start"))
    seed: int = field(default=0, metadata=help_text("workload seed"))


# -- /proc: what a process grew by ------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessUse:
    name: str
    minor_faults: int
    private_mb: float

    @staticmethod
    def read(proc: psutil.Process) -> ProcessUse:
        with open(f"/proc/{proc.pid}/stat") as f:
            stat = f.read()
        # Fields after the parenthesised name, which may hold spaces: minflt is the 8th.
        minor_faults = int(stat[stat.rfind(")") + 2:].split()[7])
        return ProcessUse(proc.name(), minor_faults, proc.memory_full_info().uss / 2**20)


def process_uses(pids: list[int]) -> dict[int, ProcessUse]:
    uses = {}
    for pid in pids:
        try:
            uses[pid] = ProcessUse.read(psutil.Process(pid))
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
    return uses


def growth(before: dict[int, ProcessUse], after: dict[int, ProcessUse]) -> list[dict]:
    """Per process alive at both reads, by name: page faults and private MB gained."""
    return [{"pid": pid, "name": after[pid].name, "minor_faults": after[pid].minor_faults - b.minor_faults,
             "private_mb": round(after[pid].private_mb - b.private_mb, 1)}
            for pid, b in sorted(before.items()) if pid in after]


# -- one deployment ---------------------------------------------------------------------------------


def _burst_row(burst: int, rows: list[dict]) -> dict:
    return {"burst": burst, "num_failed": sum(r["ttft"] is None for r in rows),
            **{stage: asdict(Distribution.of([r[stage] for r in rows if r[stage] is not None]))
               for stage in ("ttft", "dispatch", "engine_first")}}


def measure(spec: FirstBurstSpec, variant: str, sets: dict[str, str], round_: int, out: Path) -> dict:
    params = WorkloadParams(input_len_mean=spec.input_len, input_len_std=0.0, output_len_mean=spec.output_len)
    rng = random.Random(f"first-burst:{spec.seed}:{round_}")

    def prompts(n: int) -> list[tuple[list[int], int]]:
        return [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens) for s in synthetic(rng, params, n)]

    name = re.sub(r"[^\w.-]+", "_", f"{variant}-{round_}")  # names its log file
    ours = variant != VLLM
    server = (LauncherDeployment(spec.config, out / "logs", spec.redis_db, sets=sets, name=name) if ours
              else VllmServer(spec.config, out / "logs", name=name))
    with server as dep:
        asyncio.run(_closed_loop(dep.base_url, prompts(4), 1, "warm-"))
        pids = [p.pid for p in dep.process_tree()]
        bursts, grew = [], []
        for b in range(spec.bursts):
            if b:
                time.sleep(spec.gap_s)  # the workload's pause between bursts
            before = process_uses(pids)
            prefix = f"burst-{uuid.uuid4().hex[:6]}-{b}-"
            sent = asyncio.run(_closed_loop(dep.base_url, prompts(spec.burst_size), spec.burst_size, prefix))
            if b == 0:
                grew = growth(before, process_uses(pids))
            bursts.append(_burst_row(b, [stage_times(s, read_events(dep.redis, s.request_id) if ours else [])
                                         for s in sent]))
            logger.info("%s burst %d: TTFT p50 %.0f ms", name, b, bursts[-1]["ttft"]["p50"] or 0)
    return {"variant": variant, "round": round_, "sets": sets, "bursts": bursts, "first_burst_growth": grew}


def run(spec: FirstBurstSpec, out: Path) -> Path:
    started = MachineState.now()
    variants = [("as-configured", {})]
    if spec.compare_set:
        key, sep, value = spec.compare_set.partition("=")
        if not sep:
            raise ValueError(f"--compare-set wants KEY=VALUE, not {spec.compare_set!r}")
        variants.append((spec.compare_set, {key: value}))
    if spec.vllm:
        variants.append((VLLM, {}))
    runs = [measure(spec, label, sets, r, out) for r in range(1, spec.rounds + 1) for label, sets in variants]
    body = {"scenario": "first-burst", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(MachineState.now()), "runs": runs}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, body))
    return path


# -- the report -------------------------------------------------------------------------------------


def by_name(grew: list[dict]) -> dict[str, tuple[int, int, float]]:
    """Growth summed over the processes of one name (gunicorn's workers, say): (processes, page
    faults, private MB)."""
    sums: dict[str, tuple[int, int, float]] = {}
    for g in grew:
        n, faults, mb = sums.get(g["name"], (0, 0, 0.0))
        sums[g["name"]] = (n + 1, faults + g["minor_faults"], mb + g["private_mb"])
    return sums


def markdown(spec: FirstBurstSpec, body: dict) -> str:
    m = body["machine_start"]
    lines = [f"# The first burst after a start: {spec.config}", "",
             f"- started {m['at']}; load average (1/5/15 min) {m['load_1m']:.2f} / {m['load_5m']:.2f} / "
             f"{m['load_15m']:.2f}",
             f"- per run: a fresh deployment, 4 requests one at a time, then {spec.bursts} bursts of "
             f"{spec.burst_size} requests at once, {spec.gap_s:g} s apart; {spec.input_len} tokens in, "
             f"{spec.output_len} out", ""]
    header = ["variant", "round"] + [f"burst {b}: TTFT p50 (dispatch, engine) ms" for b in range(spec.bursts)]
    rows = []
    for r in body["runs"]:
        cells = [f"{fmt(b['ttft']['p50'], 0)} ({fmt(b['dispatch']['p50'], 0)}, {fmt(b['engine_first']['p50'], 0)})"
                 + (f", {b['num_failed']} failed" if b["num_failed"] else "") for b in r["bursts"]]
        rows.append([r["variant"], str(r["round"])] + cells)
    lines += table(header, rows)
    medians = []
    for variant in dict.fromkeys(r["variant"] for r in body["runs"]):
        firsts = [r["bursts"][0]["ttft"]["p50"] for r in body["runs"] if r["variant"] == variant]
        medians.append(f"{variant} {fmt(Distribution.of([f for f in firsts if f is not None]).p50, 0)} ms")
    lines += ["The first burst's TTFT p50, median over rounds: " + "; ".join(medians) + ".", ""]
    lines += ["Over the first burst, what each kind of process grew by, summed over its processes: "
              "page faults, then private MB.", ""]
    sums = [by_name(r["first_burst_growth"]) for r in body["runs"]]
    names = sorted({name for s in sums for name in s})
    rows = [[r["variant"], str(r["round"])] + [f"{s[k][1]:,}, {s[k][2]:,.1f}" if k in s else "–" for k in names]
            for r, s in zip(body["runs"], sums)]
    counts = {k: max(s[k][0] for s in sums if k in s) for k in names}
    lines += table(["variant", "round"] + [f"{k} (x{counts[k]})" for k in names], rows)
    return "\n".join(lines)
