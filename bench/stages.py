"""Where a request's time to first token goes, stage by stage: `python -m bench stages`.

Starts a deployment and sends the synthetic workload in a closed loop, each request with its own
`X-Request-Id`. Afterwards it reads each request's output stream from Redis (`llmq:out:<id>-...`,
kept for `workers.stream_ttl_s`). A stream entry's id is the Redis server's clock in milliseconds
when the entry was written, and this client runs on the same machine, so the client's send and
receive times line up with the worker's events to about a millisecond:

    sent ─(dispatch)─> [Routed] ─> Accepted ─(engine)─> first Delta ─(delivery)─> first chunk at the client
                                          ... last Delta, Finished ─(delivery)─> end of the stream

- dispatch: the frontend's parsing and publishing, the Redis queue, the Celery consumer and a task
  thread (and the router task, whose Routed event splits it in two);
- engine: handing the request to the engine's event loop, admission, prefill, the first token,
  and writing it to Redis;
- delivery: the frontend reading the stream and the SSE chunk reaching the client.

The requests also ask the frontend for its own times (the X-Stage-Times header, app/routes.py),
which split those further: http_in (sent → the frontend's Flask handler starts: connect, gunicorn's
accept and HTTP parse), parse (routing, admission, the body's JSON and validation), tokenize,
publish (the task and the stream's wake-up, one Redis round trip when published direct),
queue_pickup (published → Accepted: the Redis queue, Celery's consumer and task thread, the
claim), engine_first as above (the engine's prefill and first token, and its stream write),
frontend_read (the first Delta in Redis → the request thread has it: the stream reader's XREAD
and the hand-off) and sse_write (→ the first chunk at the client: the response's headers and
first chunk, and the client's parse). Entry ids are whole milliseconds, so read the means.

Around each load point it also reads, from /proc, the CPU time of the frontend's processes, of
the decode worker's Celery process (not its engine) and of the Redis server, per output token.
`--publish direct,celery` runs one deployment per way of publishing (frontend.publish), as an A/B
in one run; `--keepalive 5,0` likewise for HTTP keep-alive (frontend.keepalive_s).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.deploy import LauncherDeployment, ProcessInfo
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import Distribution
from bench.workloads import WorkloadParams, synthetic

logger = logging.getLogger(__name__)

STAGES = ("dispatch", "router_hop", "engine_first", "delivery_first", "ttft", "decode", "delivery_last",
          "http_in", "parse", "tokenize", "publish", "queue_pickup", "frontend_read", "sse_write")
# The X-Stage-Times marks, in order (app/routes.py).
FRONTEND_MARKS = ("recv", "parsed", "tokenized", "published", "first")



@dataclass(frozen=True)
class StagesSpec:
    """The scenario's knobs; `python -m bench stages`'s flags are generated from these."""

    config: str = field(default="configs/agg.yaml", metadata=help_text("the deployment to measure"))
    concurrency: str = field(default="1,32", metadata=help_text("closed-loop concurrencies"))
    num_requests: int = field(default=64, metadata=help_text("requests per concurrency"))
    input_len: int = field(default=100, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    redis_db: int = field(default=3, metadata=help_text("Redis database (1-5), flushed before the start"))
    publish: str = field(default="direct", metadata=help_text(
        "frontend.publish values, one deployment each, in this order (direct,celery: the A/B)"))
    keepalive: str = field(default="", metadata=help_text(
        "frontend.keepalive_s values, one deployment each for each publish value (5,0: the A/B of "
        "HTTP keep-alive); empty: the config's"))
    seed: int = field(default=0, metadata=help_text("workload seed"))


# -- the arithmetic: pure --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What the client saw of one request, in Unix seconds."""

    request_id: str
    sent: float
    first_chunk: float | None
    end: float | None
    frontend: dict[str, float] = field(default_factory=dict)  # X-Stage-Times: mark -> Unix s


def parse_stage_header(value: str | None) -> dict[str, float]:
    """``recv=1700000000.123456,parsed=...`` as a dict; {} for a missing header."""
    marks = {}
    for part in (value or "").split(","):
        name, _, at = part.partition("=")
        if at:
            marks[name.strip()] = float(at)
    return marks


