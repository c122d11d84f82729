"""How fast a request moves off a killed worker: `python -m bench migration`.

configs/agg_router.yaml (two decode workers, a round-robin router) on a fresh Redis database.
Each round streams `--streams` long requests, half on each worker; once every stream has tokens,
the Celery main process of the worker serving the first one is SIGKILLed (and its engine
processes with it, as workers/orphans.py makes them). With `--drop-lease` (the default) the
scenario then deletes the worker's lease, as the launcher does when it sees its child exit
(launcher/__main__.py); without it, the lease lapses after `workers.lease_s`. The launcher
starts a replacement, and the next round waits for it.

Per round it records:

- **detection**: from the SIGKILL to the frontend's resubmission, read off its `/metrics`
  (`llmq_frontend_migrations_total`, polled every `--poll-ms`): the time to the first move, and
  to the last of the victim's streams that moved;
- **resume**: per stream that was on the victim, from the SIGKILL to its next token at the client;
- whether every stream completed with all its tokens and no error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import Distribution

logger = logging.getLogger(__name__)

CONFIG = "configs/agg_router.yaml"


@dataclass(frozen=True)
class MigrationSpec:
    """The scenario's knobs; `python -m bench migration`'s flags are generated from these."""

    kills: int = field(default=3, metadata=help_text("rounds, one SIGKILL each"))
    streams: int = field(default=8, metadata=help_text("streams per round, half on each worker"))
    output_len: int = field(default=400, metadata=help_text("max_tokens of every stream (ignore_eos)"))
    min_tokens_before_kill: int = field(default=10, metadata=help_text("tokens every stream has before the kill"))
    drop_lease: bool = field(default=True, metadata=help_text("delete the victim's lease at the kill, as the "
                                                              "launcher does; else it lapses"))
    poll_ms: float = field(default=20.0, metadata=help_text("how often /metrics is read after a kill"))
    redis_db: int = field(default=5, metadata=help_text("Redis database (1-5), flushed before the start"))
    seed: int = field(default=0, metadata=help_text("prompt seed"))


@dataclass
class StreamTrace:
    """One streaming client's view: its worker, and when each chunk with tokens arrived."""

    worker: str = ""
    arrivals: list[float] = field(default_factory=list)  # monotonic
    completion_tokens: int = 0
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def first_after(self, t: float) -> float | None:
        return next((a for a in self.arrivals if a > t), None)


def _stream(base_url: str, ids: list[int], max_tokens: int, trace: StreamTrace) -> None:
    body = {"model": "tiny-llama", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", base_url + "/completions", json=body, timeout=300) as response:
            trace.worker = response.headers.get("x-worker-id", "")
            if response.status_code != 200:
                trace.error = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                return
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    trace.error = chunk["error"].get("message", "error")
                elif chunk.get("usage"):
                    trace.completion_tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    trace.arrivals.append(time.monotonic())
    except httpx.HTTPError as e:
        trace.error = f"{type(e).__name__}: {e}"
    finally:
        trace.done.set()


def _migrations(base_url: str) -> float:
    body = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("llmq_frontend_migrations_total{"))


@dataclass
class Round:
    victim: str
    streams_on_victim: int
    moved: int  # the victim's streams that had not finished at the kill
    detect_first_s: float | None
    detect_all_s: float | None
    resume_s: list[float]
    complete: bool  # every stream: no error and every token
    errors: list[str]


def live_decode(client) -> dict:
    """The live decode workers' leases, by worker id."""
    from tasks.registry import live_workers

    return {w.worker_id: w for w in live_workers(client, role="decode")}


def sigkill_worker(client, status, drop_lease: bool, kill_engines: bool = True) -> list[psutil.Process]:
    """SIGKILLs a decode worker's Celery main process (``status``: its lease). ``drop_lease``
    deletes its lease at once, as the launcher does when it sees its child exit; ``kill_engines``
    kills its engine processes too, rather than leave that to workers/orphans.py. Returns the
    engine processes it had, collected before the kill."""
    from tasks import keys

    engines = psutil.Process(status.pid).children(recursive=True)
    os.kill(status.pid, signal.SIGKILL)
    if drop_lease:
        client.delete(keys.worker_lease(status.worker_id))
    if kill_engines:
        for proc in engines:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    return engines


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout_s:.0f}s")


