"""A bounded soak: `python -m bench soak`.

configs/agg_router.yaml (two decode workers and a router) on a fresh Redis database, under
moderate load: `--concurrency` streaming clients in a closed loop (bench/client.py), each
sending one completion after another, for `--duration-s` or `--max-requests`, whichever ends
first. Every `--kill-every-s` the Celery main process of one decode worker (the two in turn)
is SIGKILLed; its engine processes are left to die with it (workers/orphans.py) and the launcher
restarts it. With `--sentinel`, Redis is a primary, its replica and three Sentinels
(bench/redis_ha.py), and the primary is SIGKILLed once, between two worker kills.

A 503 with Retry-After (the answer while Redis fails over) is retried after it, up to
`--retries` times, as a client should; a 429 is counted apart. It reports:

- requests **sent** and **completed** (every token, no error): equal for the ones not refused
  with 429;
- errors by kind; engine processes of the killed workers still alive at the end (orphans);
- the RSS of the frontend, of each worker (its Celery process and its engines) and of Redis, at
  the start and at the end;
- the Redis key count (DBSIZE) at the start and the end, how many keys have no TTL, and the
  members of kombu's binding sets. The deployment runs with `--request-timeout-s` as its request
  timeout and stream TTL, so every request's keys expire within about that plus a minute (the
  claim's margin); the end's count is taken once DBSIZE is back to the start's less the warm-up's
  request keys, or after `--settle-s`, whichever comes first. No standing key (leases, wake
  streams, kombu's bindings) may be new at the end, but for the deployment-wide singletons
  tasks/keys.py names (the router's index snapshot is first written mid-run), nor any binding
  member; and no request key may lack a TTL.

The start is measured after a warm-up, once both workers are live and every frontend process
has served a request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.client import ClientOptions, HttpClient, StreamFailed
from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.migration import live_decode, sigkill_worker, wait_for
from bench.records import Target
from bench.redis_ha import MASTER_NAME, SentinelSet
from bench.scenario import MachineState, fmt, table, write_json

logger = logging.getLogger(__name__)

CONFIG = "configs/agg_router.yaml"
# At the end, how long the standing keys may take to be back where they started.
STANDING_WAIT_S = 30.0


@dataclass(frozen=True)
class SoakSpec:
    """The scenario's knobs; `python -m bench soak`'s flags are generated from these."""

    duration_s: float = field(default=600.0, metadata=help_text("how long the load runs"))
    kill_every_s: float = field(default=120.0, metadata=help_text("SIGKILL a decode worker this often"))
    sentinel: bool = field(default=False, metadata=help_text("Redis behind Sentinels; one failover mid-run"))
    concurrency: int = field(default=4, metadata=help_text("closed-loop streaming clients"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    max_requests: int = field(default=100_000, metadata=help_text("stop sending after this many"))
    retries: int = field(default=3, metadata=help_text("retries of a 503 with Retry-After"))
    request_timeout_s: int = field(default=60, metadata=help_text(
        "frontend.request_timeout_s and workers.stream_ttl_s: how long per-request keys live"))
    settle_s: float = field(default=150.0, metadata=help_text(
        "at the end, wait at most this long for the key count to return to the start's"))
    redis_db: int = field(default=4, metadata=help_text("Redis database (1-5), flushed before the start"))
    engine_dtype: str = field(default="float32", metadata=help_text(
        "engine.dtype: float32 keeps vLLM's CPU attention off AMX, which has died with SIGILL on some VMs"))

    def deployment_sets(self) -> dict[str, str]:
        timeout = str(self.request_timeout_s)
        return {"frontend.request_timeout_s": timeout, "workers.stream_ttl_s": timeout,
                "engine.dtype": self.engine_dtype}

    @property
    def kill_times_s(self) -> list[float]:
        n = int(self.duration_s // self.kill_every_s)
        return [k * self.kill_every_s for k in range(1, n + 1) if k * self.kill_every_s < self.duration_s]

    @property
    def failover_at_s(self) -> float:
        """Half-way between the two kills around the middle of the run (mid-run without kills)."""
        if self.duration_s < self.kill_every_s:
            return self.duration_s / 2
        return (int(self.duration_s / 2 // self.kill_every_s) + 0.5) * self.kill_every_s


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as its client saw it: ``kind`` is "ok", or what went wrong."""

    kind: str = "in flight"
    retries: int = 0


