"""A remote prefill against a local one, stage by stage: `python -m bench remote-prefill`.

In one run: raw NIXL first (bench/nixl_bandwidth.py, the "deployment" setup, sized for one
prompt), then configs/agg.yaml and configs/disagg.yaml side by side (Redis databases 4 and 5).
Fresh prompts of `--input-len` random token ids go one at a time, alternating between the two
deployments, `--gap-s` apart, so slow drift on the machine falls on both alike. Each request is
sent with its own `X-Request-Id`, and afterwards its time line is put together from:

- the client's clock: sent, first chunk, last chunk;
- its Redis output stream (entry ids are the Redis server's clock, ms): Accepted, first and last
  Delta;
- the deployment's log (every process logs wall-clock times to the ms; vLLM's engine processes
  through the logging config this scenario hands them): the frontend's publish, the decode
  worker's decision and prefill request, the prefill worker's claim, the prefill engine starting
  its WRITE, the decode engine's receive, the prefill worker's PrefillDone.

The same run gives the benchmark model's figure (issue 14, item 1): on agg, the engine's
prefill of a fresh prompt (Accepted -> first Delta) against one decode step at batch 1 ((last
Delta - first Delta) / (tokens - 1)).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from bench.deploy import LauncherDeployment, redis_url_for
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import median

logger = logging.getLogger(__name__)

DEPLOYMENTS = {"agg": ("configs/agg.yaml", 4), "disagg": ("configs/disagg.yaml", 5)}


@dataclass(frozen=True)
class RemotePrefillSpec:
    """The scenario's knobs; `python -m bench remote-prefill`'s flags are generated from these."""

    input_len: int = field(default=2048, metadata=help_text("prompt length, tokens (fresh random ids)"))
    output_len: int = field(default=32, metadata=help_text("max_tokens of every request (ignore_eos)"))
    num_requests: int = field(default=10, metadata=help_text("measured requests per deployment"))
    warmup: int = field(default=2, metadata=help_text("unmeasured long requests per deployment first"))
    gap_s: float = field(default=1.5, metadata=help_text("pause between requests (past vLLM's 1 s reader spin)"))
    connector: str = field(default="push", metadata=help_text("disagg.connector of the disagg deployment"))
    max_model_len: int = field(default=4096, metadata=help_text("engine.max_model_len of both deployments"))
    seed: int = field(default=0, metadata=help_text("prompt seed"))
    model_path: str = field(default="", metadata=help_text("model.path of both deployments (empty: the tiny "
                                                            "model; the benchmark model: "
                                                            "~/.cache/llmq/models/bench-llama)"))
    model_name: str = field(default="tiny-llama", metadata=help_text("model.name of both deployments"))
    redis_port: int = field(default=6379, metadata=help_text("Redis server of both deployments (databases 4 and 5, "
                                                              "flushed); another port: a private redis-server"))
    port: int = field(default=0, metadata=help_text("agg's frontend port, disagg's the next (0: free ports)"))


# -- the time line: pure ------------------------------------------------------------------------

# Log lines that mark a stage, by the process that writes them; each carries the request id
# (vLLM's engine request ids add a suffix, so a mark matches by prefix).
MARKS = {
    "enqueued": r"app\.gateway: \[(?P<rid>[^\]]+)\] enqueued",
    "requested": r"\[(?P<rid>[^\]]+)\] remote prefill of \d+ tokens requested",
    "claimed": r"\[(?P<rid>[^\]]+)\] prefill claimed for",
    "claim_seen": r"\[(?P<rid>[^\]]+)\] prefill claimed by",
    "p_finished": r"\[(?P<rid>[^\]]+)\] finished in the scheduler",
    "write_started": r"\[(?P<rid>[^\]]+)\] writing the KV to",
    "write_posted": r"\[(?P<rid>[^\]]+)\] WRITE posted",
    "notif_drained": r"\[(?P<rid>[^\]]+)\] notification drained",
    "worker_received": r"\[(?P<rid>[^\]]+)\] receive reported by the worker",
    "received": r"\[(?P<rid>[^\]]+)\] push received",
    "scheduled": r"\[(?P<rid>[^\]]+)\] scheduled after its push",
    "write_done": r"\[(?P<rid>[^\]]+)\] WRITE reported done",
    "prefill_done": r"\[(?P<rid>[^\]]+)\] prefill of \d+ tokens for",
    "done_seen": r"\[(?P<rid>[^\]]+)\] PrefillDone from",
}
# The three clocks' formats: the frontend's, Celery's, and ours for vLLM's engine processes.
STAMPS = (re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO"),
          re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO"),
          re.compile(r"VLLM [A-Z]+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})"))
# For vLLM's engine processes: wall-clock times to the ms (its own format has whole seconds).
VLLM_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"ms": {"format": "VLLM %(levelname)s %(asctime)s.%(msecs)03d [%(filename)s:%(lineno)d] "
                                    "%(message)s", "datefmt": "%Y-%m-%d %H:%M:%S"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "ms", "level": "DEBUG",
                         "stream": "ext://sys.stdout"}},
    # Our connector module traces each remote prefill's steps at DEBUG (kvtransfer/nixl_agents.py).
    "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                "vllm.kvtransfer.nixl_agents": {"level": "DEBUG"}},
}


def stamp(line: str) -> float | None:
    """A log line's wall-clock time (local time, as every process logs it), in Unix seconds."""
    for pattern in STAMPS:
        m = pattern.search(line)
        if m:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
    return None


