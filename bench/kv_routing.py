"""KV-aware routing against round-robin, on the same workload: `python -m bench kv-routing`.

configs/agg_router.yaml (two decode workers and a router task) is started twice, once per router
mode, on a fresh Redis database each time, so both start with cold caches. Each gets the same
unrecorded warm-up, then the harness's multiturn workload (conversations over K shared system
prompts) at each concurrency, with the same seed. Around each load point the scenario reads

- the engines' own prefix-cache counters from the decode workers' leases (after minus before,
  summed over the workers): the hit rate that decides how much prefill is skipped;
- the router's counters (llmq:router:overlap-blocks / prompt-blocks), which only the kv mode keeps;
- the harness's TTFT, ITL, E2E, throughput and the cached tokens the server reported in `usage`;
- the router's own log lines ("routed to W"): how many requests each worker took.

The engines run the benchmark model (bench-llama, whose prefill costs what a real model's does
relative to a decode step) with a KV cache sized on purpose in blocks (`--kv-cache-blocks`), so
that the workload's working set, computed from the requests sent (bench/kv_oracle.py), is about
1.5x one engine's cache and under two: round-robin then makes every engine hold all of it, and kv
routing can split it. Each point's prefix hit rate is set against an oracle's, simulated on the
same requests in the order they were sent (bench/kv_oracle.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.cache_stats import CacheCounters, RouterCounters, engine_deltas, fresh_leases, read_router_counters, total
from bench.deploy import ROOT, LauncherDeployment
from bench.flags import help_text
from bench.kv_oracle import Blocks, Request, WorkingSet, pinned, round_robin, simulate
from bench.records import LoadMode, LoadPoint
from bench.runner import RunOptions, RunResult
from bench.scenario import MachineState, Workload, fmt, measure, merge, table, write_harness_folder, write_json
from bench.stats import Summary, summarize
from bench.workloads import Session, WorkloadKind, WorkloadParams, build_workload

logger = logging.getLogger(__name__)

CONFIG = "configs/agg_router.yaml"
MODES = ("round-robin", "kv")  # the first is the baseline
NUM_DECODE = 2
WARMUP_SEED_OFFSET = 1000
# router/runtime.py's line for each decision: "[request id] routed to WORKER (MODE): overlap A/B blocks"
ROUTED = re.compile(r"\] routed to (\S+) \(([\w-]+)\): overlap (\d+)/(\d+) blocks")


@dataclass(frozen=True)
class KvRoutingSpec:
    """The scenario's knobs; `python -m bench kv-routing`'s flags are generated from these."""

    concurrency: str = field(default="2,4,8", metadata=help_text("closed-loop concurrencies (conversations in flight)"))
    num_requests: int = field(default=128, metadata=help_text("requests (turns) per mode and load point"))
    turns_per_session: int = field(default=4, metadata=help_text("turns per conversation"))
    num_system_prompts: int = field(default=8, metadata=help_text("distinct shared system prompts (K)"))
    system_prompt_words: int = field(default=512, metadata=help_text("system prompt length, words (~2.1 tokens each)"))
    user_turn_words: int = field(default=24, metadata=help_text("user message length in words"))
    output_len: int = field(default=24, metadata=help_text("max_tokens of every answer (ignore_eos)"))
    hot_prefix_share: float = field(default=0.0, metadata=help_text(
        "share of the conversations over one system prompt (0.5: the skewed workload; 0: each in turn)"))
    kv_cache_blocks: int = field(default=180, metadata=help_text(
        "each engine's KV cache in blocks (sets engine.kv_cache_gib from the model's KV bytes per block)"))
    dtype: str = field(default="float32", metadata=help_text(
        "engine.dtype: float32, because a CPU without AVX-512 runs bfloat16 matmuls many times slower"))
    modes: str = field(default=",".join(MODES), metadata=help_text("router modes to run, in order"))
    overlap_weight: float = field(default=0.0, metadata=help_text(
        "router.overlap_weight of the kv mode (0: the config's)"))
    balance_weight: float = field(default=-1.0, metadata=help_text(
        "router.balance_weight of the kv mode (negative: the config's; 0: no balance term)"))
    model_name: str = field(default="bench-llama", metadata=help_text("model.name of the deployment"))
    model_path: str = field(default="", metadata=help_text(
        "model.path (empty: MODEL_NAME in the model cache; build it with scripts/build_tiny_model.py --size bench)"))
    seed: int = field(default=0, metadata=help_text("load point i uses seed + i, in both modes"))
    redis_db: int = field(default=4, metadata=help_text("Redis database (1-5), flushed before each start"))
    request_timeout_s: float = field(default=120.0, metadata=help_text("bound on each request"))
    point_deadline_s: float = field(default=300.0, metadata=help_text("bound on each load point"))

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.concurrency.split(",") if c.strip())

    @property
    def mode_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.modes.split(",") if m.strip())

    @property
    def params(self) -> WorkloadParams:
        return WorkloadParams(output_len_mean=self.output_len, output_len_std=0.0,
                              turns_per_session=self.turns_per_session, num_system_prompts=self.num_system_prompts,
                              system_prompt_words=self.system_prompt_words, user_turn_words=self.user_turn_words,
                              hot_prefix_share=self.hot_prefix_share)

    @property
    def resolved_model_path(self) -> Path:
        from config import default_model_cache

        return Path(self.model_path).expanduser() if self.model_path else default_model_cache() / self.model_name

    def workload(self, concurrency: int, seed: int, num_requests: int | None = None) -> Workload:
        options = RunOptions(num_requests=num_requests or self.num_requests, seed=seed,
                             request_timeout_s=self.request_timeout_s, deadline_s=self.point_deadline_s,
                             warmup_sessions=0)
        return Workload(WorkloadKind.MULTITURN, self.params, (concurrency,), options)

    def sessions(self, seed: int) -> list[Session]:
        """The conversations of the load point run with `seed`: the harness's first (and only)
        point of a run builds variant 1 (bench/runner.py)."""
        return build_workload(WorkloadKind.MULTITURN, self.params, self.num_requests, seed, variant=1)


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def kv_block_bytes(model_dir: Path, block_size: int, dtype_bytes: int = 2) -> int:
    """KV bytes of one block: keys and values of every layer's KV heads, bf16 by default."""
    c = json.loads((model_dir / "config.json").read_text())
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", heads) * head_dim * block_size * dtype_bytes


