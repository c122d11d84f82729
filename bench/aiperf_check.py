"""Cross-check the harness against NVIDIA's aiperf on one deployment: `python -m bench aiperf-check`.

Starts configs/agg.yaml, runs `aiperf profile` (installed in its own venv, not the project's),
then the harness with the equivalent workload right after, then aiperf once more, so drift on
the machine between the tools shows. Compares TTFT p50 and output tokens/s: they should agree
within 10%.

Equivalence: both stream /v1/completions at the same concurrency and request count, with
100-token prompts (aiperf: text generated and counted with the model's own tokenizer; the
harness: token ids), exactly 64 output tokens (ignore_eos, and aiperf counts the server's
`usage`), and a few unrecorded warm-up requests. Two of aiperf's defaults are turned off because
the harness has no counterpart: it scrapes the server's /metrics during the run, and in pure
concurrency mode it spends a core polling (see ``pacing_per_s``).
"""

from __future__ import annotations

import json
import logging
import resource
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.deploy import ROOT, LauncherDeployment, trim_log
from bench.flags import help_text
from bench.runner import RunOptions
from bench.scenario import MachineState, Workload, fmt, measure, table, write_json
from bench.stats import median, summarize
from bench.workloads import WorkloadKind, WorkloadParams

logger = logging.getLogger(__name__)

CONFIG = "configs/agg.yaml"
TOLERANCE = 0.10



@dataclass(frozen=True)
class AiperfCheckSpec:
    """The scenario's knobs; `python -m bench aiperf-check`'s flags are generated from these."""

    aiperf: str = field(default="/tmp/aiperf-venv/bin/aiperf", metadata=help_text("the aiperf command (its own venv)"))
    concurrency: int = field(default=8, metadata=help_text("closed-loop concurrency for both tools"))
    num_requests: int = field(default=256, metadata=help_text("requests per tool run"))
    input_len: int = field(default=100, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("output tokens per request"))
    warmup_requests: int = field(default=4, metadata=help_text("unrecorded requests before each tool run"))
    seed: int = field(default=0, metadata=help_text("both tools' seed"))
    rounds: int = field(default=3,
                        metadata=help_text("aiperf then the harness, this many times, then aiperf once more"))
    redis_db: int = field(default=2, metadata=help_text("Redis database (1-5), flushed before the start"))
    timeout_s: float = field(default=600.0, metadata=help_text("bound on each tool run"))
    # Why pace: in pure concurrency mode aiperf's timing manager polls for a free slot without
    # sleeping (RequestRateStrategy.execute_phase) and takes a whole core, which on a small machine
    # comes out of the server's share (docs/benchmarks.md, "The aiperf cross-check"). A constant
    # rate capped at the concurrency stays closed-loop, and the poll sleeps between ticks; a freed
    # slot waits at most one tick (5 ms at 200/s) for its next request.
    pacing_per_s: int = field(default=200, metadata=help_text(
        "aiperf's --request-rate, capped by --concurrency; 0 = its pure concurrency mode"))
    scrape_metrics: bool = field(default=False, metadata=help_text(
        "let aiperf scrape the frontend's /metrics during its run (its default; the harness never does)"))


def aiperf_argv(spec: AiperfCheckSpec, base_url: str, tokenizer: str, artifact_dir: Path) -> list[str]:
    """The aiperf command for the equivalent workload; base_url without /v1."""
    argv = [spec.aiperf, "profile", "--model", "tiny-llama", "--url", base_url, "--endpoint-type", "completions",
            "--streaming", "--tokenizer", tokenizer, "--concurrency", str(spec.concurrency),
            "--request-count", str(spec.num_requests), "--synthetic-input-tokens-mean", str(spec.input_len),
            "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(spec.output_len),
            "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
            "--warmup-request-count", str(spec.warmup_requests), "--random-seed", str(spec.seed),
            "--ui-type", "none", "--artifact-dir", str(artifact_dir)]
    if spec.pacing_per_s:
        argv += ["--request-rate", str(spec.pacing_per_s), "--arrival-pattern", "constant"]
    # aiperf scrapes base_url/metrics about once a second by default: load on the frontend that
    # the harness's run does not carry, so by default the two runs are not the same workload.
    return argv if spec.scrape_metrics else argv + ["--no-server-metrics"]


