"""One benchmark run: every target at every load point, interleaved, under one deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from bench.client import ClientKind, ClientOptions, StreamingClient, make_client, run_load_point
from bench.flags import help_text
from bench.records import LoadMode, LoadPoint, RequestRecord, Slo, Target
from bench.workloads import Session, WorkloadKind, WorkloadParams, build_workload

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunOptions:
    """The run's scalar knobs; the CLI's flags and defaults are generated from these fields."""

    num_requests: int = field(default=32, metadata=help_text("requests per target and load point"))
    seed: int = field(default=0, metadata=help_text("seed for the workload and the arrival times"))
    request_timeout_s: float = field(default=120.0, metadata=help_text("bound on each request"))
    deadline_s: float = field(default=900.0, metadata=help_text("bound on the whole run, warm-up included"))
    warmup_sessions: int = field(default=2, metadata=help_text("unrecorded sessions per target before the first point"))
    temperature: float = field(default=0.0, metadata=help_text("sampling temperature sent with every request"))
    api_key: str = field(default="none", metadata=help_text("API key sent to every target"))
    client: ClientKind = field(default=ClientKind.HTTP, metadata=help_text(
        "http: aiohttp and a minimal SSE reader; openai: the official client (heavier per token)"))


@dataclass(frozen=True)
class RunConfig:
    targets: tuple[Target, ...]
    workload: WorkloadKind
    params: WorkloadParams
    mode: LoadMode
    load_values: tuple[float, ...]
    options: RunOptions
    slo: Slo | None = None
    baseline: str | None = None

    @property
    def points(self) -> list[LoadPoint]:
        return [LoadPoint(self.mode, v) for v in self.load_values]

    def sessions(self, variant: int) -> list[Session]:
        return build_workload(self.workload, self.params, self.options.num_requests, self.options.seed, variant)

    @property
    def client_options(self) -> ClientOptions:
        o = self.options
        return ClientOptions(api_key=o.api_key, request_timeout_s=o.request_timeout_s, temperature=o.temperature,
                             kind=ClientKind(o.client))


@dataclass
class RunResult:
    config: RunConfig
    records: list[RequestRecord]
    started_at: str
    wall_s: float


def run(config: RunConfig) -> RunResult:
    """Runs the benchmark; blocks until done or the deadline passes."""
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    began = time.monotonic()
    records = asyncio.run(_run(config, deadline=began + config.options.deadline_s))
    return RunResult(config, records, started_at, time.monotonic() - began)


async def _run(config: RunConfig, deadline: float) -> list[RequestRecord]:
    clients = [make_client(t, config.client_options) for t in config.targets]
    records: list[RequestRecord] = []
    try:
        warm = config.sessions(variant=0)[:config.options.warmup_sessions]
        for client in clients:
            await _warm_up(client, warm, deadline)
        for index, point in enumerate(config.points, start=1):
            sessions = config.sessions(variant=index)  # the same requests for every target
            for client in clients:  # interleaved, so drift in the machine hits every target alike
                records += await _measure(client, point, sessions, config.options.seed, deadline)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return records


async def _measure(client: StreamingClient, point: LoadPoint, sessions: list[Session], seed: int,
                   deadline: float) -> list[RequestRecord]:
    logger.info("[%s %s] %d requests", client.target.label, point.label, sum(s.num_requests for s in sessions))
    records = await run_load_point(client, point, sessions, seed, budget_s=deadline - time.monotonic())
    num_ok = sum(r.ok for r in records)
    tokens = sum(r.output_tokens for r in records if r.ok)
    logger.info("[%s %s] %d/%d ok, %d output tokens", client.target.label, point.label, num_ok, len(records), tokens)
    return records


async def _warm_up(client: StreamingClient, warm: list[Session], deadline: float) -> None:
    """A few unrecorded sessions, so the first point does not pay for cold connections."""
    if not warm:
        return
    point = LoadPoint(LoadMode.CLOSED, len(warm))
    records = await run_load_point(client, point, warm, seed=0, budget_s=min(60.0, deadline - time.monotonic()))
    failed = [r for r in records if not r.ok]
    if failed:
        logger.warning("[%s warm-up] %d/%d failed: %s", client.target.label, len(failed), len(records),
                       failed[0].error)