def cpu_label() -> str:
    """The CPU's model name and whether it has AVX-512, which decides how fast bfloat16 runs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {'with' if 'avx512f' in text else 'no'} AVX-512"


def kv_cache_gib(num_blocks: int, block_bytes: int) -> float:
    return num_blocks * block_bytes / 2**30


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


@dataclass(frozen=True)
class OracleFigures:
    """What bench/kv_oracle.py makes of one mode's requests at one point, in the order they were
    sent: the oracle's hit rate, round-robin's in the same simulation (a check of the simulation
    against the engines' own count), and the working set against one engine's cache."""

    oracle_hit_rate: float | None
    simulated_round_robin_hit_rate: float | None
    working_set: WorkingSet
    capacity_blocks: int
    oracle_requests_per_worker: list[int]

    @property
    def working_set_ratio(self) -> float | None:
        return self.working_set.mean_blocks / self.capacity_blocks if self.capacity_blocks else None


def oracle_figures(records, sessions: list[Session], shared_tokens: dict[str, int], block_size: int,
                   capacity_blocks: int) -> OracleFigures:
    """`shared_tokens`: per system prompt's text, the prompt tokens every conversation over it shares."""
    prefix_ids = {text: i for i, text in enumerate(dict.fromkeys(s.system_text for s in sessions))}
    prefix_of = {s.session_id: prefix_ids[s.system_text] for s in sessions}
    sent = sorted((r for r in records if r.ok and r.prompt_tokens and r.start_s is not None), key=lambda r: r.start_s)
    requests = [Request(r.session_id, prefix_of[r.session_id], r.prompt_tokens) for r in sent]
    blocks = Blocks(block_size, {prefix_ids[text]: n for text, n in shared_tokens.items() if text in prefix_ids})
    oracle = simulate(requests, blocks, NUM_DECODE, capacity_blocks, pinned(NUM_DECODE))
    rr = simulate(requests, blocks, NUM_DECODE, capacity_blocks, round_robin(NUM_DECODE))
    return OracleFigures(oracle.hit_rate, rr.hit_rate, WorkingSet.of(requests, blocks), capacity_blocks,
                         oracle.requests_per_worker)


def shared_prefix_tokens(root_url: str, model: str, system_texts: list[str]) -> dict[str, int]:
    """Per system prompt, the tokens of the rendered chat prompt that do not depend on the user's
    message: the longest common prefix of two renderings, from the server's own /tokenize."""
    def ids(system: str, user: str) -> list[int]:
        body = json.dumps({"model": model, "messages": [{"role": "system", "content": system},
                                                         {"role": "user", "content": user}]}).encode()
        request = urllib.request.Request(root_url + "/tokenize", body, {"Content-Type": "application/json",
                                                                        "Authorization": "Bearer none"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())["tokens"]

    shared = {}
    for text in dict.fromkeys(system_texts):
        a, b = ids(text, "river"), ids(text, "stone")
        shared[text] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return shared


def routed_per_worker(log_text: str, mode: str) -> dict[str, int]:
    """Requests each worker took, from the router's log lines."""
    return dict(Counter(m.group(1) for m in ROUTED.finditer(log_text) if m.group(2) == mode))


def spread(values: list[int]) -> float | None:
    """max / min over the workers: 1.0 is an even split; None when a worker had none."""
    return max(values) / min(values) if values and min(values) > 0 else None


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
    routed: dict[str, int] = field(default_factory=dict)  # requests per worker, from the router's log
    oracle: OracleFigures | None = None

    @property
    def engine_total(self) -> CacheCounters:
        return total(self.engine)

    @property
    def client_cached_share(self) -> float | None:
        s = self.summary
        return s.cached_tokens / s.prompt_tokens if s.prompt_tokens else None

    @property
    def sustained(self) -> bool:
        return self.summary.num_ok == self.summary.num_requests

    @property
    def hit_vs_oracle(self) -> float | None:
        hit, best = self.engine_total.hit_rate, self.oracle.oracle_hit_rate if self.oracle else None
        return hit / best if hit is not None and best else None

    @property
    def requests_per_worker(self) -> list[int]:
        return [self.routed.get(w, 0) for w in sorted(self.engine)] if self.engine else sorted(self.routed.values())

    @property
    def prefill_tokens_per_worker(self) -> list[int]:
        """Prompt tokens each engine computed: queried less hit."""
        return [c.queries - c.hits for _, c in sorted(self.engine.items())]

    def to_json(self) -> dict:
        return {"mode": self.mode, "load": self.load, "seed": self.seed, "machine": asdict(self.machine),
                "engine_per_worker": {w: {**asdict(c), "hit_rate": c.hit_rate} for w, c in self.engine.items()},
                "engine_total": {**asdict(self.engine_total), "hit_rate": self.engine_total.hit_rate},
                "router": {**asdict(self.router), "hit_rate": self.router.hit_rate},
                "client_cached_share": self.client_cached_share,
                "by_turn": {str(t): {**asdict(share), "cached_share": share.cached_share}
                            for t, share in self.by_turn.items()},
                "routed_per_worker": self.routed,
                "oracle": None if self.oracle is None else {**asdict(self.oracle),
                                                            "working_set_ratio": self.oracle.working_set_ratio},
                "hit_vs_oracle": self.hit_vs_oracle,
                "summary": asdict(self.summary)}


@dataclass(frozen=True)
class Setup:
    """What every mode's deployment shares: its settings, and the cache size they make."""

    sets: dict[str, str]
    block_size: int
    block_bytes: int
    requested_blocks: int


def setup(spec: KvRoutingSpec) -> Setup:
    from config import load_settings

    model_dir = spec.resolved_model_path
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no model; build it with scripts/build_tiny_model.py --size bench")
    block_size = load_settings(ROOT / CONFIG, [], environ={}).engine.block_size
    block_bytes = kv_block_bytes(model_dir, block_size, DTYPE_BYTES[spec.dtype])
    sets = {"model.name": spec.model_name, "model.path": str(model_dir), "engine.dtype": spec.dtype,
            "engine.kv_cache_gib": repr(kv_cache_gib(spec.kv_cache_blocks, block_bytes))}
    if spec.overlap_weight > 0:
        sets["router.overlap_weight"] = repr(spec.overlap_weight)
    if spec.balance_weight >= 0:
        sets["router.balance_weight"] = repr(spec.balance_weight)
    return Setup(sets, block_size, block_bytes, spec.kv_cache_blocks)


def run(spec: KvRoutingSpec, out: Path) -> Path:
    started = MachineState.now()
    logger.info("kv-routing: load average %s", started.label)
    common = setup(spec)
    points, runs, blocks_total = [], [], {}
    for mode in spec.mode_list:
        mode_points, mode_runs, blocks_total[mode] = run_mode(mode, spec, common, out)
        points += mode_points
        runs.append(_join_points(mode_runs))
    finished = MachineState.now()
    modes = spec.mode_list
    write_harness_folder(merge(runs, baseline=modes[0] if len(modes) > 1 else None), out / "harness")
    body = {"scenario": "kv-routing", "config": CONFIG, "spec": asdict(spec), "sets": common.sets,
            "kv_blocks_total": blocks_total, "machine_start": asdict(started), "machine_end": asdict(finished),
            "points": [p.to_json() for p in points], "goals": goals(points, modes)}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, common, blocks_total, points, started, finished))
    return path


