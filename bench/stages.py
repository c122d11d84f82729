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
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import Distribution
from bench.workloads import WorkloadParams, synthetic

logger = logging.getLogger(__name__)

STAGES = ("dispatch", "router_hop", "engine_first", "delivery_first", "ttft", "decode", "delivery_last")



@dataclass(frozen=True)
class StagesSpec:
    """The scenario's knobs; `python -m bench stages`'s flags are generated from these."""

    config: str = field(default="configs/agg.yaml", metadata=help_text("the deployment to measure"))
    concurrency: str = field(default="1,32", metadata=help_text("closed-loop concurrencies"))
    num_requests: int = field(default=64, metadata=help_text("requests per concurrency"))
    input_len: int = field(default=100, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    redis_db: int = field(default=3, metadata=help_text("Redis database (1-5), flushed before the start"))
    seed: int = field(default=0, metadata=help_text("workload seed"))


# -- the arithmetic: pure --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What the client saw of one request, in Unix seconds."""

    request_id: str
    sent: float
    first_chunk: float | None
    end: float | None


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
    return {"dispatch": ms(sent.sent, accepted), "router_hop": ms(routed, accepted),
            "engine_first": ms(accepted, delta), "delivery_first": ms(delta, sent.first_chunk),
            "ttft": ms(sent.sent, sent.first_chunk), "decode": ms(delta, last_delta),
            "delivery_last": ms(finished, sent.end)}


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
                extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": rid})
            async with stream:
                async for chunk in stream:
                    if first is None and chunk.choices:
                        first = time.time()
            done.append(Sent(rid, sent, first, time.time()))
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


def run(spec: StagesSpec, out: Path) -> Path:
    started = MachineState.now()
    points = []
    with LauncherDeployment(spec.config, out / "logs", spec.redis_db, name=Path(spec.config).stem) as dep:
        params = WorkloadParams(input_len_mean=spec.input_len, input_len_std=0.0, output_len_mean=spec.output_len)
        warm = [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens)
                for s in synthetic(random.Random(f"warm:{spec.seed}"), params, 4)]
        asyncio.run(_closed_loop(dep.base_url, warm, 2, "warm-"))
        for i, c in enumerate(int(x) for x in spec.concurrency.split(",")):
            rng = random.Random(f"stages:{spec.seed}:{i}")
            prompts = [(list(s.turns[0].prompt_ids), s.turns[0].max_tokens)
                       for s in synthetic(rng, params, spec.num_requests)]
            machine = MachineState.now()
            logger.info("[c=%d] load average %s", c, machine.label)
            prefix = f"stages-{uuid.uuid4().hex[:6]}-c{c}-"
            sent = asyncio.run(_closed_loop(dep.base_url, prompts, c, prefix))
            rows = [stage_times(s, read_events(dep.redis, s.request_id)) for s in sent]
            points.append({"load": f"c={c}", "machine": asdict(machine), "num_requests": len(sent),
                           "num_failed": sum(s.end is None for s in sent),
                           "stages_ms": {k: asdict(v) for k, v in summarize_stages(rows).items()}})
    finished = MachineState.now()
    body = {"scenario": "stages", "spec": asdict(spec), "machine_start": asdict(started),
            "machine_end": asdict(finished), "points": points}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(spec, body))
    return path


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
             "delivery_last": "Finished written → end of stream at the client"}
    for p in body["points"]:
        pm = p["machine"]
        lines += [f"## {p['load']}", "",
                  f"Load average at its start: {pm['load_1m']:.2f} / {pm['load_5m']:.2f} / {pm['load_15m']:.2f}; "
                  f"{p['num_requests'] - p['num_failed']}/{p['num_requests']} succeeded.", ""]
        rows = [[names[k], str(d["count"]), fmt(d["p50"]), fmt(d["p90"]), fmt(d["p99"]), fmt(d["mean"])]
                for k, d in p["stages_ms"].items() if d["count"]]
        lines += table(["stage (ms)", "n", "p50", "p90", "p99", "mean"], rows)
    return "\n".join(lines)
