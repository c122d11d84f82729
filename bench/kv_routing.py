"""KV-aware routing against round-robin, on the same workload: `python -m bench kv-routing`.

configs/agg_router.yaml (two decode workers and a router task) is started twice, once per router
mode, on a fresh Redis database each time, so both start with cold caches. Each gets the same
unrecorded warm-up, then the harness's multiturn workload (conversations over K shared system
prompts) at each concurrency, with the same seed. Around each load point the scenario reads

- the engines' own prefix-cache counters from the decode workers' leases (after minus before,
  summed over the workers): the hit rate that decides how much prefill is skipped;
- the router's counters (llmq:router:overlap-blocks / prompt-blocks), which only the kv mode keeps;
- the harness's TTFT, ITL, E2E, throughput and the cached tokens the server reported in `usage`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.cache_stats import CacheCounters, RouterCounters, engine_deltas, fresh_leases, read_router_counters, total
from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.records import LoadMode, LoadPoint
from bench.runner import RunOptions, RunResult
from bench.scenario import MachineState, Workload, fmt, measure, merge, table, write_harness_folder, write_json
from bench.stats import Summary, summarize
from bench.workloads import WorkloadKind, WorkloadParams

logger = logging.getLogger(__name__)

CONFIG = "configs/agg_router.yaml"
MODES = ("round-robin", "kv")  # the first is the baseline
NUM_DECODE = 2
WARMUP_SEED_OFFSET = 1000



@dataclass(frozen=True)
class KvRoutingSpec:
    """The scenario's knobs; `python -m bench kv-routing`'s flags are generated from these."""

    concurrency: str = field(default="4,12", metadata=help_text("closed-loop concurrencies (conversations in flight)"))
    num_requests: int = field(default=96, metadata=help_text("requests (turns) per mode and load point"))
    turns_per_session: int = field(default=4, metadata=help_text("turns per conversation"))
    num_system_prompts: int = field(default=8, metadata=help_text("distinct shared system prompts (K)"))
    system_prompt_words: int = field(default=384, metadata=help_text("system prompt length in words (~2 tokens each)"))
    user_turn_words: int = field(default=48, metadata=help_text("user message length in words"))
    output_len: int = field(default=24, metadata=help_text("max_tokens of every answer (ignore_eos)"))
    seed: int = field(default=0, metadata=help_text("load point i uses seed + i, in both modes"))
    redis_db: int = field(default=4, metadata=help_text("Redis database (1-5), flushed before each start"))
    request_timeout_s: float = field(default=120.0, metadata=help_text("bound on each request"))
    point_deadline_s: float = field(default=300.0, metadata=help_text("bound on each load point"))

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.concurrency.split(",") if c.strip())

    def workload(self, concurrency: int, seed: int, num_requests: int | None = None) -> Workload:
        params = WorkloadParams(output_len_mean=self.output_len, output_len_std=0.0,
                                turns_per_session=self.turns_per_session, num_system_prompts=self.num_system_prompts,
                                system_prompt_words=self.system_prompt_words, user_turn_words=self.user_turn_words)
        options = RunOptions(num_requests=num_requests or self.num_requests, seed=seed,
                             request_timeout_s=self.request_timeout_s, deadline_s=self.point_deadline_s,
                             warmup_sessions=0)
        return Workload(WorkloadKind.MULTITURN, params, (concurrency,), options)


@dataclass(frozen=True)
class TurnShare:
    """Requests at one conversation turn, with their prompt and cached tokens from `usage`."""

    num_requests: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def cached_share(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def prompt_tokens_per_request(self) -> float:
        return self.prompt_tokens / self.num_requests if self.num_requests else 0.0


def hit_rate_by_turn(records) -> dict[int, TurnShare]:
    """Per conversation turn, over the successful requests. Turn 0 can only reuse a system
    prompt; later turns can also reuse the conversation so far, if they reach the engine that
    holds it."""
    sums: dict[int, list[int]] = {}
    for r in records:
        if r.ok and r.prompt_tokens:
            acc = sums.setdefault(r.turn, [0, 0, 0])
            acc[0] += 1
            acc[1] += r.prompt_tokens
            acc[2] += r.cached_tokens
    return {turn: TurnShare(*acc) for turn, acc in sorted(sums.items())}


@dataclass
class PointResult:
    """One router mode at one load point."""

    mode: str
    load: str
    seed: int
    machine: MachineState
    engine: dict[str, CacheCounters]
    router: RouterCounters
    summary: Summary
    by_turn: dict[int, TurnShare] = field(default_factory=dict)

    @property
    def engine_total(self) -> CacheCounters:
        return total(self.engine)

    @property
    def client_cached_share(self) -> float | None:
        s = self.summary
        return s.cached_tokens / s.prompt_tokens if s.prompt_tokens else None

    def to_json(self) -> dict:
        return {"mode": self.mode, "load": self.load, "seed": self.seed, "machine": asdict(self.machine),
                "engine_per_worker": {w: {**asdict(c), "hit_rate": c.hit_rate} for w, c in self.engine.items()},
                "engine_total": {**asdict(self.engine_total), "hit_rate": self.engine_total.hit_rate},
                "router": {**asdict(self.router), "hit_rate": self.router.hit_rate},
                "client_cached_share": self.client_cached_share,
                "by_turn": {str(t): {**asdict(share), "cached_share": share.cached_share}
                            for t, share in self.by_turn.items()},
                "summary": asdict(self.summary)}


def run(spec: KvRoutingSpec, out: Path, model: str = "tiny-llama") -> Path:
    started = MachineState.now()
    logger.info("kv-routing: load average %s", started.label)
    points, runs = [], []
    for mode in MODES:
        mode_points, mode_runs = run_mode(mode, spec, out, model)
        points += mode_points
        runs.append(_join_points(mode_runs))
    finished = MachineState.now()
    write_harness_folder(merge(runs, baseline=MODES[0]), out / "harness")
    body = {"scenario": "kv-routing", "config": CONFIG, "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "points": [p.to_json() for p in points]}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, points, started, finished))
    return path


def run_mode(mode: str, spec: KvRoutingSpec, out: Path, model: str) -> tuple[list[PointResult], list[RunResult]]:
    points, runs = [], []
    with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, sets={"router.mode": mode},
                            name=f"agg_router-{mode}") as dep:
        client = dep.redis
        fresh_leases(client, NUM_DECODE, since_unix=0, timeout_s=180)
        warm = spec.workload(2, spec.seed + WARMUP_SEED_OFFSET, num_requests=2 * spec.turns_per_session)
        measure(warm, mode, dep.base_url, model)  # unrecorded: connections, first-use costs
        for i, concurrency in enumerate(spec.concurrencies):
            workload = spec.workload(concurrency, spec.seed + i)
            before = fresh_leases(client, NUM_DECODE, since_unix=time.time())
            router_before = read_router_counters(client)
            machine = MachineState.now()
            logger.info("[%s c=%d] load average %s", mode, concurrency, machine.label)
            result = measure(workload, mode, dep.base_url, model)
            time.sleep(0.5)  # the engines' last steps reach their stat loggers
            after = fresh_leases(client, NUM_DECODE, since_unix=time.time())
            point = LoadPoint(LoadMode.CLOSED, concurrency)
            summary = summarize(mode, point, result.records, None)
            points.append(PointResult(mode, point.label, workload.options.seed, machine, engine_deltas(before, after),
                                      read_router_counters(client) - router_before, summary,
                                      hit_rate_by_turn(result.records)))
            runs.append(result)
    return points, runs


def _join_points(runs: list[RunResult]) -> RunResult:
    """One target's single-point runs as one run over all its load points."""
    values = tuple(v for r in runs for v in r.config.load_values)
    config = replace(runs[0].config, load_values=values)
    return RunResult(config, [rec for r in runs for rec in r.records], runs[0].started_at, sum(r.wall_s for r in runs))