def run_mode(mode: str, spec: KvRoutingSpec, common: Setup, out: Path) -> tuple[list[PointResult], list[RunResult],
                                                                               int]:
    points, runs = [], []
    with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, sets={**common.sets, "router.mode": mode},
                            name=f"agg_router-{mode}") as dep:
        client = dep.redis
        leases = fresh_leases(client, NUM_DECODE, since_unix=0, timeout_s=180)
        capacity = min(w.kv_blocks_total for w in leases)
        logger.info("[%s] KV cache per engine: %s blocks (asked for %d)", mode,
                    sorted(w.kv_blocks_total for w in leases), common.requested_blocks)
        warm = spec.workload(2, spec.seed + WARMUP_SEED_OFFSET, num_requests=2 * spec.turns_per_session)
        measure(warm, mode, dep.base_url, spec.model_name)  # unrecorded: connections, first-use costs
        root_url = dep.base_url.removesuffix("/v1")
        assert dep.process is not None
        log_path = dep.process.log_path
        for i, concurrency in enumerate(spec.concurrencies):
            workload = spec.workload(concurrency, spec.seed + i)
            sessions = spec.sessions(spec.seed + i)
            shared = shared_prefix_tokens(root_url, spec.model_name, [s.system_text for s in sessions])
            before = fresh_leases(client, NUM_DECODE, since_unix=time.time())
            router_before = read_router_counters(client)
            log_offset = log_path.stat().st_size
            machine = MachineState.now()
            logger.info("[%s c=%d] load average %s", mode, concurrency, machine.label)
            result = measure(workload, mode, dep.base_url, spec.model_name)
            time.sleep(0.5)  # the engines' last steps reach their stat loggers
            after = fresh_leases(client, NUM_DECODE, since_unix=time.time())
            with log_path.open("rb") as f:
                f.seek(log_offset)
                point_log = f.read().decode(errors="replace")
            routed = routed_per_worker(point_log, mode)
            # The router's decisions, each with every candidate's cost: the deployment's log is
            # trimmed when it stops, and these are what explain a split between the workers.
            (out / f"routing-{mode}-c{concurrency}.log").write_text(
                "".join(line + "\n" for line in point_log.splitlines() if "] routed to " in line))
            point = LoadPoint(LoadMode.CLOSED, concurrency)
            summary = summarize(mode, point, result.records, None)
            points.append(PointResult(mode, point.label, workload.options.seed, machine, engine_deltas(before, after),
                                      read_router_counters(client) - router_before, summary,
                                      hit_rate_by_turn(result.records), routed,
                                      oracle_figures(result.records, sessions, shared, common.block_size, capacity)))
            runs.append(result)
    return points, runs, capacity