def marks_from_log(lines, request_ids: list[str]) -> dict[str, dict[str, float]]:
    """{request id: {mark: first time seen}} for the given requests."""
    found: dict[str, dict[str, float]] = {rid: {} for rid in request_ids}
    patterns = {k: re.compile(v) for k, v in MARKS.items()}
    for line in lines:
        for mark, pattern in patterns.items():
            m = pattern.search(line)
            if not m:
                continue
            owner = next((rid for rid in request_ids if m.group("rid").startswith(rid)), None)
            at = stamp(line)
            if owner is not None and at is not None:
                found[owner].setdefault(mark, at)
    return found


# Values our connector module logs at DEBUG for a request (kvtransfer/nixl_agents.py).
STEP_AFTER_PUSH = re.compile(r"\[(?P<rid>[^\]]+)\] step after the push: (?P<before>[0-9.]+) ms before it, "
                             r"forward (?P<forward>[0-9.]+) ms")
WRITE_POSTED = re.compile(r"\[(?P<rid>[^\]]+)\] WRITE posted: transfer\(\) (?P<post_ms>[0-9.]+) ms, returned "
                          r"(?P<done>\w+)(?:, (?P<faults>\d+) minor faults)?; with its preparation "
                          r"(?P<prep_ms>[0-9.]+) ms")
WRITE_DONE = re.compile(r"\[(?P<rid>[^\]]+)\] WRITE reported done: NIXL (?P<ms>[0-9.]+) ms \(post (?P<post>[0-9.]+) "
                        r"ms\), (?P<descs>\d+) descriptors")


def traces_from_log(lines, request_ids: list[str]) -> dict[str, dict[str, list[float]]]:
    """{request id: {value: [in log order]}}: the decode engine's steps after the push (engine
    work before each, its forward) and NIXL's telemetry of the WRITE."""
    found: dict[str, dict[str, list[float]]] = {rid: {} for rid in request_ids}
    for line in lines:
        for pattern in (STEP_AFTER_PUSH, WRITE_POSTED, WRITE_DONE):
            m = pattern.search(line)
            owner = m and next((rid for rid in request_ids if m.group("rid").startswith(rid)), None)
            if owner is not None:
                for key, value in m.groupdict().items():
                    if key != "rid" and value is not None:
                        # done: whether transfer() returned DONE, i.e. UCX copied inside it
                        found[owner].setdefault(key, []).append(float(value == "DONE") if key == "done"
                                                                else float(value))
    return found


@dataclass
class Timeline:
    """One request's marks, in Unix seconds."""

    deployment: str
    request_id: str
    sent: float
    first_chunk: float | None = None
    last_chunk: float | None = None
    num_chunks: int = 0
    marks: dict[str, float] = field(default_factory=dict)
    trace: dict[str, list[float]] = field(default_factory=dict)