class ClosedLoad:
    """``concurrency`` loops, each streaming one completion after another, on an event loop in
    a thread of its own, until ``stop`` or ``max_requests`` sent."""

    def __init__(self, base_url: str, spec: SoakSpec, api_key: str = "none"):
        self.spec = spec
        self.options = ClientOptions(api_key=api_key, request_timeout_s=float(spec.request_timeout_s))
        self.target = Target("soak", base_url, "tiny-llama")
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="soak-load", daemon=True)

    def start(self) -> ClosedLoad:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> bool:
        """Waits for ``max_requests`` to be sent and answered; False if not within ``timeout_s``."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Stops sending and waits for the requests in flight; False if some are still stuck."""
        self._stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    async def _run(self) -> None:
        client = HttpClient(self.target, self.options)
        try:
            await asyncio.gather(*(self._loop(client, i) for i in range(self.spec.concurrency)))
        finally:
            await client.close()

    async def _loop(self, client: HttpClient, i: int) -> None:
        k = 0
        while not self._stop.is_set() and len(self.outcomes) < self.spec.max_requests:
            outcome = Outcome()
            self.outcomes.append(outcome)
            # 8 shared prefixes, so the KV router has overlaps to route by.
            prompt = [10 + (j * 7 + (k % 8) * 131) % 1500 for j in range(32)] + \
                     [10 + (i * 97 + k * 13 + j) % 1500 for j in range(16)]
            await self._one(client, outcome, prompt)
            k += 1

    async def _one(self, client: HttpClient, outcome: Outcome, prompt: list[int]) -> None:
        while True:
            try:
                timing = await asyncio.wait_for(client.completion(prompt, self.spec.output_len),
                                                self.options.request_timeout_s)
            except StreamFailed as e:
                if e.status == 503 and e.retry_after_s is not None and outcome.retries < self.spec.retries:
                    outcome.retries += 1
                    await asyncio.sleep(e.retry_after_s)
                    continue
                outcome.kind = f"HTTP {e.status}" if e.status else f"error event ({e.error_type or 'untyped'})"
            except TimeoutError:
                outcome.kind = "timed out"
            except Exception as e:  # noqa: BLE001 - a soak counts every failure by its kind
                outcome.kind = type(e).__name__
            else:
                outcome.kind = "ok" if timing.output_tokens == self.spec.output_len else \
                    f"short ({timing.output_tokens} of {self.spec.output_len} tokens)"
            return


# -- what is measured -------------------------------------------------------------------------


def _per_request_prefixes() -> tuple[str, ...]:
    from tasks import keys

    return tuple(make("") for make in (keys.output_stream, keys.cancel_flag, keys.claim, keys.prefill_claim,
                                       keys.prefill_abandoned, keys.stored_response))


def key_group(name: str) -> str:
    """"request": a request's own keys, which expire (streams, flags, claims); "broker": kombu's
    messages and their bookkeeping (queues, ``unacked``), which drain as messages are taken or
    restored after the visibility timeout; "standing": the rest (leases, wake streams, the KV
    event log, kombu's bindings), which must not grow."""
    if name.startswith(_per_request_prefixes()):
        return "request"
    if name.startswith(("llmq:", "_kombu.binding.")):
        return "standing"
    return "broker"


@dataclass
class KeyCount:
    total: int  # DBSIZE
    without_ttl: int
    with_ttl: int
    max_ttl_s: int  # the longest remaining TTL; 0 when none has one
    groups: dict[str, int]  # key_group -> keys
    request_without_ttl: int  # a request's keys that would never expire: must be 0
    binding_members: int  # members of kombu's binding sets: a queue that went without unbinding stays
    standing_names: list[str]
    shapes: dict[str, int]  # key names with their ids replaced by "*", and how many of each

    @property
    def standing(self) -> int:
        return self.groups.get("standing", 0)

    @property
    def by_ttl(self) -> str:
        return f"{self.total} ({self.without_ttl} without a TTL, {self.standing} standing)"


_ID = re.compile(r"[0-9a-f]{8,}(-[0-9a-f]{4,})*|\d+-[0-9a-f]{8}", re.IGNORECASE)


def key_shape(name: str) -> str:
    return _ID.sub("*", name)