# -- report.md ------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _ratio(ours: float | None, base: float | None) -> str:
    return "–" if ours is None or not base else f"{ours / base:.2f}x"


def comparison_rows(rr: PointResult, kv: PointResult) -> list[list[str]]:
    def row(name, get, show, ratio=True):
        a, b = get(rr), get(kv)
        return [name, show(a), show(b), _ratio(b, a) if ratio else ""]

    s = lambda p: p.summary  # noqa: E731
    ms = lambda v: fmt(v)  # noqa: E731
    split = lambda p: " / ".join(f"{c.queries:,}" for _, c in sorted(p.engine.items()))  # noqa: E731
    return [
        row("engine prefix-cache hit rate (tokens)", lambda p: p.engine_total.hit_rate, _pct),
        row("router hit rate (blocks)", lambda p: p.router.hit_rate, _pct),
        row("cached / prompt tokens in `usage`", lambda p: p.client_cached_share, _pct),
        row("TTFT p50 ms", lambda p: s(p).ttft_ms.p50, ms),
        row("TTFT p90 ms", lambda p: s(p).ttft_ms.p90, ms),
        row("TTFT p99 ms", lambda p: s(p).ttft_ms.p99, ms),
        row("ITL p50 ms", lambda p: s(p).itl_ms.p50, lambda v: fmt(v, 2)),
        row("E2E p50 ms", lambda p: s(p).e2e_ms.p50, ms),
        row("output tok/s", lambda p: s(p).output_tok_per_s, ms),
        row("req/s", lambda p: s(p).req_per_s, lambda v: fmt(v, 2)),
        row("ok / total", lambda p: f"{s(p).num_ok}/{s(p).num_requests}", str, ratio=False),
        row("prompt tokens queried per worker (engine)", split, str, ratio=False),
        row("load average (1/5/15 min) at start", lambda p: p.machine.label, str, ratio=False),
    ]