def _join_points(runs: list[RunResult]) -> RunResult:
    """One target's single-point runs as one run over all its load points."""
    values = tuple(v for r in runs for v in r.config.load_values)
    config = replace(runs[0].config, load_values=values)
    return RunResult(config, [rec for r in runs for rec in r.records], runs[0].started_at, sum(r.wall_s for r in runs))


# -- the goals (issue 14, item 2) -----------------------------------------------------------

TTFT_GOAL = 3.0  # round-robin's TTFT p50 / kv's, at the busiest point both sustain
ORACLE_GOAL = 0.9  # kv's engine hit rate / the oracle's
SPREAD_GOAL = 1.5  # the busier worker's load / the other's, kv mode


def busiest_sustained(points: list[PointResult], baseline: str, mode: str) -> tuple[PointResult, PointResult] | None:
    """The highest load at which both modes answered every request."""
    pairs = []
    for load in dict.fromkeys(p.load for p in points):
        a = next((p for p in points if p.load == load and p.mode == baseline), None)
        b = next((p for p in points if p.load == load and p.mode == mode), None)
        if a and b and a.sustained and b.sustained:
            pairs.append((a, b))
    return max(pairs, key=lambda pair: pair[0].summary.load_value, default=None)


def goals(points: list[PointResult], modes: tuple[str, ...]) -> dict:
    kv = [p for p in points if p.mode == "kv"]
    body: dict = {"hit_vs_oracle": {p.load: p.hit_vs_oracle for p in kv},
                  "requests_spread": {p.load: spread(p.requests_per_worker) for p in kv},
                  "prefill_tokens_spread": {p.load: spread(p.prefill_tokens_per_worker) for p in kv}}
    if "round-robin" in modes and "kv" in modes:
        pair = busiest_sustained(points, "round-robin", "kv")
        if pair:
            rr, k = pair
            a, b = rr.summary.ttft_ms.p50, k.summary.ttft_ms.p50
            body["ttft_p50_rr_over_kv"] = {"load": rr.load, "ratio": a / b if a and b else None}
    return body