def count_keys(client) -> KeyCount:
    names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in client.scan_iter(count=1000)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.ttl(name)
    ttls = pipe.execute() if names else []
    live = [(n, t) for n, t in zip(names, ttls) if t != -2]  # -2: expired between the SCAN and the TTL
    bindings = [n for n, _ in live if n.startswith("_kombu.binding.")]
    pipe = client.pipeline(transaction=False)
    for name in bindings:
        pipe.scard(name)
    shapes = Counter(key_shape(n) + ("" if t >= 0 else " (no TTL)") for n, t in live)
    return KeyCount(total=int(client.dbsize()), without_ttl=sum(1 for _, t in live if t == -1),
                    with_ttl=sum(1 for _, t in live if t >= 0), max_ttl_s=max((t for _, t in live), default=0),
                    groups=dict(Counter(key_group(n) for n, _ in live)),
                    request_without_ttl=sum(1 for n, t in live if t == -1 and key_group(n) == "request"),
                    binding_members=sum(pipe.execute()) if bindings else 0,
                    standing_names=sorted(n for n, _ in live if key_group(n) == "standing"),
                    shapes=dict(sorted(shapes.items())))


def deployment_singletons() -> set[str]:
    """The deployment-wide keys tasks/keys.py names outright (the KV event log, the router's
    index snapshot and counters, ...): at most one of each, made when first needed."""
    from tasks import keys

    return {v for v in vars(keys).values() if isinstance(v, str) and v.startswith(keys.PREFIX + ":") and "*" not in v}