def one_round(dep: LauncherDeployment, spec: MigrationSpec, k: int) -> Round:
    wait_for(lambda: len(live_decode(dep.redis)) == 2, 300, "two live decode workers")
    prompts = [[10 + (i * 37 + (k * spec.streams + s) * 101 + spec.seed) % 1500 for i in range(24)]
               for s in range(spec.streams)]
    traces = [StreamTrace() for _ in prompts]
    for ids, trace in zip(prompts, traces):
        threading.Thread(target=_stream, args=(dep.base_url, ids, spec.output_len, trace), daemon=True).start()
    wait_for(lambda: all(len(t.arrivals) >= spec.min_tokens_before_kill or t.done.is_set() for t in traces), 120,
          "tokens on every stream")
    victim = traces[0].worker
    status = live_decode(dep.redis)[victim]
    on_victim = [t for t in traces if t.worker == victim]
    before = _migrations(dep.base_url)
    killed = time.monotonic()
    sigkill_worker(dep.redis, status, spec.drop_lease)
    moving = [t for t in on_victim if not t.done.is_set()]
    first = last = None
    while time.monotonic() - killed < 60 and (last is None):
        moved = _migrations(dep.base_url) - before
        now = time.monotonic()
        if moved >= 1 and first is None:
            first = now - killed
        if moved >= len(moving):
            last = now - killed
        time.sleep(spec.poll_ms / 1000)
    for t in traces:
        t.done.wait(300)
    resumes = [r - killed for r in (t.first_after(killed) for t in moving) if r is not None]
    errors = [t.error for t in traces if t.error]
    complete = not errors and all(t.completion_tokens == spec.output_len for t in traces)
    result = Round(victim, len(on_victim), len(moving), first, last, resumes, complete, errors)
    logger.info("round %d: %s", k, result)
    return result


def run(spec: MigrationSpec, out: Path) -> Path:
    started = MachineState.now()
    sets = {"router.mode": "round-robin", "engine.max_num_seqs": "16", "workers.concurrency": "16"}
    rounds = []
    with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, sets=sets, name="agg_router") as dep:
        for k in range(spec.kills):
            rounds.append(one_round(dep, spec, k))
    finished = MachineState.now()
    write_json(out / "results.json", {"scenario": "migration", "config": CONFIG, "sets": sets, "spec": asdict(spec),
                                      "machine_start": asdict(started), "machine_end": asdict(finished),
                                      "rounds": [asdict(r) for r in rounds]})
    path = out / "report.md"
    path.write_text(markdown(spec, rounds, started, finished))
    return path


def markdown(spec: MigrationSpec, rounds: list[Round], started: MachineState, finished: MachineState) -> str:
    lease = "dropped at the kill (as the launcher does)" if spec.drop_lease else "left to lapse"
    lines = ["# Migration: detection and resume after a SIGKILL", "",
             f"`{CONFIG}` (round-robin, 2 decode workers); {spec.streams} streams of {spec.output_len} tokens "
             f"per round; lease {lease}.",
             f"Load average at start {started.label}, at end {finished.label}.", ""]
    rows = [[str(i), r.victim, f"{r.moved}/{r.streams_on_victim}", fmt(r.detect_first_s, 2), fmt(r.detect_all_s, 2),
             fmt(min(r.resume_s) if r.resume_s else None, 2), fmt(max(r.resume_s) if r.resume_s else None, 2),
             "yes" if r.complete else "NO: " + "; ".join(r.errors)[:120]] for i, r in enumerate(rounds)]
    lines += table(["round", "victim", "moved", "detect first s", "detect all s", "resume min s", "resume max s",
                    "all complete"], rows)
    detect = [r.detect_all_s for r in rounds if r.detect_all_s is not None]
    resume = [s for r in rounds for s in r.resume_s]
    lines += ["Over all rounds (SIGKILL to ...):", ""]
    lines += table(["", "n", "p50 s", "max s"], [
        ["resubmit (all of the victim's streams)", str(len(detect)), fmt(Distribution.of(detect).p50, 2),
         fmt(max(detect, default=None), 2)],
        ["next token at the client", str(len(resume)), fmt(Distribution.of(resume).p50, 2),
         fmt(max(resume, default=None), 2)]])
    return "\n".join(lines) + "\n"