# -- report.md ------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _ratio(ours: float | None, base: float | None) -> str:
    return "–" if ours is None or not base else f"{ours / base:.2f}x"


def _split(values: list[int]) -> str:
    return " / ".join(f"{v:,}" for v in values)


def comparison_rows(modes: list[PointResult]) -> list[list[str]]:
    """One column per mode; with two, a last column of the second over the first."""
    def row(name, get, show, ratio=True):
        values = [get(p) for p in modes]
        extra = [_ratio(values[1], values[0]) if ratio else ""] if len(modes) == 2 else []
        return [name, *(show(v) for v in values), *extra]

    s = lambda p: p.summary  # noqa: E731
    ms = lambda v: fmt(v)  # noqa: E731
    o = lambda p, get: get(p.oracle) if p.oracle else None  # noqa: E731
    return [
        row("engine prefix-cache hit rate (tokens)", lambda p: p.engine_total.hit_rate, _pct),
        row("oracle's hit rate on these requests (simulated)", lambda p: o(p, lambda x: x.oracle_hit_rate), _pct),
        row("engine hit rate / oracle's", lambda p: p.hit_vs_oracle, lambda v: fmt(v, 2), ratio=False),
        row("round-robin's hit rate on these requests (simulated)",
            lambda p: o(p, lambda x: x.simulated_round_robin_hit_rate), _pct),
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
        row("requests per worker (router's log)", lambda p: _split(p.requests_per_worker), str, ratio=False),
        row("prompt tokens computed per worker (engine: queried - hit)",
            lambda p: _split(p.prefill_tokens_per_worker), str, ratio=False),
        row("working set, blocks: mean / peak (of which system prompts)",
            lambda p: "–" if not p.oracle else f"{p.oracle.working_set.mean_blocks:.0f} / "
            f"{p.oracle.working_set.peak_blocks} ({p.oracle.working_set.shared_blocks})", str, ratio=False),
        row("mean working set / one engine's cache",
            lambda p: o(p, lambda x: x.working_set_ratio), lambda v: fmt(v, 2), ratio=False),
        row("load average (1/5/15 min) at start", lambda p: p.machine.label, str, ratio=False),
    ]


def _share(p: PointResult, turn: int) -> float | None:
    return p.by_turn[turn].cached_share if turn in p.by_turn else None


def _per_request(p: PointResult, turn: int) -> str:
    return fmt(p.by_turn[turn].prompt_tokens_per_request, 0) if turn in p.by_turn else "–"


def _met(value: float | None, ok: bool) -> str:
    return "–" if value is None else f"{value:.2f} ({'met' if ok else 'missed'})"