@dataclass(frozen=True)
class ToolFigures:
    """What both tools report, in the same units."""

    tool: str
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    output_tok_per_s: float | None
    num_requests: int | None
    machine: MachineState
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # the tool's own processes, user + system
    server_cpu_s: float = 0.0  # the deployment's processes over the same time


def _metric(export: dict, name: str, stat: str) -> float | None:
    """A statistic of one metric in profile_export_aiperf.json, which keeps metrics either at the
    top level or under "records", each as {"unit", "avg", "p50", ...}."""
    for holder in (export, export.get("records", {})):
        value = holder.get(name) if isinstance(holder, dict) else None
        if isinstance(value, dict) and stat in value:
            return value[stat]
    return None


def aiperf_figures(export: dict, machine: MachineState, tool: str = "aiperf") -> ToolFigures:
    count = _metric(export, "request_count", "avg")
    return ToolFigures(tool, _metric(export, "time_to_first_token", "p50"),
                       _metric(export, "time_to_first_token", "p99"), _metric(export, "inter_token_latency", "p50"),
                       _metric(export, "output_token_throughput", "avg"), int(count) if count is not None else None,
                       machine)


def tool_order(rounds: int) -> list[str]:
    """aiperf and the harness alternately, starting and ending with aiperf, so each harness run
    has an aiperf run on either side and slow drift of the machine shows."""
    return ["aiperf", "harness"] * rounds + ["aiperf"]


def agreement(a: float | None, b: float | None) -> float | None:
    """b / a - 1: the relative difference of b from a."""
    return None if a is None or b is None or a == 0 else b / a - 1


def run(spec: AiperfCheckSpec, out: Path, model: str = "tiny-llama") -> Path:
    from config import load_settings

    tokenizer = load_settings(ROOT / CONFIG, environ={}).model.resolved_path
    started = MachineState.now()
    figures, commands = [], []
    with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, name="agg") as dep:
        root_url = dep.base_url.removesuffix("/v1")
        for i, tool in enumerate(tool_order(spec.rounds)):
            label = f"{tool}-{i + 1}"
            machine = MachineState.now()
            logger.info("[%s] load average %s", label, machine.label)
            began, client0, server0 = time.monotonic(), _client_cpu_s(), _tree_cpu_s(dep.process_tree())
            if tool == "aiperf":
                argv = aiperf_argv(spec, root_url, tokenizer, out / "aiperf" / label)
                commands.append(shlex.join(argv))
                found = _run_aiperf(argv, out / "aiperf" / label, spec.timeout_s, machine, label)
            else:
                found = _run_harness(spec, dep.base_url, model, machine, label)
            figures.append(replace(found, wall_s=time.monotonic() - began, client_cpu_s=_client_cpu_s() - client0,
                                   server_cpu_s=_tree_cpu_s(dep.process_tree()) - server0))
    finished = MachineState.now()
    body = {"scenario": "aiperf-check", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "aiperf_commands": commands,
            "figures": [asdict(f) for f in figures], "tolerance": TOLERANCE,
            "medians": [{"figure": n, "aiperf": a, "harness": h, "aiperf_over_harness_minus_1": agreement(h, a)}
                        for n, a, h in medians(figures)]}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, figures, commands, started, finished))
    return path