def _share(p: PointResult, turn: int) -> float | None:
    return p.by_turn[turn].cached_share if turn in p.by_turn else None


def _per_request(p: PointResult, turn: int) -> str:
    return fmt(p.by_turn[turn].prompt_tokens_per_request, 0) if turn in p.by_turn else "–"


def markdown(spec: KvRoutingSpec, points: list[PointResult], started: MachineState, finished: MachineState) -> str:
    lines = ["# KV-aware routing against round-robin", "",
             f"- {CONFIG}: {NUM_DECODE} decode workers (one vLLM engine each, each bound to its own core) "
             "and one router task; each mode on a freshly started deployment (cold caches)",
             f"- started {started.at}; load average (1/5/15 min) {started.label} at the start, "
             f"{finished.label} at the end; {started.num_cpus} CPUs",
             f"- workload: multiturn, {spec.num_requests} turns per load point in conversations of "
             f"{spec.turns_per_session} turns over {spec.num_system_prompts} shared system prompts of "
             f"{spec.system_prompt_words} words, user turns of {spec.user_turn_words} words, "
             f"{spec.output_len} output tokens each; closed loop; load point i uses seed {spec.seed} + i in both modes",
             "- hit rates: engine = sum over decode workers of Δprefix_cache_hits / Δprefix_cache_queries from "
             "their leases (tokens, vLLM's own count); router = Δoverlap-blocks / Δprompt-blocks (kv mode only: "
             "round-robin never consults the index); `usage` = cached_tokens / prompt_tokens the server reported",
             ""]
    for load in dict.fromkeys(p.load for p in points):
        rr = next(p for p in points if p.load == load and p.mode == MODES[0])
        kv = next(p for p in points if p.load == load and p.mode == MODES[1])
        lines += [f"## {load}", ""]
        lines += table(["", MODES[0], MODES[1], "kv / round-robin"], comparison_rows(rr, kv))
        turns = sorted(set(rr.by_turn) | set(kv.by_turn))
        lines += [f"Cached share of the prompt by conversation turn (`usage`), {load}:", ""]
        lines += table(["turn", "prompt tok / request", MODES[0], MODES[1]],
                       [[str(t), _per_request(rr, t), _pct(_share(rr, t)), _pct(_share(kv, t))] for t in turns])
    lines += ["The harness's own tables and CDF plots for both modes are in [harness/report.md](harness/report.md).",
              ""]
    return "\n".join(lines)