# (stage, from mark, to mark), in the order a remote prefill passes them.
DISAGG_STAGES = (
    ("dispatch: sent -> Accepted (frontend, queue, Celery)", "sent", "accepted"),
    ("decision, subscribe, publish on `prefill`", "accepted", "requested"),
    ("prefill queue, pickup, checks, claim", "requested", "claimed"),
    ("claim reaches the decode worker", "claimed", "claim_seen"),
    ("prefill engine: queue, compute, to its WRITE", "claimed", "write_started"),
    ("  P: claim -> prefill computed (P's scheduler ends it)", "claimed", "p_finished"),
    ("  P: computed -> its WRITE starts", "p_finished", "write_started"),
    ("  P: WRITE starts -> posted (prepared, transfer() returned)", "write_started", "write_posted"),
    ("WRITE, notify, decode engine receives", "write_started", "received"),
    ("  WRITE starts -> D's writer thread drains its notification", "write_started", "notif_drained"),
    ("  drained -> D's worker reports the receive", "notif_drained", "worker_received"),
    ("  reported -> D's scheduler takes it", "worker_received", "received"),
    ("  (WRITE starts -> P's worker reports it done)", "write_started", "write_done"),
    ("decode engine: first token written", "received", "first_delta"),
    ("  D's scheduler takes it -> schedules the request", "received", "scheduled"),
    ("  scheduled -> first token written to Redis", "scheduled", "first_delta"),
    ("delivery: first Delta -> client", "first_delta", "first_chunk"),
    ("(prefill worker's PrefillDone, after the claim)", "claimed", "prefill_done"),
    # With the first token from the prefill engine, the first Delta comes from PrefillDone,
    # before the decode engine registers: the WRITE and the receive are after it.
    ("(P computed -> the decode worker has PrefillDone)", "p_finished", "done_seen"),
    ("(the decode worker has PrefillDone -> first token in Redis)", "done_seen", "first_delta"),
    ("TTFT", "sent", "first_chunk"),
)
AGG_STAGES = (
    ("dispatch: sent -> Accepted (frontend, queue, Celery)", "sent", "accepted"),
    ("engine: Accepted -> first Delta (local prefill)", "accepted", "first_delta"),
    ("delivery: first Delta -> client", "first_delta", "first_chunk"),
    ("TTFT", "sent", "first_chunk"),
)


def points(t: Timeline) -> dict[str, float]:
    return {"sent": t.sent, **({"first_chunk": t.first_chunk} if t.first_chunk else {}), **t.marks}


def stage_ms(timelines: list[Timeline], stages) -> dict[str, float | None]:
    """Per stage, the median over requests of (to - from) in ms."""
    out = {}
    for name, a, b in stages:
        values = [(p[b] - p[a]) * 1000 for p in map(points, timelines) if a in p and b in p]
        out[name] = median(values)
    return out


def decode_step_ms(t: Timeline, output_len: int) -> float | None:
    first, last = t.marks.get("first_delta"), t.marks.get("last_delta")
    if first is None or last is None or output_len < 2:
        return None
    return (last - first) * 1000 / (output_len - 1)


# -- measuring ----------------------------------------------------------------------------------


def _send(client, model: str, deployment: str, prompt: list[int], max_tokens: int, rid: str) -> Timeline:
    t = Timeline(deployment, rid, time.time())
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True},
                                       extra_headers={"X-Request-Id": rid})
    for chunk in stream:
        if chunk.choices:
            now = time.time()
            t.first_chunk = t.first_chunk or now
            t.last_chunk = now
            t.num_chunks += 1
    return t


def _stream_marks(redis_client, rid: str) -> dict[str, float]:
    from bench.stages import read_events

    marks: dict[str, float] = {}
    for at, kind in read_events(redis_client, rid):
        if kind == "accepted":
            marks.setdefault("accepted", at)
        elif kind == "delta":
            marks.setdefault("first_delta", at)
            marks["last_delta"] = at
    return marks


def _transfer_counters(redis_client) -> tuple[int, float]:
    from tasks.registry import live_workers

    workers = live_workers(redis_client, role="prefill")
    return sum(w.kv_transfer_bytes for w in workers), sum(w.kv_transfer_seconds for w in workers)


