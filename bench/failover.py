"""A Redis failover under steady load: `python -m bench failover`.

configs/agg.yaml (one decode worker) on a Redis primary, its replica and three Sentinels on
loopback ports (bench/redis_ha.py; Sentinels call a primary down after 1 s). `--concurrency`
clients send completions back to back, through the official openai client, for `--before-s`;
then the primary is SIGKILLed, and the load goes on for `--after-s` past the failover.

It reports:

- **failover**: from the SIGKILL until the Sentinels name a new master that takes writes;
- **back**: from the SIGKILL until the first request sent after it succeeded;
- requests **sent**, **failed** (no answer but an error, after the retries), **retried** (a 503
  with Retry-After, retried after it as a client should, then answered; a retry is counted once
  per request), and **lost** (no answer at all within the client's time-out): a request is either
  answered, failed or lost;
- the requests in flight at the kill, and how many of them were answered.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.redis_ha import MASTER_NAME, SentinelSet
from bench.scenario import MachineState, fmt, table, write_json

logger = logging.getLogger(__name__)

CONFIG = "configs/agg.yaml"


@dataclass(frozen=True)
class FailoverSpec:
    """The scenario's knobs; `python -m bench failover`'s flags are generated from these."""

    concurrency: int = field(default=8, metadata=help_text("clients sending back to back"))
    output_len: int = field(default=32, metadata=help_text("max_tokens of every request (ignore_eos)"))
    before_s: float = field(default=20.0, metadata=help_text("load before the primary is killed"))
    after_s: float = field(default=30.0, metadata=help_text("load after the failover"))
    retries: int = field(default=3, metadata=help_text("retries of a request that got a 503 (after Retry-After)"))
    timeout_s: float = field(default=60.0, metadata=help_text("client time-out: past it a request is lost"))
    failover_wait_s: float = field(default=5.0, metadata=help_text("redis.failover_wait_s of the deployment"))
    engine_dtype: str = field(default="float32", metadata=help_text(
        "engine.dtype: float32 keeps vLLM's CPU attention off AMX, which has died with SIGILL on some VMs"))


@dataclass
class Outcome:
    """One request as its client saw it. ``status`` 200 when answered; else the last HTTP status,
    0 for no answer (time-out or connection error)."""

    sent: float  # monotonic
    done: float = 0.0
    status: int = 0
    retries: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def lost(self) -> bool:
        return self.status == 0


class SteadyLoad:
    """``concurrency`` threads, each sending one completion after another until ``stop``. A 503
    is retried ``retries`` times after its Retry-After."""

    def __init__(self, base_url: str, api_key: str, concurrency: int, output_len: int, retries: int = 0,
                 timeout_s: float = 60.0):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self.output_len = output_len
        self.retries = retries
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float) -> list[threading.Thread]:
        """Stops sending and waits for the requests in flight; returns the threads still stuck."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t for t in self._threads if t.is_alive()]

    def _loop(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            outcome = Outcome(sent=time.monotonic())
            with self._lock:
                self.outcomes.append(outcome)
            self._one(outcome, [10 + (i * 131 + k * 17 + j * 7) % 1500 for j in range(16)])
            k += 1

    def _one(self, outcome: Outcome, prompt: list[int]) -> None:
        import openai

        while True:
            try:
                self.client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=self.output_len,
                                               temperature=0, extra_body={"ignore_eos": True})
                outcome.status = 200
            except openai.APIStatusError as e:
                outcome.status, outcome.error = e.status_code, str(e.message)[:300]
                retry_after = e.response.headers.get("retry-after")
                if e.status_code == 503 and retry_after is not None and outcome.retries < self.retries:
                    outcome.retries += 1
                    time.sleep(float(retry_after))
                    continue
            except openai.APIError as e:  # time-out or connection error: no answer
                outcome.status, outcome.error = 0, f"{type(e).__name__}: {e}"[:300]
            outcome.done = time.monotonic()
            return


@dataclass
class Result:
    failover_s: float
    back_s: float | None
    sent: int
    answered: int
    failed: int
    retried: int
    lost: int
    in_flight_at_kill: int
    in_flight_answered: int
    stuck_clients: int
    errors: dict[str, int]


def summarize(outcomes: list[Outcome], killed: float, failover_s: float, stuck: int) -> Result:
    answered = [o for o in outcomes if o.ok]
    after = sorted((o for o in answered if o.sent >= killed), key=lambda o: o.done)
    in_flight = [o for o in outcomes if o.sent < killed and (o.done == 0 or o.done > killed)]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            kind = "lost" if o.lost else f"HTTP {o.status}"
            errors[kind] = errors.get(kind, 0) + 1
    return Result(failover_s=failover_s, back_s=after[0].done - killed if after else None, sent=len(outcomes),
                  answered=len(answered), failed=sum(1 for o in outcomes if not o.ok and not o.lost),
                  retried=sum(1 for o in answered if o.retries), lost=sum(1 for o in outcomes if o.lost),
                  in_flight_at_kill=len(in_flight), in_flight_answered=sum(1 for o in in_flight if o.ok),
                  stuck_clients=stuck, errors=errors)


def run(spec: FailoverSpec, out: Path) -> Path:
    started = MachineState.now()
    with SentinelSet(out / "redis") as ha:
        sets = {"redis_url": ha.redis_url, "redis.sentinel_master": MASTER_NAME,
                "redis.failover_wait_s": str(spec.failover_wait_s), "engine.dtype": spec.engine_dtype}
        with LauncherDeployment(CONFIG, out / "logs", 5, sets=sets, name="agg") as dep:
            load = SteadyLoad(dep.base_url, "none", spec.concurrency, spec.output_len, spec.retries,
                              spec.timeout_s).start()
            time.sleep(spec.before_s)  # the load's duration, not a wait for a condition
            killed = time.monotonic()
            old = ha.kill_primary()
            failover_s = ha.wait_failover(old)
            logger.info("failover in %.2fs", failover_s)
            time.sleep(spec.after_s)  # the load's duration
            stuck = load.stop(spec.timeout_s * (spec.retries + 1) + 10)
            result = summarize(load.outcomes, killed, failover_s, len(stuck))
    finished = MachineState.now()
    logger.info("%s", result)
    write_json(out / "results.json", {"scenario": "failover", "config": CONFIG, "spec": asdict(spec),
                                      "machine_start": asdict(started), "machine_end": asdict(finished),
                                      "result": asdict(result)})
    path = out / "report.md"
    path.write_text(markdown(spec, result, started, finished))
    return path


def markdown(spec: FailoverSpec, r: Result, started: MachineState, finished: MachineState) -> str:
    lines = ["# Redis failover under steady load", "",
             f"`{CONFIG}` on a primary, a replica and 3 Sentinels (down-after 1 s); {spec.concurrency} clients, "
             f"{spec.output_len} tokens per request, {spec.before_s:.0f} s before the SIGKILL of the primary and "
             f"{spec.after_s:.0f} s after the failover; a 503 is retried up to {spec.retries} times after its "
             "Retry-After.",
             f"Load average at start {started.label}, at end {finished.label}.", ""]
    lines += table(["failover s", "back s", "sent", "answered", "failed", "retried", "lost",
                    "in flight at kill (answered)", "stuck clients"],
                   [[fmt(r.failover_s, 2), fmt(r.back_s, 2), str(r.sent), str(r.answered), str(r.failed),
                     str(r.retried), str(r.lost), f"{r.in_flight_at_kill} ({r.in_flight_answered})",
                     str(r.stuck_clients)]])
    if r.errors:
        lines += ["Final errors by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())), ""]
    return "\n".join(lines) + "\n"
