"""Our deployments against vLLM's own server, on one workload: `python -m bench vs-vllm`.

Three servers on the same tiny model and engine arguments (configs/agg.yaml's engine section;
vLLM gets them as flags through bench.deploy.vllm_server_args):

- `agg`: configs/agg.yaml, one decode worker, so one engine, as vLLM has;
- `vllm`: `python -m vllm.entrypoints.openai.api_server`, the baseline;
- `vllm_placed`: the same server with its scheduler process placed as our workers place theirs
  (engine.scheduler_nice and engine.scheduler_on_runner_cores, placement.py): what vLLM's
  own server makes with the one engine setting we add, so that the ratio against `vllm` is not
  read as our stack beating vLLM's;
- `agg_router`: configs/agg_router.yaml, two decode workers and the kv router. It has two
  engines, each bound to its own core, so it is not a like-for-like comparison; it is shown
  beside the others for what the second engine buys on 2 cores;
- `agg_celery`: `agg` publishing its tasks through Celery's send_task (frontend.publish: celery,
  app/publish.py), for the A/B of that step in the same run;
- `agg_close`: `agg` closing every connection after its answer (frontend.keepalive_s: 0), for the
  A/B of HTTP keep-alive;
- `agg_free`: `agg` with its engine's scheduler free to run on any core, as stock vLLM's is
  (engine.scheduler_on_runner_cores: false);
- `agg_pinned`: `agg` with its engine's scheduler pinned to the runner's core at every load
  (engine.scheduler_free_max_requests: 0), for the A/B of freeing it at one request;
- `agg_nice0`: `agg` with its engine at the launcher's own priority (workers.nice: 0, the
  default), for runs whose baseline sets another;
- `agg_nicem5`, `agg_nicem10`: `agg` with its engine at niceness -5 or -10 (workers.nice below 0
  needs CAP_SYS_NICE);
- `agg_nobacklog`: `agg` with as many task threads as engine sequences (workers.concurrency set
  to engine.max_num_seqs), so its engine holds no queue of its own, for the A/B of that default.

Each server runs alone (the others stopped), one after another, with the same seed and load
points, and the harness's comparison with the baseline is computed over the merged records.
The headline targets (issue 14): output tokens/s at saturation >= 0.95x vLLM's, and at one
stream TTFT p50 <= +5 ms and ITL p50 <= +0.5 ms.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import report as harness_report
from bench.deploy import ROOT, LauncherDeployment, VllmServer
from bench.flags import help_text
from bench.runner import RunOptions, RunResult
from bench.scenario import MachineState, Workload, fmt, measure, merge, table, write_harness_folder, write_json
from bench.stats import Headline, median
from bench.workloads import WorkloadKind, WorkloadParams

logger = logging.getLogger(__name__)

BASELINE = "vllm"
PLACED_BASELINE = "vllm_placed"
ENGINE_CONFIG = "configs/agg.yaml"  # vLLM's flags come from this config's engine section
TARGETS = {  # label -> launcher config; the baseline has none
    "agg": "configs/agg.yaml",
    BASELINE: None,
    PLACED_BASELINE: None,
    "agg_router": "configs/agg_router.yaml",
    "agg_celery": "configs/agg.yaml",
    "agg_close": "configs/agg.yaml",
    "agg_free": "configs/agg.yaml",
    "agg_pinned": "configs/agg.yaml",
    "agg_nice0": "configs/agg.yaml",
    "agg_nobacklog": "configs/agg.yaml",
    "agg_nicem5": "configs/agg.yaml",
    "agg_nicem10": "configs/agg.yaml",
}
# A target's settings on top of its config (the launcher's --set).
TARGET_SETS = {"agg_celery": {"frontend.publish": "celery"}, "agg_close": {"frontend.keepalive_s": "0"},
               "agg_free": {"engine.scheduler_on_runner_cores": "false"},
               "agg_pinned": {"engine.scheduler_free_max_requests": "0"},
               "agg_nice0": {"workers.nice": "0"}, "agg_nicem5": {"workers.nice": "-5"},
               "agg_nicem10": {"workers.nice": "-10"}}


@dataclass(frozen=True)
class PassMarks:
    """The pass marks for the headline numbers."""

    min_throughput_ratio: float = 0.95
    max_ttft_p50_diff_ms: float = 5.0
    max_itl_p50_diff_ms: float = 0.5


@dataclass(frozen=True)
class VsVllmSpec:
    """The scenario's knobs; `python -m bench vs-vllm`'s flags are generated from these."""

    concurrency: str = field(default="1,32",
                             metadata=help_text("closed-loop concurrencies: low load first, then saturation"))
    num_requests: int = field(default=64, metadata=help_text("requests per server and load point"))
    input_len: int = field(default=100, metadata=help_text("prompt length, tokens (exact)"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    seed: int = field(default=0, metadata=help_text("workload seed, the same for every server"))
    servers: str = field(default="agg,vllm,agg_router", metadata=help_text("which servers, in the order they run"))
    redis_db: int = field(default=5, metadata=help_text("Redis database (1-5) for our deployments, flushed per start"))
    # 32 at once: the first burst after a start is a one-time cost that differs between servers
    # (`python -m bench first-burst` measures it). Every server gets the same warm-up, so the
    # figures are steady state.
    warmup_sessions: int = field(default=32, metadata=help_text(
        "unrecorded requests per server, sent at once before the first load point"))
    deadline_s: float = field(default=600.0, metadata=help_text("bound on each server's run"))
    rounds: int = field(default=1, metadata=help_text(
        "repeat every server this many times, reversing their order each round; with more than one, "
        "each round gets its own folder and the report gives every round's headline and the median"))

    @property
    def server_labels(self) -> list[str]:
        labels = [s.strip() for s in self.servers.split(",") if s.strip()]
        unknown = set(labels) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown servers {sorted(unknown)}; choose from {list(TARGETS)}")
        return labels

    def workload(self) -> Workload:
        params = WorkloadParams(input_len_mean=self.input_len, input_len_std=0.0, output_len_mean=self.output_len,
                                output_len_std=0.0)
        options = RunOptions(num_requests=self.num_requests, seed=self.seed, deadline_s=self.deadline_s,
                             warmup_sessions=self.warmup_sessions)
        return Workload(WorkloadKind.SYNTHETIC, params, tuple(int(c) for c in self.concurrency.split(",")), options)


@dataclass(frozen=True)
class Verdict:
    """One headline number against its pass mark."""

    name: str
    value: float | None
    mark: str
    met: bool | None


def _diff_ms(ratio: float | None, baseline_ms: float | None) -> float | None:
    return None if ratio is None or baseline_ms is None else (ratio - 1) * baseline_ms


def verdicts(head: Headline, baseline_itl_p50_ms: float | None, baseline_tpot_p50_ms: float | None = None,
             marks: PassMarks = PassMarks()) -> list[Verdict]:
    """The three headline checks of one target against the baseline; `met` is None when a
    figure is missing. ITL's mark is absolute (+0.5 ms), so it needs the baseline's ITL p50.

    TPOT (a request's mean time per token after the first) is checked against the same mark as
    well: a server that sends tokens in bursts has an ITL p50 near zero that says little, while
    its TPOT still counts every token."""
    itl_diff = _diff_ms(head.itl_p50_ratio, baseline_itl_p50_ms)
    tpot_diff = _diff_ms(head.tpot_p50_ratio, baseline_tpot_p50_ms)

    def check(value, ok):
        return None if value is None else ok(value)

    # One stream at a time saturates nothing: a run at c=1 alone gets no throughput verdict.
    saturated = head.saturation_load != "c=1"
    return [
        Verdict("throughput at saturation, ours / vLLM", head.throughput_ratio,
                f">= {marks.min_throughput_ratio}x" if saturated else "(needs a load above c=1)",
                check(head.throughput_ratio, lambda v: v >= marks.min_throughput_ratio) if saturated else None),
        Verdict(f"TTFT p50 at {head.low_load}, ours - vLLM (ms)", head.ttft_p50_diff_ms,
                f"<= +{marks.max_ttft_p50_diff_ms:g} ms", check(head.ttft_p50_diff_ms,
                                                               lambda v: v <= marks.max_ttft_p50_diff_ms)),
        Verdict(f"ITL p50 at {head.low_load}, ours / vLLM", head.itl_p50_ratio, "", None),
        Verdict(f"ITL p50 at {head.low_load}, ours - vLLM (ms)", itl_diff, f"<= +{marks.max_itl_p50_diff_ms:g} ms",
                check(itl_diff, lambda v: v <= marks.max_itl_p50_diff_ms)),
        Verdict(f"TPOT p50 at {head.low_load}, ours - vLLM (ms)", tpot_diff, f"<= +{marks.max_itl_p50_diff_ms:g} ms",
                check(tpot_diff, lambda v: v <= marks.max_itl_p50_diff_ms)),
    ]


def run(spec: VsVllmSpec, out: Path, model: str = "tiny-llama") -> Path:
    if spec.rounds <= 1:
        _run_round(spec, out, model)
        return out / "report.md"
    # On a shared machine one pair of runs can be off by a large factor either way: rounds,
    # alternating which server goes first, give the ratio a spread and a median.
    rounds = []
    for i in range(spec.rounds):
        labels = spec.server_labels if i % 2 == 0 else spec.server_labels[::-1]
        round_spec = replace(spec, rounds=1, servers=",".join(labels))
        rounds.append(_run_round(round_spec, out / f"round-{i + 1}", model))
    body = {"scenario": "vs-vllm", "spec": asdict(spec), "targets": asdict(PassMarks()),
            "rounds": [{"servers": r["spec"]["servers"], "machine_start": r["machine_start"],
                        "verdicts": r["verdicts"]} for r in rounds],
            "medians": round_medians(rounds)}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(rounds_markdown(spec, body))
    return path


def round_medians(rounds: list[dict]) -> dict[str, dict[str, float | None]]:
    """Per target, per headline name: the median of the rounds' values (None where none had it)."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        for target, verdicts_ in r["verdicts"].items():
            for v in verdicts_:
                values.setdefault(target, {}).setdefault(v["name"], []).append(v["value"])
    return {t: {name: median(vs) for name, vs in by_name.items()} for t, by_name in values.items()}


def rounds_markdown(spec: VsVllmSpec, body: dict) -> str:
    lines = ["# Our deployments against vLLM's own server, in rounds", "",
             f"- {spec.rounds} rounds; each ran every server alone, in the order given below; workload: "
             f"synthetic {spec.input_len} in / {spec.output_len} out (ignore_eos), {spec.num_requests} requests "
             f"per load point, closed loop at concurrency {spec.concurrency}, seed {spec.seed}",
             "- each round's full report, logs and plots: `round-N/report.md`", ""]
    for target, medians in body["medians"].items():
        lines += [f"## `{target}` against `{BASELINE}`", ""]
        names = list(medians)
        marks = {v["name"]: v["mark"] for v in body["rounds"][0]["verdicts"][target]}
        rows = []
        for i, r in enumerate(body["rounds"]):
            by_name = {v["name"]: v for v in r["verdicts"][target]}
            rows.append([f"round {i + 1} ({r['servers']}; load {r['machine_start']['load_1m']:.1f})"]
                        + [fmt(by_name[n]["value"], 2) for n in names])
        rows.append(["**median**"] + [f"**{fmt(medians[n], 2)}**" for n in names])
        rows.append(["target"] + [marks[n] for n in names])
        lines += table(["round"] + names, rows, align="l" + "r" * len(names))
    return "\n".join(lines)


def _run_round(spec: VsVllmSpec, out: Path, model: str) -> dict:
    """Every server once, in the spec's order; writes results.json and report.md into `out` and
    returns what results.json holds."""
    started = MachineState.now()
    workload = spec.workload()
    runs, machines = [], {}
    for label in spec.server_labels:
        machines[label] = MachineState.now()
        logger.info("[%s] load average %s", label, machines[label].label)
        runs.append(_measure_one(label, workload, spec, out, model))
    finished = MachineState.now()
    merged = merge(runs, baseline=BASELINE if BASELINE in spec.server_labels else None)
    write_harness_folder(merged, out / "harness")
    analysis = harness_report.analyse(merged)
    base_itl, base_tpot = _low_load_p50s(analysis.summaries, BASELINE)
    checks = {h.target: verdicts(h, base_itl, base_tpot) for h in analysis.headlines}
    body = {"scenario": "vs-vllm", "spec": asdict(spec), "targets": asdict(PassMarks()),
            "machine_start": asdict(started), "machine_end": asdict(finished),
            "machine_per_server": {k: asdict(v) for k, v in machines.items()},
            "headlines": [asdict(h) for h in analysis.headlines],
            "verdicts": {t: [asdict(v) for v in vs] for t, vs in checks.items()},
            "summaries": [asdict(s) for s in analysis.summaries]}
    write_json(out / "results.json", body)
    (out / "report.md").write_text(markdown(spec, analysis, checks, started, finished, machines))
    return body


def _measure_one(label: str, workload: Workload, spec: VsVllmSpec, out: Path, model: str) -> RunResult:
    config = TARGETS[label]
    if config is None:
        server = VllmServer(ENGINE_CONFIG, out / "logs", name=label, place_scheduler=label == PLACED_BASELINE)
    else:
        sets = TARGET_SETS.get(label, {})
        if label == "agg_nobacklog":
            from config import load_settings

            sets = {"workers.concurrency": str(load_settings(ROOT / config, environ={}).engine.max_num_seqs)}
        server = LauncherDeployment(config, out / "logs", spec.redis_db, sets=sets, name=label)
    with server:
        return measure(workload, label, server.base_url, model)


def _low_load_p50s(summaries, target: str) -> tuple[float | None, float | None]:
    """ITL p50 and TPOT p50 of `target` at its lowest load point."""
    rows = sorted((s for s in summaries if s.target == target), key=lambda s: s.load_value)
    return (rows[0].itl_ms.p50, rows[0].tpot_ms.p50) if rows else (None, None)


def _verdict_cell(v: Verdict) -> str:
    if v.met is None:
        return "" if not v.mark else "–"
    return "met" if v.met else "**missed**"


def markdown(spec: VsVllmSpec, analysis, checks: dict[str, list[Verdict]], started: MachineState,
             finished: MachineState, machines: dict[str, MachineState]) -> str:
    lines = ["# Our deployments against vLLM's own server", "",
             f"- started {started.at}; load average (1/5/15 min) {started.label} at the start, "
             f"{finished.label} at the end; {started.num_cpus} CPUs",
             "- each server ran alone, in this order, with its load average when it started: "
             + ", ".join(f"`{k}` {v.label}" for k, v in machines.items()),
             f"- workload: synthetic token-id prompts of {spec.input_len} tokens, {spec.output_len} output tokens "
             f"(ignore_eos), {spec.num_requests} requests per load point, closed loop at concurrency "
             f"{spec.concurrency}, seed {spec.seed}, {spec.warmup_sessions} warm-up requests per server",
             f"- engine arguments for all: {ENGINE_CONFIG}'s engine section (vLLM gets them as flags); "
             "`agg_router` has two engines, the others one", ""]
    for target, vs in checks.items():
        lines += [f"## `{target}` against `{BASELINE}`", ""]
        lines += table(["headline", "value", "target", "verdict"],
                       [[v.name, fmt(v.value, 2), v.mark, _verdict_cell(v)] for v in vs])
    rows = []
    for s in sorted(analysis.summaries, key=lambda s: (s.load_value, s.target)):
        rows.append([s.load, f"`{s.target}`", f"{s.num_ok}/{s.num_requests}", fmt(s.output_tok_per_s),
                     fmt(s.ttft_ms.p50), fmt(s.ttft_ms.p99), fmt(s.itl_ms.p50, 2), fmt(s.tpot_ms.p50, 2),
                     fmt(s.e2e_ms.p50, 0)])
    lines += ["## Every server at every load point", ""]
    lines += table(["load", "server", "ok", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "TPOT p50 ms",
                    "E2E p50 ms"], rows, align="llrrrrrrr")
    lines += ["The harness's tables and plots: [harness/report.md](harness/report.md).", ""]
    return "\n".join(lines)