def run(spec: RemotePrefillSpec, out: Path) -> Path:
    import openai

    from bench import nixl_bandwidth
    from bench.cache_stats import fresh_leases

    out.mkdir(parents=True, exist_ok=True)
    started = MachineState.now()
    raw = nixl_bandwidth.run(out, ["deployment"], prompt_tokens=spec.input_len)
    raw.pop("markdown")
    logging_config = out / "vllm_logging.json"
    logging_config.write_text(json.dumps(VLLM_LOGGING))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(logging_config)
    rng = random.Random(f"remote-prefill:{spec.seed}")
    sets = {"engine.max_model_len": str(spec.max_model_len), "model.name": spec.model_name}
    if spec.model_path:
        sets["model.path"] = str(Path(spec.model_path).expanduser())
    timelines: list[Timeline] = []
    with contextlib.ExitStack() as stack:
        deps = {}
        for i, (label, (config, db)) in enumerate(DEPLOYMENTS.items()):
            extra = {"disagg.connector": spec.connector} if label == "disagg" else {}
            if spec.redis_port != 6379:
                extra["redis_url"] = redis_url_for(db, port=spec.redis_port)
            deps[label] = stack.enter_context(LauncherDeployment(config, out / "logs", db, sets={**sets, **extra},
                                                                 name=label, port=spec.port and spec.port + i))
        fresh_leases(deps["disagg"].redis, 1, since_unix=0, timeout_s=180, role="prefill")
        clients = {label: openai.OpenAI(base_url=d.base_url, api_key="none", max_retries=0, timeout=120)
                   for label, d in deps.items()}
        prefix = f"rp-{uuid.uuid4().hex[:6]}"

        def prompt() -> list[int]:
            return [rng.randrange(10, 1500) for _ in range(spec.input_len)]

        for i in range(spec.warmup):
            for label in deps:
                _send(clients[label], spec.model_name, label, prompt(), spec.output_len, f"{prefix}-warm{i}-{label}")
                time.sleep(spec.gap_s)
        before = _transfer_counters(deps["disagg"].redis)
        mark = time.time()
        for i in range(spec.num_requests):
            order = list(deps) if i % 2 == 0 else list(reversed(deps))
            for label in order:
                timelines.append(_send(clients[label], spec.model_name, label, prompt(), spec.output_len,
                                       f"{prefix}-{i:03d}-{label}"))
                time.sleep(spec.gap_s)
        fresh_leases(deps["disagg"].redis, 1, since_unix=mark + 0.5, timeout_s=30, role="prefill")
        after = _transfer_counters(deps["disagg"].redis)
        for t in timelines:
            t.marks.update(_stream_marks(deps[t.deployment].redis, t.request_id))
        for label in deps:  # read before the deployments stop, which trims their logs
            lines = (out / "logs" / f"{label}.log").read_text(errors="replace").splitlines()
            mine = [t for t in timelines if t.deployment == label]
            for t, found in zip(mine, marks_from_log(lines, [t.request_id for t in mine]).values()):
                t.marks.update(found)
            for t, values in zip(mine, traces_from_log(lines, [t.request_id for t in mine]).values()):
                t.trace.update(values)
    finished = MachineState.now()
    body = summary(spec, timelines, raw, before, after)
    body.update({"scenario": "remote-prefill", "spec": asdict(spec), "machine_start": asdict(started),
                 "machine_end": asdict(finished), "nixl_raw": raw,
                 "timelines": [asdict(t) for t in timelines]})
    write_json(out / "results.json", body)
    plots = write_plots(timelines, out)
    path = out / "report.md"
    path.write_text(markdown(spec, body, started, finished) + "".join(f"\n![{p}]({p})\n" for p in plots))
    return path