def entry_seconds(entry_id: bytes | str) -> float:
    """A Redis stream entry id ("<ms>-<seq>") as Unix seconds."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0]) / 1000


def stage_times(sent: Sent, events: list[tuple[float, str]]) -> dict[str, float | None]:
    """Per stage, in ms, from the client's times and the stream's (seconds, event kind) entries.
    A stage whose ends are missing is None."""
    first = {}
    last_delta = None
    for at, kind in events:
        first.setdefault(kind, at)
        if kind == "delta":
            last_delta = at

    def ms(a, b):
        return None if a is None or b is None else (b - a) * 1000

    routed, accepted, delta, finished = (first.get(k) for k in ("routed", "accepted", "delta", "finished"))
    f = sent.frontend
    return {"dispatch": ms(sent.sent, accepted), "router_hop": ms(routed, accepted),
            "engine_first": ms(accepted, delta), "delivery_first": ms(delta, sent.first_chunk),
            "ttft": ms(sent.sent, sent.first_chunk), "decode": ms(delta, last_delta),
            "delivery_last": ms(finished, sent.end),
            "http_in": ms(sent.sent, f.get("recv")), "parse": ms(f.get("recv"), f.get("parsed")),
            "tokenize": ms(f.get("parsed"), f.get("tokenized")), "publish": ms(f.get("tokenized"), f.get("published")),
            "queue_pickup": ms(f.get("published"), accepted), "frontend_read": ms(delta, f.get("first")),
            "sse_write": ms(f.get("first"), sent.first_chunk)}


def summarize_stages(rows: list[dict[str, float | None]]) -> dict[str, Distribution]:
    return {stage: Distribution.of([r[stage] for r in rows if r.get(stage) is not None]) for stage in STAGES}


# -- measuring ----------------------------------------------------------------------------------------


async def _closed_loop(base_url: str, prompts: list[tuple[list[int], int]], concurrency: int,
                       prefix: str) -> list[Sent]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    queue = list(enumerate(prompts))
    done: list[Sent] = []

    async def one(i: int, prompt: list[int], max_tokens: int) -> None:
        rid = f"{prefix}{i:05d}"
        sent, first = time.time(), None
        try:
            stream = await client.completions.create(
                model="tiny-llama", prompt=prompt, max_tokens=max_tokens, stream=True, temperature=0,
                extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": rid, "X-Stage-Times": "1"})
            async with stream:
                async for chunk in stream:
                    if first is None and chunk.choices:
                        first = time.time()
            done.append(Sent(rid, sent, first, time.time(),
                             parse_stage_header(stream.response.headers.get("X-Stage-Times"))))
        except (openai.OpenAIError, OSError) as e:
            logger.warning("[%s] failed: %s", rid, e)
            done.append(Sent(rid, sent, first, None))

    async def loop() -> None:
        while queue:
            i, (prompt, max_tokens) = queue.pop(0)
            await one(i, prompt, max_tokens)

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        await client.close()
    return done


def read_events(client, request_id: str) -> list[tuple[float, str]]:
    """(seconds, kind) of every entry in the request's output stream(s)."""
    from tasks import keys
    from tasks.messages import decode_event

    events = []
    for key in client.scan_iter(match=keys.output_stream(f"{request_id}-*"), count=1000):
        for entry_id, fields in client.xrange(key):
            event = decode_event(fields[b"m"])
            events.append((entry_seconds(entry_id), type(event).__name__.lower()))
    return sorted(events)


def cpu_groups(tree: list[ProcessInfo]) -> dict[str, list[int]]:
    """The deployment's processes whose CPU is counted: the frontend (gunicorn's master and
    workers), the decode worker's Celery process (its engine's processes are not counted), and
    the Redis server on 127.0.0.1:6379 (shared with whatever else runs: the lock keeps benches and
    tests apart)."""
    groups: dict[str, list[int]] = {"frontend": [], "decode_worker": [], "redis": []}
    for p in tree:
        text = f"{p.name} {p.cmdline}"
        if "gunicorn" in text or "llmq-frontend" in text:
            groups["frontend"].append(p.pid)
        elif "celery" in text and "-Q decode" in text and "VLLM" not in text:
            groups["decode_worker"].append(p.pid)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if (proc.info["name"] or "").startswith("redis-server") and ":6379" in " ".join(proc.info["cmdline"] or []):
            groups["redis"].append(proc.pid)
    return groups


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    total = {}
    for name, pids in groups.items():
        total[name] = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total[name] += t.user + t.system
            except psutil.NoSuchProcess:
                continue
    return total


def run(spec: StagesSpec, out: Path) -> Path:
    started = MachineState.now()
    points = []
    keepalives = [k.strip() for k in spec.keepalive.split(",") if k.strip()] or [None]
    for publish in [p.strip() for p in spec.publish.split(",") if p.strip()]:
        for keepalive in keepalives:
            sets = {"frontend.publish": publish}
            variant = publish
            if keepalive is not None:
                sets["frontend.keepalive_s"] = keepalive
                variant = f"{publish}, keepalive_s {keepalive}"
            name = f"{Path(spec.config).stem}-{publish}" + (f"-ka{keepalive}" if keepalive is not None else "")
            with LauncherDeployment(spec.config, out / "logs", spec.redis_db, sets=sets, name=name) as dep:
                points += _measure(spec, dep, variant)
    finished = MachineState.now()
    body = {"scenario": "stages", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "points": points}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, body))
    return path


