"""What every benchmark scenario shares: the machine's load, one harness run against one server,
and writing a scenario's results.json and report.md."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import runner
from bench.records import LoadMode, Target
from bench.runner import RunConfig, RunOptions, RunResult
from bench.workloads import WorkloadKind, WorkloadParams


@dataclass(frozen=True)
class MachineState:
    """The load averages, read when a scenario starts or a server is measured."""

    at: str
    load_1m: float
    load_5m: float
    load_15m: float
    num_cpus: int
    uptime: str

    @classmethod
    def now(cls) -> MachineState:
        one, five, fifteen = os.getloadavg()
        try:
            text = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            text = ""
        return cls(time.strftime("%Y-%m-%dT%H:%M:%S%z"), one, five, fifteen, os.cpu_count() or 0, text)

    @property
    def label(self) -> str:
        return f"{self.load_1m:.2f} / {self.load_5m:.2f} / {self.load_15m:.2f}"


@dataclass(frozen=True)
class Workload:
    """The harness settings a scenario sends to every server it measures."""

    kind: WorkloadKind
    params: WorkloadParams
    concurrencies: tuple[int, ...]
    options: RunOptions

    def config(self, targets: tuple[Target, ...], baseline: str | None = None) -> RunConfig:
        return RunConfig(targets=targets, workload=self.kind, params=self.params, mode=LoadMode.CLOSED,
                         load_values=tuple(float(c) for c in self.concurrencies), options=self.options,
                         baseline=baseline)

    def with_options(self, **changes) -> Workload:
        return replace(self, options=replace(self.options, **changes))


def measure(workload: Workload, label: str, base_url: str, model: str) -> RunResult:
    """One harness run (warm-up, then every load point) against one server."""
    return runner.run(workload.config((Target(label, base_url, model),)))


def merge(results: list[RunResult], baseline: str | None) -> RunResult:
    """Runs of the same workload against different servers, as one run with several targets, so
    the harness's comparisons with `baseline` apply. The servers ran one after another."""
    first = results[0].config
    targets = tuple(t for r in results for t in r.config.targets)
    config = replace(first, targets=targets, baseline=baseline)
    records = [rec for r in results for rec in r.records]
    return RunResult(config, records, results[0].started_at, sum(r.wall_s for r in results))


def write_harness_folder(result: RunResult, out_dir: Path) -> Path:
    """The harness's own results folder (report.md, plots, results.json with every request),
    with results.json rewritten without indentation: its per-token gaps are most of its size."""
    from bench import report

    path = report.write_all(result, out_dir)
    raw = out_dir / "results.json"
    raw.write_text(json.dumps(json.loads(raw.read_text()), separators=(",", ":")) + "\n")
    return path


def write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value"):  # an Enum
        return value.value
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` holds one of 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]