def summary(spec: RemotePrefillSpec, timelines: list[Timeline], raw: dict, before: tuple[int, float],
            after: tuple[int, float]) -> dict:
    agg = [t for t in timelines if t.deployment == "agg" and t.first_chunk]
    dis = [t for t in timelines if t.deployment == "disagg" and t.first_chunk]
    remote = [t for t in dis if "received" in t.marks]
    agg_ttft = median([(t.first_chunk - t.sent) * 1000 for t in agg])
    dis_ttft = median([(t.first_chunk - t.sent) * 1000 for t in remote])
    prefill = median([(t.marks["first_delta"] - t.marks["accepted"]) * 1000 for t in agg
                      if "first_delta" in t.marks and "accepted" in t.marks])
    step = median([decode_step_ms(t, spec.output_len) for t in agg])

    def traced(key: str, first: bool = True) -> float | None:
        """Median over the remote prefills of a traced value: its first one, or all the later ones."""
        if first:
            return median([t.trace[key][0] for t in remote if t.trace.get(key)])
        return median([v for t in remote for v in t.trace.get(key, [])[1:]])
    moved, seconds = after[0] - before[0], after[1] - before[1]
    cases = raw["setups"]["deployment"]["cases"]
    kv_rate = moved / seconds / 1e9 if seconds > 0 else None
    per_prefill = moved / len(remote) if remote else None
    posts = [t.trace["post_ms"][0] for t in remote if t.trace.get("post_ms")]
    post_ms = median(posts)
    # The WRITE on P's writer thread, post to completion, when transfer() itself completed it.
    writer_rate = per_prefill / post_ms / 1e6 if per_prefill and post_ms else None
    return {
        "num_agg_ok": len(agg), "num_disagg_ok": len(dis), "num_remote": len(remote),
        "agg_stages_ms": stage_ms(agg, AGG_STAGES), "disagg_stages_ms": stage_ms(remote, DISAGG_STAGES),
        "ttft_ms": {"agg": agg_ttft, "disagg": dis_ttft,
                    "difference": None if agg_ttft is None or dis_ttft is None else dis_ttft - agg_ttft},
        "decode_engine_ms": {
            "decode step, agg (from its stream)": step,
            "decode step, disagg (from its stream)": median([decode_step_ms(t, spec.output_len) for t in remote]),
            "first step after the push: engine work before it": traced("before"),
            "first step after the push: forward": traced("forward"),
            "next steps: engine work before each": traced("before", first=False),
            "next steps: forward": traced("forward", first=False),
            "WRITE, NIXL's telemetry (transfer)": traced("ms"),
            "WRITE, NIXL's telemetry (post)": traced("post"),
            "WRITE, descriptors after NIXL merged them": traced("descs"),
            "WRITE on P's writer: transfer() (post to return)": post_ms,
            "WRITE on P's writer: with the preparation": traced("prep_ms"),
            "WRITE on P's writer: minor page faults in transfer()": traced("faults"),
            "WRITE on P's writer: share returned DONE": median([t.trace["done"][0] for t in remote
                                                                  if t.trace.get("done")]),
        },
        "model": {"prefill_ms": prefill, "decode_step_ms": step,
                  "ratio": prefill / step if prefill and step else None},
        "transfer": {"bytes": moved, "seconds": seconds, "gbytes_per_s": kv_rate,
                     "bytes_per_prefill": per_prefill,
                     "writer_post_ms": {"median": post_ms, "min": min(posts, default=None),
                                        "max": max(posts, default=None)},
                     "writer_gbytes_per_s": writer_rate,
                     "raw": {c["name"]: c["gbytes_per_s"] for c in cases},
                     "ratio_to_raw": {c["name"]: kv_rate / c["gbytes_per_s"] if kv_rate else None for c in cases},
                     "writer_ratio_to_raw": {c["name"]: writer_rate / c["gbytes_per_s"] if writer_rate else None
                                             for c in cases}},
    }


