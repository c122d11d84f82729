"""Writes a run's results folder: results.json (config, summaries, comparisons, raw records),
report.md (tables), and PNG plots (latency CDFs, throughput against load)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.records import LoadMode, RequestRecord
from bench.runner import RunResult
from bench.stats import Headline, PointComparison, Summary, compare_points, headline, summarize

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when a field of results.json changes meaning or goes away
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Analysis:
    summaries: list[Summary]
    headlines: list[Headline]
    comparisons: list[PointComparison]


def analyse(result: RunResult) -> Analysis:
    config = result.config
    summaries = [summarize(t.label, p, [r for r in result.records if r.target == t.label and r.load == p.label],
                           config.slo)
                 for t in config.targets for p in config.points]
    others = [t.label for t in config.targets if t.label != config.baseline]
    if config.baseline is None:
        return Analysis(summaries, [], [])
    heads = [h for h in (headline(summaries, t, config.baseline) for t in others) if h]
    comparisons = [c for t in others for c in compare_points(summaries, t, config.baseline)]
    return Analysis(summaries, heads, comparisons)


def write_all(result: RunResult, out_dir: Path) -> Path:
    """Writes results.json, report.md and the plots; returns report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(result)
    (out_dir / "results.json").write_text(json.dumps(results_json(result, analysis), indent=1))
    plots = write_plots(result, analysis.summaries, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(result, analysis, plots))
    logger.info("wrote %s", out_dir)
    return report


def results_json(result: RunResult, analysis: Analysis) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "started_at": result.started_at,
        "wall_s": result.wall_s,
        "config": _config_json(result),
        "summaries": [asdict(s) for s in analysis.summaries],
        "headlines": [asdict(h) for h in analysis.headlines],
        "comparisons": [asdict(c) for c in analysis.comparisons],
        "records": [r.to_json() for r in result.records],
    }


def _config_json(result: RunResult) -> dict:
    c = result.config
    return {"targets": [asdict(t) for t in c.targets], "workload": c.workload.value, "params": asdict(c.params),
            "mode": c.mode.value, "load_values": list(c.load_values), "options": asdict(c.options),
            "slo": asdict(c.slo) if c.slo else None, "baseline": c.baseline}


def load_result(path: Path) -> RunResult:
    """Reads a results.json back, so `python -m bench report DIR` can redraw it."""
    from bench.records import Slo, Target
    from bench.runner import RunConfig, RunOptions
    from bench.workloads import LengthDist, WorkloadKind, WorkloadParams

    body = json.loads(path.read_text())
    c = body["config"]
    params = WorkloadParams(**{**c["params"], "length_dist": LengthDist(c["params"]["length_dist"])})
    config = RunConfig(targets=tuple(Target(**t) for t in c["targets"]), workload=WorkloadKind(c["workload"]),
                       params=params, mode=LoadMode(c["mode"]), load_values=tuple(c["load_values"]),
                       options=RunOptions(**c["options"]), slo=Slo(**c["slo"]) if c["slo"] else None,
                       baseline=c["baseline"])
    records = [RequestRecord.from_json(r) for r in body["records"]]
    return RunResult(config, records, body["started_at"], body["wall_s"])


# -- Markdown --------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(result: RunResult, analysis: Analysis, plots: Sequence[str]) -> str:
    lines = _preamble(result)
    if analysis.headlines:
        lines += _headline_table(analysis.headlines) + _comparison_table(analysis.comparisons)
    for target in result.config.targets:
        lines += _target_table(target.label, [s for s in analysis.summaries if s.target == target.label],
                               result.config.slo is not None)
    lines += _errors(result.records)
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def _preamble(result: RunResult) -> list[str]:
    c, o = result.config, result.config.options
    targets = ", ".join(f"`{t.label}` = {t.base_url} (model `{t.model}`)" for t in c.targets)
    load = "concurrency" if c.mode is LoadMode.CLOSED else "Poisson arrivals, sessions/s"
    slo = f"TTFT ≤ {c.slo.ttft_ms:g} ms and mean ITL (TPOT) ≤ {c.slo.itl_ms:g} ms" if c.slo else "none given"
    return [f"# Benchmark: {c.workload.value} workload, {c.mode.value} loop", "",
            f"- started {result.started_at}, took {result.wall_s:.1f} s",
            f"- targets: {targets}",
            f"- load ({load}): {', '.join(f'{v:g}' for v in c.load_values)}",
            f"- {o.num_requests} requests per target and load point, seed {o.seed}, temperature {o.temperature:g}, "
            f"{o.warmup_sessions} warm-up sessions per target",
            f"- workload parameters: `{json.dumps(asdict(c.params), default=str)}`",
            f"- SLO for goodput: {slo}", ""]