def _tree_rss_mib(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


_CELERY_NAME = re.compile(r"-n\s+(\S+?)@")


def role_rss_mib(launcher_pid: int) -> dict[str, float]:
    """RSS in MiB of each process the launcher started, with all of its descendants: "frontend"
    (gunicorn and its workers), and each Celery worker by name ("decode0", "router0")."""
    found: dict[str, float] = {}
    for child in psutil.Process(launcher_pid).children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        match = _CELERY_NAME.search(cmdline)
        name = match.group(1) if match else "frontend" if "gunicorn" in cmdline else child.name()
        found[name] = round(found.get(name, 0.0) + _tree_rss_mib(child), 1)
    return dict(sorted(found.items()))


@dataclass
class Snapshot:
    at_s: float  # since the load started (negative: before)
    rss_mib: dict[str, float]
    redis_rss_mib: float
    redis_used_mib: float
    keys: KeyCount


def snapshot(client, launcher_pid: int, origin: float) -> Snapshot:
    memory = client.info("memory")
    return Snapshot(at_s=round(time.monotonic() - origin, 1), rss_mib=role_rss_mib(launcher_pid),
                    redis_rss_mib=round(memory["used_memory_rss"] / 2**20, 1),
                    redis_used_mib=round(memory["used_memory"] / 2**20, 1), keys=count_keys(client))


@dataclass
class Kill:
    at_s: float
    victim: str
    engine_pids: list[int]


@dataclass
class SoakResult:
    sent: int
    completed: int
    refused_429: int
    retried: int
    errors: dict[str, int]
    kills: list[Kill]
    failover_s: float | None
    orphans: int  # engine processes of killed workers still alive at the end
    stuck: bool  # requests still in flight well past their time-out when the load stopped
    load_s: float
    start: Snapshot
    end: Snapshot
    # From the load's end until DBSIZE was back at the start's less its requests' keys (the
    # warm-up's): every request's keys expired. None: not within settle_s.
    keys_settled_s: float | None

    @property
    def new_standing(self) -> list[str]:
        """Standing keys the start did not have, but for the deployment-wide singletons: a
        process's or a worker's key that a replacement made anew (one per kill would be a leak)."""
        return sorted(set(self.end.keys.standing_names) - set(self.start.keys.standing_names)
                      - deployment_singletons())

    @property
    def keys_held(self) -> bool:
        """No new standing key, no more binding members than at the start, and no request key
        without a TTL."""
        start, end = self.start.keys, self.end.keys
        return not self.new_standing and end.binding_members <= start.binding_members and end.request_without_ttl == 0

    @property
    def holds(self) -> bool:
        """Every request not refused with 429 completed, nothing hung, no engine outlived its
        worker, and nothing was left in Redis that will not go by itself."""
        return (self.sent - self.refused_429 == self.completed and not self.stuck and self.orphans == 0
                and self.keys_held)


# -- the run ----------------------------------------------------------------------------------


def _warm_up(base_url: str, client, spec: SoakSpec) -> None:
    """Both workers live, and a first batch of requests served: the start is measured in the
    steady state, not against first uses."""
    wait_for(lambda: len(live_decode(client)) == 2, 300, "two live decode workers")
    load = ClosedLoad(base_url, SoakSpec(**{**asdict(spec), "max_requests": 32, "concurrency": 8})).start()
    if not load.join(120):
        raise TimeoutError("the warm-up did not finish within 120s")
    bad = Counter(o.kind for o in load.outcomes if o.kind != "ok")
    if bad:
        raise RuntimeError(f"the warm-up failed: {dict(bad)}")


def soak(spec: SoakSpec, base_url: str, client, launcher_pid: int, ha: SentinelSet | None = None) -> SoakResult:
    """The soak against a running deployment of two decode workers: ``client`` is a Redis client
    for its database, ``launcher_pid`` the launcher's process, ``ha`` its Sentinel set (the
    failover happens only with one)."""
    _warm_up(base_url, client, spec)
    origin = time.monotonic()
    start = snapshot(client, launcher_pid, origin)
    logger.info("start: %s", start)
    load = ClosedLoad(base_url, spec).start()
    events: list[tuple[float, str]] = [(t, "kill") for t in spec.kill_times_s]
    if ha is not None:
        events.append((spec.failover_at_s, "failover"))
    kills: list[Kill] = []
    failover_s = None
    for at_s, what in sorted(events):
        time.sleep(max(0.0, origin + at_s - time.monotonic()))  # the schedule, not a wait for a condition
        if what == "failover" and ha is not None:
            failover_s = ha.wait_failover(ha.kill_primary())
            logger.info("Redis failover at %.0fs took %.2fs", at_s, failover_s)
            continue
        # The previous victim's replacement first: a kill must leave one worker serving.
        live = wait_for(lambda: (lambda ws: ws if len(ws) == 2 else None)(live_decode(client)), 300,
                        "two live decode workers")
        victim = sorted(live)[len(kills) % 2]
        engines = sigkill_worker(client, live[victim], drop_lease=False, kill_engines=False)
        kills.append(Kill(round(time.monotonic() - origin, 1), victim, [p.pid for p in engines]))
        logger.info("SIGKILLed %s at %.0fs", victim, at_s)
    time.sleep(max(0.0, origin + spec.duration_s - time.monotonic()))  # the load's duration
    stopped = load.stop(spec.request_timeout_s * (spec.retries + 1) + 10)
    load_s = time.monotonic() - origin
    wait_for(lambda: len(live_decode(client)) == 2, 300, "two live decode workers at the end")
    orphans = [pid for k in kills for pid in k.engine_pids if psutil.pid_exists(pid)]
    # A replacement's standing keys come within a beat; then the requests' keys expire and the
    # broker's drain, which takes up to their TTLs.
    before = set(start.keys.standing_names) | deployment_singletons()
    _wait_keys(client, lambda c: set(c.standing_names) <= before, STANDING_WAIT_S)
    baseline = start.keys.total - start.keys.groups.get("request", 0)
    settled_s = _wait_keys(client, lambda c: c.total <= baseline, spec.settle_s)
    end = snapshot(client, launcher_pid, origin)
    logger.info("end: %s", end)
    for pid in orphans:  # ours (our deployment's), and they would hold the CPU the next run needs
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    kinds = Counter(o.kind for o in load.outcomes)
    return SoakResult(sent=len(load.outcomes), completed=kinds.pop("ok", 0), refused_429=kinds.get("HTTP 429", 0),
                      retried=sum(1 for o in load.outcomes if o.retries), errors=dict(kinds), kills=kills,
                      failover_s=failover_s, orphans=len(orphans), stuck=not stopped, load_s=round(load_s, 1),
                      start=start, end=end, keys_settled_s=settled_s)


def _wait_keys(client, done: Callable[[KeyCount], bool], timeout_s: float) -> float | None:
    """Seconds until the key count is ``done``, or None if not within ``timeout_s``."""
    started = time.monotonic()
    while True:
        if done(count_keys(client)):
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started >= timeout_s:
            return None
        time.sleep(1.0)  # polling a count that falls as TTLs run out


def run(spec: SoakSpec, out: Path) -> Path:
    started = MachineState.now()
    sets = spec.deployment_sets()
    if spec.sentinel:
        with SentinelSet(out / "redis") as ha:
            sets |= {"redis_url": ha.redis_url, "redis.sentinel_master": MASTER_NAME}
            with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, sets=sets, name="agg_router") as dep:
                assert dep.process is not None
                result = soak(spec, dep.base_url, dep.redis, dep.process.pid, ha)
    else:
        with LauncherDeployment(CONFIG, out / "logs", spec.redis_db, sets=sets, name="agg_router") as dep:
            assert dep.process is not None
            result = soak(spec, dep.base_url, dep.redis, dep.process.pid)
    finished = MachineState.now()
    write_json(out / "results.json", {"scenario": "soak", "config": CONFIG, "sets": sets, "spec": asdict(spec),
                                      "machine_start": asdict(started), "machine_end": asdict(finished),
                                      "result": asdict(result), "holds": result.holds})
    path = out / "report.md"
    path.write_text(markdown(spec, result, started, finished))
    logger.info("%s", summary(result))
    return path