def _measure(spec: StagesSpec, dep: LauncherDeployment, publish: str) -> list[dict]:
    points = []
    params = WorkloadParams(input_len_mean=spec.input_len, input_len_std=0.0, output_len_mean=spec.output_len)
    warm = [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens)
            for s in synthetic(random.Random(f"warm:{spec.seed}"), params, 4)]
    asyncio.run(_closed_loop(dep.base_url, warm, 2, "warm-"))
    groups = cpu_groups(dep.process_tree())
    for i, c in enumerate(int(x) for x in spec.concurrency.split(",")):
        rng = random.Random(f"stages:{spec.seed}:{i}")
        prompts = [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens)
                   for s in synthetic(rng, params, spec.num_requests)]
        machine = MachineState.now()
        logger.info("[%s c=%d] load average %s", publish, c, machine.label)
        prefix = f"stages-{uuid.uuid4().hex[:6]}-c{c}-"
        cpu_before, t0 = cpu_seconds(groups), time.monotonic()
        sent = asyncio.run(_closed_loop(dep.base_url, prompts, c, prefix))
        wall_s = time.monotonic() - t0
        cpu = {k: v - cpu_before[k] for k, v in cpu_seconds(groups).items()}
        ok = sum(s.end is not None for s in sent)
        tokens = ok * spec.output_len
        rows = [stage_times(s, read_events(dep.redis, s.request_id)) for s in sent]
        points.append({"load": f"c={c}", "publish": publish, "machine": asdict(machine), "num_requests": len(sent),
                       "num_failed": len(sent) - ok, "wall_s": wall_s, "output_tokens": tokens,
                       "cpu_s": cpu, "cpu_us_per_token": {k: v / tokens * 1e6 if tokens else None
                                                          for k, v in cpu.items()},
                       "stages_ms": {k: asdict(v) for k, v in summarize_stages(rows).items()}})
    return points


def markdown(spec: StagesSpec, body: dict) -> str:
    m = body["machine_start"]
    lines = [f"# Where the time to first token goes: {spec.config}", "",
             f"- started {m['at']}; load average (1/5/15 min) {m['load_1m']:.2f} / {m['load_5m']:.2f} / "
             f"{m['load_15m']:.2f}; {m['num_cpus']} CPUs",
             f"- synthetic prompts of {spec.input_len} tokens, {spec.output_len} output tokens, closed loop, "
             f"{spec.num_requests} requests per concurrency",
             "- times from the client's clock and the Redis stream entry ids (the server's clock, ms) of each "
             "request's output events; see `bench/stages.py` for the stages", ""]
    names = {"dispatch": "dispatch: sent → Accepted (frontend, queue, Celery)",
             "router_hop": "of which Routed → Accepted",
             "engine_first": "engine: Accepted → first Delta written",
             "delivery_first": "delivery: first Delta → client",
             "ttft": "TTFT at the client", "decode": "first → last Delta written",
             "delivery_last": "Finished written → end of stream at the client",
             "http_in": "  http_in: sent → the frontend's handler (connect, accept, HTTP parse)",
             "parse": "  parse: routing, admission, JSON body, validation",
             "tokenize": "  tokenize", "publish": "  publish: task + stream wake-up to Redis",
             "queue_pickup": "  queue_pickup: published → Accepted (queue, Celery consumer, claim)",
             "frontend_read": "  frontend_read: first Delta in Redis → request thread",
             "sse_write": "  sse_write: request thread → first chunk at the client"}
    for p in body["points"]:
        pm = p["machine"]
        per_token = ", ".join(f"{k} {fmt(v, 1)}" for k, v in p.get("cpu_us_per_token", {}).items())
        lines += [f"## {p['load']}, publish: {p.get('publish', 'direct')}", "",
                  f"Load average at its start: {pm['load_1m']:.2f} / {pm['load_5m']:.2f} / {pm['load_15m']:.2f}; "
                  f"{p['num_requests'] - p['num_failed']}/{p['num_requests']} succeeded.", "",
                  f"CPU per output token (µs): {per_token}.", ""]
        rows = [[names[k], str(d["count"]), fmt(d["p50"]), fmt(d["p90"]), fmt(d["p99"]), fmt(d["mean"])]
                for k, d in p["stages_ms"].items() if d["count"]]
        lines += table(["stage (ms)", "n", "p50", "p90", "p99", "mean"], rows)
    return "\n".join(lines)