def _client_cpu_s() -> float:
    """CPU seconds of this process (the harness) and of its finished children (aiperf's whole tree)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tree_cpu_s(tree) -> float:
    import psutil

    total = 0.0
    for info in tree:
        try:
            t = psutil.Process(info.pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _run_aiperf(argv: list[str], artifact_dir: Path, timeout_s: float, machine: MachineState,
                label: str) -> ToolFigures:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    log = artifact_dir / "aiperf.log"
    with log.open("wb") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    trim_log(log)
    export = artifact_dir / "profile_export_aiperf.json"  # the profiling phase's summary
    if not export.exists():
        raise RuntimeError(f"aiperf wrote no {export}; see {log}")
    _prune_artifacts(artifact_dir, keep=export)
    return aiperf_figures(json.loads(export.read_text()), machine, label)


KEEP_ARTIFACTS = ("profile_export_console.txt", "aiperf.log")


def _prune_artifacts(artifact_dir: Path, keep: Path) -> None:
    """Keeps aiperf's summary, its console tables and its log; drops the per-request exports and
    per-phase copies, so the results folder stays small."""
    for path in sorted(artifact_dir.rglob("*"), reverse=True):
        if path.is_file() and path != keep and not (path.parent == artifact_dir and path.name in KEEP_ARTIFACTS):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _run_harness(spec: AiperfCheckSpec, base_url: str, model: str, machine: MachineState,
                 label: str) -> ToolFigures:
    params = WorkloadParams(input_len_mean=spec.input_len, input_len_std=0.0, output_len_mean=spec.output_len)
    options = RunOptions(num_requests=spec.num_requests, seed=spec.seed, warmup_sessions=spec.warmup_requests,
                         deadline_s=spec.timeout_s)
    result = measure(Workload(WorkloadKind.SYNTHETIC, params, (spec.concurrency,), options), label, base_url, model)
    s = summarize(label, result.config.points[0], result.records, None)
    return ToolFigures(label, s.ttft_ms.p50, s.ttft_ms.p99, s.itl_ms.p50, s.output_tok_per_s, s.num_ok, machine)


def medians(figures: list[ToolFigures]) -> list[tuple[str, float | None, float | None]]:
    """(figure, aiperf's median, the harness's median) for TTFT p50 and output tokens/s."""
    def of(tool, get):
        return median([get(f) for f in figures if f.tool.startswith(tool)])

    return [(name, of("aiperf", get), of("harness", get))
            for name, get in (("TTFT p50 ms", lambda f: f.ttft_p50_ms), ("output tok/s", lambda f: f.output_tok_per_s))]


def _pct_diff(diff: float | None) -> str:
    return "–" if diff is None else f"{100 * diff:+.1f}%"


def _verdict(diff: float | None) -> str:
    return "–" if diff is None else ("within 10%" if abs(diff) <= TOLERANCE else "**differs**")


def markdown(spec: AiperfCheckSpec, figures: list[ToolFigures], commands: list[str], started: MachineState,
             finished: MachineState) -> str:
    lines = ["# Cross-check of the harness with aiperf", "",
             f"- {CONFIG}, started once; the tools ran one after another against it: "
             + ", ".join(f.tool for f in figures),
             f"- started {started.at}; load average (1/5/15 min) {started.label} at the start, {finished.label} at "
             f"the end; {started.num_cpus} CPUs",
             f"- workload: /v1/completions, streaming, {spec.input_len}-token prompts, {spec.output_len} output tokens "
             f"(ignore_eos), concurrency {spec.concurrency}, {spec.num_requests} requests, "
             f"{spec.warmup_requests} warm-up requests", ""]
    rows = [[f"`{f.tool}`", f.machine.label, str(f.num_requests), fmt(f.ttft_p50_ms), fmt(f.ttft_p99_ms),
             fmt(f.itl_p50_ms, 2), fmt(f.output_tok_per_s), fmt(f.wall_s), fmt(f.client_cpu_s), fmt(f.server_cpu_s)]
            for f in figures]
    lines += table(["run", "load average at start", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                    "output tok/s", "wall s", "client CPU s", "server CPU s"], rows, align="llrrrrrrrr")
    lines += ["Wall time covers the tool's whole run (start-up and warm-up included); client CPU is the tool's own "
              "processes (aiperf's whole process tree, or the harness's process); server CPU is the deployment's "
              "processes over the same time.", ""]
    lines += ["Medians over each tool's runs, and the relative difference of aiperf's from the harness's:", ""]
    lines += table(["figure", "aiperf (median)", "harness (median)", "aiperf / harness − 1", "verdict"],
                   [[name, fmt(a), fmt(h), _pct_diff(agreement(h, a)), _verdict(agreement(h, a))]
                    for name, a, h in medians(figures)], align="lrrrl")
    lines += ["Each aiperf run against the harness run next to it:", ""]
    rows = []
    for i, f in enumerate(figures):
        for h in (figures[j] for j in (i - 1, i + 1) if 0 <= j < len(figures) and f.tool.startswith("aiperf")):
            for name, a, b in (("TTFT p50", h.ttft_p50_ms, f.ttft_p50_ms),
                               ("output tok/s", h.output_tok_per_s, f.output_tok_per_s)):
                rows.append([f"`{f.tool}` vs `{h.tool}`", name, _pct_diff(agreement(a, b)), _verdict(agreement(a, b))])
    lines += table(["runs", "figure", "aiperf / harness − 1", "verdict"], rows, align="llrl")
    lines += ["aiperf commands:", "", "```"] + commands + ["```", ""]
    return "\n".join(lines)