def _headline_table(heads: Sequence[Headline]) -> list[str]:
    lines = [f"## Against the baseline `{heads[0].baseline}`", "",
             "Throughput at saturation is the best output tokens/s over the load points (ratio: target / "
             "baseline, higher is better). TTFT, ITL and TPOT are p50 at the lowest load point (TTFT: "
             "target − baseline in ms; ITL and TPOT: target / baseline; lower is better).", "",
             "| target | saturation tok/s | baseline tok/s | throughput ratio | low load | "
             "TTFT p50 diff (ms) | ITL p50 ratio | TPOT p50 ratio |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for h in heads:
        lines.append(f"| {h.target} | {_f(h.saturation_tok_per_s)} | {_f(h.baseline_saturation_tok_per_s)} | "
                     f"{_f(h.throughput_ratio, 2)} | {h.low_load} | {_f(h.ttft_p50_diff_ms)} | "
                     f"{_f(h.itl_p50_ratio, 2)} | {_f(h.tpot_p50_ratio, 2)} |")
    return lines + [""]


def _comparison_table(rows: Sequence[PointComparison]) -> list[str]:
    lines = ["Per load point:", "",
             "| target | load | tok/s ratio | TTFT p50 diff (ms) | ITL p50 ratio | TPOT p50 ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for c in rows:
        lines.append(f"| {c.target} | {c.load} | {_f(c.tok_per_s_ratio, 2)} | {_f(c.ttft_p50_diff_ms)} | "
                     f"{_f(c.itl_p50_ratio, 2)} | {_f(c.tpot_p50_ratio, 2)} |")
    return lines + [""]


def _target_table(label: str, summaries: Sequence[Summary], with_slo: bool) -> list[str]:
    lines = [f"## Target `{label}`", "",
             "| load | ok/total | duration s | req/s | out tok/s | goodput req/s | TTFT p50/p90/p99 ms | "
             "ITL p50/p90/p99 ms | TPOT p50 ms | E2E p50/p90/p99 ms | prompt tok | cached tok |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---|---:|---:|"]
    for s in summaries:
        goodput = _f(s.goodput_req_per_s, 2) if with_slo else "–"
        lines.append(f"| {s.load} | {s.num_ok}/{s.num_requests} | {_f(s.duration_s)} | {_f(s.req_per_s, 2)} | "
                     f"{_f(s.output_tok_per_s)} | {goodput} | {_triple(s.ttft_ms)} | {_triple(s.itl_ms, 2)} | "
                     f"{_f(s.tpot_ms.p50, 2)} | {_triple(s.e2e_ms, 0)} | {s.prompt_tokens} | {s.cached_tokens} |")
    return lines + [""]


def _triple(d, digits: int = 1) -> str:
    return " / ".join(_f(v, digits) for v in (d.p50, d.p90, d.p99))


def _errors(records: Sequence[RequestRecord]) -> list[str]:
    failed = [r for r in records if not r.ok]
    if not failed:
        return ["All requests succeeded.", ""]
    counts: dict[tuple[str, str, str], int] = {}
    for r in failed:
        key = (r.target, r.load, r.error[:120])
        counts[key] = counts.get(key, 0) + 1
    lines = ["## Errors", "", "| target | load | count | error |", "|---|---|---:|---|"]
    lines += [f"| {t} | {load} | {n} | {e.replace('|', '/')} |" for (t, load, e), n in counts.items()]
    return lines + [""]


# -- plots -----------------------------------------------------------------------------------


def write_plots(result: RunResult, summaries: Sequence[Summary], out_dir: Path) -> list[str]:
    """ttft_cdf.png, itl_cdf.png and throughput.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    names = []
    for name, values_of, xlabel in (("ttft_cdf.png", _ttfts, "TTFT (ms)"), ("itl_cdf.png", _itls, "ITL (ms)")):
        _cdf_plot(result, values_of, xlabel, out_dir / name)
        names.append(name)
    _throughput_plot(result, summaries, out_dir / "throughput.png")
    return names + ["throughput.png"]


def _ttfts(records: Sequence[RequestRecord]) -> list[float]:
    return [r.ttft_ms for r in records if r.ok and r.ttft_ms is not None]


def _itls(records: Sequence[RequestRecord]) -> list[float]:
    return [gap for r in records if r.ok for gap in r.itl_ms]


def _cdf_plot(result: RunResult, values_of, xlabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, target in enumerate(result.config.targets):  # a colour per target, a line style per load
        for p, point in enumerate(result.config.points):
            values = sorted(values_of([r for r in result.records
                                       if r.target == target.label and r.load == point.label]))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", color=f"C{t % 10}", linestyle=LINE_STYLES[p % len(LINE_STYLES)],
                        label=f"{target.label} {point.label}")
    ax.set(xlabel=xlabel, ylabel="fraction of samples", title=f"{xlabel.split()[0]} CDF")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _throughput_plot(result: RunResult, summaries: Sequence[Summary], path: Path) -> None:
    import matplotlib.pyplot as plt

    closed = result.config.mode is LoadMode.CLOSED
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for target in result.config.targets:
        rows = sorted((s for s in summaries if s.target == target.label), key=lambda s: s.load_value)
        xs = [s.load_value for s in rows]
        left.plot(xs, [s.output_tok_per_s for s in rows], marker="o", label=target.label)
        right.plot(xs, [s.ttft_ms.p50 if s.ttft_ms.p50 is not None else float("nan") for s in rows],
                   marker="o", label=target.label)
    xlabel = "concurrency" if closed else "offered rate (sessions/s)"
    left.set(xlabel=xlabel, ylabel="output tokens/s", title="Throughput")
    right.set(xlabel=xlabel, ylabel="TTFT p50 (ms)", title="TTFT p50")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(result.config.load_values), [f"{v:g}" for v in result.config.load_values])
        ax.grid(True, alpha=0.3)
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