def goal_lines(points: list[PointResult], modes: tuple[str, ...]) -> list[str]:
    g = goals(points, modes)
    lines = ["## Goals (issue 14, item 2)", ""]
    if "ttft_p50_rr_over_kv" in g:
        t = g["ttft_p50_rr_over_kv"]
        ok = t["ratio"] is not None and t["ratio"] >= TTFT_GOAL
        lines.append(f"- TTFT p50, round-robin / kv, at the busiest point both sustained ({t['load']}): "
                     f"{_met(t['ratio'], ok)}; goal ≥ {TTFT_GOAL:g}")
    elif len(modes) > 1:
        lines.append("- TTFT p50: no load point that both modes sustained (every request ok)")
    for key, name, goal, above in (("hit_vs_oracle", "kv's engine hit rate / the oracle's", ORACLE_GOAL, True),
                                   ("requests_spread", "kv: requests, busier worker / the other", SPREAD_GOAL, False),
                                   ("prefill_tokens_spread", "kv: prompt tokens computed, busier worker / the other",
                                    SPREAD_GOAL, False)):
        parts = [f"{load} {_met(v, v is not None and (v >= goal if above else v <= goal))}"
                 for load, v in g[key].items()]
        if parts:
            lines.append(f"- {name} (goal {'≥' if above else '≤'} {goal:g}): " + "; ".join(parts))
    return lines + [""]


def markdown(spec: KvRoutingSpec, common: Setup, blocks_total: dict[str, int], points: list[PointResult],
             started: MachineState, finished: MachineState) -> str:
    modes = spec.mode_list
    hot = (f"conversation i over system prompt i mod {spec.num_system_prompts}" if spec.hot_prefix_share <= 0 else
           f"{100 * spec.hot_prefix_share:.0f}% of the conversations over one system prompt, the rest over the "
           f"other {spec.num_system_prompts - 1} in turn")
    lines = ["# KV-aware routing against round-robin", "",
             f"- {CONFIG}: {NUM_DECODE} decode workers (one vLLM engine each, each bound to its own core) "
             "and one router task; each mode on a freshly started deployment (cold caches); modes "
             + ", ".join(modes),
             f"- model {spec.model_name} ({spec.resolved_model_path}); KV cache per engine: asked for "
             f"{common.requested_blocks} blocks of {common.block_size} tokens ({common.block_bytes:,} bytes each, "
             f"engine.kv_cache_gib={common.sets['engine.kv_cache_gib']}); the engines reported "
             + ", ".join(f"{n} ({m})" for m, n in blocks_total.items()),
             f"- router.overlap_weight {common.sets.get('router.overlap_weight', 'as in ' + CONFIG)}, "
             f"router.balance_weight {common.sets.get('router.balance_weight', 'as in ' + CONFIG)}",
             f"- started {started.at}; load average (1/5/15 min) {started.label} at the start, "
             f"{finished.label} at the end; {started.num_cpus} CPUs ({cpu_label()}); engine.dtype {spec.dtype}",
             f"- workload: multiturn, {spec.num_requests} turns per load point in conversations of "
             f"{spec.turns_per_session} turns over {spec.num_system_prompts} shared system prompts of "
             f"{spec.system_prompt_words} words ({hot}), user turns of {spec.user_turn_words} words, "
             f"{spec.output_len} output tokens each; closed loop; load point i uses seed {spec.seed} + i in every mode",
             "- hit rates: engine = sum over decode workers of Δprefix_cache_hits / Δprefix_cache_queries from "
             "their leases (tokens, vLLM's own count); router = Δoverlap-blocks / Δprompt-blocks (kv mode only: "
             "round-robin never consults the index); `usage` = cached_tokens / prompt_tokens the server reported",
             "- oracle (bench/kv_oracle.py): the same requests in the order sent, each engine an LRU of its cache's "
             "blocks, each conversation on the worker that first saw its system prompt (new system prompts to the "
             "worker with fewer); answers' blocks not counted. Working set: blocks used before and again later, "
             "after each request, mean and peak",
             ""]
    lines += goal_lines(points, modes)
    for load in dict.fromkeys(p.load for p in points):
        at = [p for m in modes for p in points if p.load == load and p.mode == m]
        lines += [f"## {load}", ""]
        header = ["", *(p.mode for p in at)] + ([f"{at[1].mode} / {at[0].mode}"] if len(at) == 2 else [])
        lines += table(header, comparison_rows(at))
        turns = sorted(set().union(*(p.by_turn for p in at)))
        lines += [f"Cached share of the prompt by conversation turn (`usage`), {load}:", ""]
        lines += table(["turn", "prompt tok / request", *(p.mode for p in at)],
                       [[str(t), _per_request(at[0], t), *(_pct(_share(p, t)) for p in at)] for t in turns])
    lines += ["The harness's own tables and CDF plots for every mode are in [harness/report.md](harness/report.md).",
              ""]
    return "\n".join(lines)