def markdown(spec: RemotePrefillSpec, body: dict, started: MachineState, finished: MachineState) -> str:
    ttft, model, tr = body["ttft_ms"], body["model"], body["transfer"]
    lines = [f"# A remote prefill against a local one: {spec.input_len}-token prompts, {spec.model_name}", "",
             f"- started {started.at}; `uptime` at the start: `{started.uptime}`; at the end: `{finished.uptime}`",
             f"- fresh prompts of {spec.input_len} random token ids, {spec.output_len} output tokens, one at a time, "
             f"alternating agg and disagg ({spec.connector}), {spec.gap_s} s apart; {spec.num_requests} each",
             f"- agg: {body['num_agg_ok']} answered; disagg: {body['num_disagg_ok']} answered, "
             f"{body['num_remote']} of them prefilled remotely (the stages are theirs)", "",
             "## TTFT, medians", ""]
    lines += table(["", "ms"], [["agg (local prefill)", fmt(ttft["agg"])],
                                ["disagg (remote prefill)", fmt(ttft["disagg"])],
                                ["disagg - agg", fmt(ttft["difference"])]])
    lines += ["## Stages of a remote prefill (disagg), medians", ""]
    lines += table(["stage", "ms"], [[k, fmt(v)] for k, v in body["disagg_stages_ms"].items()])
    lines += ["## The decode engine's steps after the push, and the WRITE (medians, ms)", ""]
    lines += table(["", "value"], [[k, fmt(v, 2)] for k, v in body["decode_engine_ms"].items()])
    lines += ["## Stages of a local prefill (agg), medians", ""]
    lines += table(["stage", "ms"], [[k, fmt(v)] for k, v in body["agg_stages_ms"].items()])
    lines += ["## The KV transfer against raw NIXL (same run)", ""]
    lines += table(["", "value"], [["bytes moved (prefill worker)", f"{tr['bytes']:,}"],
                                   ["bytes per remote prefill", fmt(tr["bytes_per_prefill"], 0)],
                                   ["summed transfer time (NIXL's telemetry, vLLM's stats), s", fmt(tr["seconds"], 4)],
                                   ["KV GB/s, vLLM's stats", fmt(tr["gbytes_per_s"], 3)],
                                   ["P's writer: transfer() ms, median (min-max)",
                                    f"{fmt(tr['writer_post_ms']['median'], 3)} ({fmt(tr['writer_post_ms']['min'], 3)}"
                                    f"-{fmt(tr['writer_post_ms']['max'], 3)})"],
                                   ["KV GB/s, P's writer (bytes per prefill / median transfer())",
                                    fmt(tr["writer_gbytes_per_s"], 3)]]
                   + [[f"raw NIXL, {name}: GB/s (stats / raw; writer / raw)",
                       f"{fmt(rate, 2)} ({fmt(tr['ratio_to_raw'][name], 2)}; "
                       f"{fmt(tr['writer_ratio_to_raw'][name], 2)})"]
                      for name, rate in tr["raw"].items()])
    lines += ["## The benchmark model (agg, batch 1)", ""]
    lines += table(["", "value"], [[f"engine prefill of {spec.input_len} fresh tokens, ms", fmt(model["prefill_ms"])],
                                   ["one decode step, ms", fmt(model["decode_step_ms"], 2)],
                                   ["prefill / decode step", fmt(model["ratio"])]])
    return "\n".join(lines)


# The stacked bars of the stages plot: (label, from mark, to mark).
AGG_BARS = (("dispatch", "sent", "accepted"), ("engine: local prefill, first token", "accepted", "first_delta"),
            ("delivery", "first_delta", "first_chunk"))
DISAGG_BARS = (("dispatch", "sent", "accepted"), ("decision, publish, claim", "accepted", "claimed"),
               ("P: queue, prefill, to its WRITE", "claimed", "write_started"),
               ("WRITE, notify, D receives", "write_started", "received"),
               ("D: first token", "received", "first_delta"), ("delivery", "first_delta", "first_chunk"))


def write_plots(timelines: list[Timeline], out: Path) -> list[str]:
    """ttft_cdf.png: TTFT CDF, local (agg) against remote (disagg) prefills; stages.png: each
    deployment's median stages, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"agg (local prefill)": [t for t in timelines if t.deployment == "agg" and t.first_chunk],
              "disagg (remote prefill)": [t for t in timelines if t.deployment == "disagg" and t.first_chunk
                                          and "received" in t.marks]}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, mine) in enumerate(groups.items()):
        ttfts = sorted((t.first_chunk - t.sent) * 1000 for t in mine)
        if ttfts:
            ax.step(ttfts, [(k + 1) / len(ttfts) for k in range(len(ttfts))], where="post", color=f"C{i}",
                    label=f"{label}, n={len(ttfts)}")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF, one request at a time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=80)
    plt.close(fig)

    bars = {label: [(name, stage_ms(mine, [(name, a, b)])[name] or 0.0) for name, a, b in stages]
            for (label, mine), stages in zip(groups.items(), (AGG_BARS, DISAGG_BARS))}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colours = {}
    for y, stages in enumerate(bars.values()):
        left = 0.0
        for label, ms in stages:
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            ax.barh(y, ms, left=left, color=colour, label=label if label not in ax.get_legend_handles_labels()[1]
                    else None)
            left += ms
    ax.set_yticks(range(len(bars)), list(bars))
    ax.set(xlabel="ms (medians of each stage)", title="Where a first token's time goes")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.savefig(out / "stages.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return ["ttft_cdf.png", "stages.png"]