def summary(r: SoakResult) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "none"
    settled = f"after {r.keys_settled_s:.0f}s" if r.keys_settled_s is not None else "not within the wait"
    k0, k1 = r.start.keys, r.end.keys
    return "\n".join([
        f"soak {'holds' if r.holds else 'FAILS'}: {r.load_s:.0f}s of load, {len(r.kills)} worker kills"
        + (f", Redis failover in {r.failover_s:.2f}s" if r.failover_s is not None else ""),
        f"requests: sent {r.sent}, completed {r.completed}, 429 {r.refused_429}, retried after a 503 {r.retried}",
        f"errors by kind: {errors}; orphaned engine processes: {r.orphans}; stuck: {r.stuck}",
        "RSS MiB start -> end: " + ", ".join(f"{k} {v} -> {r.end.rss_mib.get(k, 0.0)}"
                                              for k, v in r.start.rss_mib.items())
        + f", Redis {r.start.redis_rss_mib} -> {r.end.redis_rss_mib}",
        f"Redis keys start -> end: {k0.by_ttl} -> {k1.by_ttl}; kombu binding members {k0.binding_members} -> "
        f"{k1.binding_members}; new standing keys (but deployment-wide singletons): "
        f"{', '.join(r.new_standing) or 'none'}",
        f"DBSIZE back to the start's less its requests' keys ({k0.total - k0.groups.get('request', 0)}) {settled}"])


def markdown(spec: SoakSpec, r: SoakResult, started: MachineState, finished: MachineState) -> str:
    redis = "a primary, its replica and 3 Sentinels (one failover)" if spec.sentinel else \
        f"the shared Redis (db {spec.redis_db}; its RSS is the whole server's)"
    lines = ["# Soak", "",
             f"`{CONFIG}` (2 decode workers, router) on {redis}; {spec.concurrency} streaming clients in a closed "
             f"loop, {spec.output_len} tokens each, for {spec.duration_s:.0f} s; a decode worker SIGKILLed every "
             f"{spec.kill_every_s:.0f} s; request timeout and stream TTL {spec.request_timeout_s} s.",
             f"Load average at start {started.label}, at end {finished.label}.", "", "```", summary(r), "```", ""]
    lines += table(["", "sent", "completed", "429", "retried (503)", "other errors", "orphans", "stuck"],
                   [["requests", str(r.sent), str(r.completed), str(r.refused_429), str(r.retried),
                     str(sum(v for k, v in r.errors.items() if k != "HTTP 429")), str(r.orphans),
                     "yes" if r.stuck else "no"]])
    names = sorted(set(r.start.rss_mib) | set(r.end.rss_mib))
    lines += table(["RSS MiB", *names, "Redis RSS", "Redis used"],
                   [[label, *(fmt(s.rss_mib.get(n), 1) for n in names), fmt(s.redis_rss_mib, 1),
                     fmt(s.redis_used_mib, 1)] for label, s in (("start", r.start), ("end", r.end))])
    shapes = sorted(set(r.start.keys.shapes) | set(r.end.keys.shapes))
    lines += table(["Redis keys", "start", "end"],
                   [["DBSIZE", str(r.start.keys.total), str(r.end.keys.total)],
                    ["without a TTL", str(r.start.keys.without_ttl), str(r.end.keys.without_ttl)],
                    *([f"group: {g}", str(r.start.keys.groups.get(g, 0)), str(r.end.keys.groups.get(g, 0))]
                      for g in ("standing", "request", "broker")),
                    ["kombu binding members", str(r.start.keys.binding_members), str(r.end.keys.binding_members)],
                    ["with a TTL (longest left, s)", f"{r.start.keys.with_ttl} ({r.start.keys.max_ttl_s})",
                     f"{r.end.keys.with_ttl} ({r.end.keys.max_ttl_s})"]]
                   + [[f"`{s}`", str(r.start.keys.shapes.get(s, 0)), str(r.end.keys.shapes.get(s, 0))]
                      for s in shapes])
    lines += table(["kill at s", "victim"], [[fmt(k.at_s, 0), k.victim] for k in r.kills])
    return "\n".join(lines) + "\n"
