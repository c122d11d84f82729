"""A burst past admission control: `python -m bench admission`.

One deployment (configs/agg.yaml by default: one decode worker, 4 gunicorn processes of 80
threads). `--burst-size` non-streaming completions are sent at once, each on its own connection,
while one client polls /health and another /metrics, each sequentially, every `--poll-interval-s`.
It reports how many were answered 200 and 429, the 429s' latency, whether every 429 carried
Retry-After and OpenAI's error shape, whether every 200 had all its tokens, the latencies of
/health and /metrics during the burst, the refusals the frontend counted in /metrics, and the
deployment-wide admission set in Redis after the burst (it must be empty: no leak).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.deploy import LauncherDeployment
from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import percentile

logger = logging.getLogger(__name__)

MODEL = "tiny-llama"


@dataclass(frozen=True)
class AdmissionSpec:
    """The scenario's knobs; `python -m bench admission`'s flags are generated from these."""

    config: str = field(default="configs/agg.yaml", metadata=help_text("the deployment to measure"))
    burst_size: int = field(default=800, metadata=help_text("requests sent at once"))
    input_len: int = field(default=32, metadata=help_text("prompt length, tokens"))
    output_len: int = field(default=64, metadata=help_text("max_tokens of every request (ignore_eos)"))
    poll_interval_s: float = field(default=0.05, metadata=help_text("pause between /health (and /metrics) calls"))
    request_timeout_s: float = field(default=300.0, metadata=help_text("each request's client timeout"))
    sets: str = field(default="", metadata=help_text("KEY=VALUE[,KEY=VALUE...]: config overrides"))
    redis_db: int = field(default=4, metadata=help_text("Redis database (1-5), flushed before the start"))


@dataclass
class Reply:
    status: int  # 0: no HTTP answer (the error says why)
    latency_s: float
    retry_after: str | None = None
    error_type: str | None = None
    completion_tokens: int | None = None
    error: str = ""


@dataclass
class Probe:
    path: str
    sent_at_s: float  # since the burst started (negative: before it)
    latency_s: float
    status: int


def _parse(raw: bytes, latency_s: float) -> Reply:
    head, _, payload_bytes = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    reply = Reply(status, latency_s, headers.get("retry-after"))
    payload = json.loads(payload_bytes)
    if status == 200:
        reply.completion_tokens = payload["usage"]["completion_tokens"]
    else:
        reply.error_type = (payload.get("error") or {}).get("type")
        reply.error = (payload.get("error") or {}).get("message", "")[:200]
    return reply


def send_all(host: str, port: int, path: str, body: bytes, num_requests: int, timeout_s: float) -> list[Reply]:
    """`num_requests` POSTs, each on a new connection (HTTP/1.1, Connection: close, read to EOF), from
    one epoll loop with no HTTP library: its few microseconds a request, not the client, must not set
    the latencies of hundreds of requests started at once. Each latency runs from the request's
    connect to the last byte of its answer. Answers that arrive while requests are still being sent
    are read every few connects, so an early answer is not timed late."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    sel = selectors.DefaultSelector()
    started = [0.0] * num_requests
    chunks: list[list[bytes]] = [[] for _ in range(num_requests)]
    replies: list[Reply | None] = [None] * num_requests
    pending = 0

    def finish(i: int, sock: socket.socket, error: str = "") -> None:
        nonlocal pending
        latency = time.monotonic() - started[i]
        sel.unregister(sock)
        sock.close()
        pending -= 1
        try:
            replies[i] = Reply(0, latency, error=error) if error else _parse(b"".join(chunks[i]), latency)
        except Exception as e:  # noqa: BLE001  recorded per request
            replies[i] = Reply(0, latency, error=f"{type(e).__name__}: {e}"[:200])

    def pump(wait_s: float) -> None:
        for key, events in sel.select(wait_s):
            sock, i = key.fileobj, key.data
            assert isinstance(sock, socket.socket)
            try:
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(i, sock, f"connect: {os.strerror(err)}")
                        continue
                    sock.send(request)  # a few hundred bytes: the socket's buffer takes them whole
                    sel.modify(sock, selectors.EVENT_READ, i)
                    continue
                data = sock.recv(1 << 16)
            except OSError as e:
                finish(i, sock, f"{type(e).__name__}: {e}")
                continue
            if data:
                chunks[i].append(data)
            else:
                finish(i, sock)

    for i in range(num_requests):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        started[i] = time.monotonic()
        sock.connect_ex((host, port))
        sel.register(sock, selectors.EVENT_WRITE, i)
        pending += 1
        if i % 16 == 15:
            pump(0)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pump(min(1.0, max(0.0, deadline - time.monotonic())))
    for key in list(sel.get_map().values()):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        finish(key.data, sock, f"no answer within {timeout_s:.0f} s")
    sel.close()
    return [r for r in replies if r is not None]


def _probe_forever(root_url: str, paths: tuple[str, ...], interval_s: float, stop, results) -> None:
    """In a process of its own, so the burst's client does not delay the probes it times: GET
    each path in turn, on a new connection each, until `stop` is set."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(root_url)
    while not stop.is_set():
        for path in paths:
            sent = time.monotonic()
            try:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                conn.close()
            except Exception:  # noqa: BLE001  a probe that got no answer
                status = 0
            results.put((path, sent, time.monotonic() - sent, status))
        stop.wait(interval_s)


def burst(root_url: str, num_requests: int, prompt: list[int], max_tokens: int, timeout_s: float,
          poll_interval_s: float = 0.05, probe_paths: tuple[str, ...] = ("/health", "/metrics"),
          ) -> tuple[list[Reply], list[Probe]]:
    """`num_requests` completions at once, each on its own connection (as that many independent
    clients would: all in the listen backlog at once), with `probe_paths` timed meanwhile from
    another process. `root_url` has no /v1."""
    import multiprocessing
    from urllib.parse import urlsplit

    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 0}).encode()
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=_probe_forever, args=(root_url, probe_paths, poll_interval_s, stop, results),
                         daemon=True)
    raw: list[tuple] = []
    if probe_paths:
        prober.start()
        raw.append(results.get(timeout=60))  # the prober is running before the burst starts
    started = time.monotonic()
    try:
        url = urlsplit(root_url)
        replies = send_all(url.hostname or "127.0.0.1", url.port or 80, "/v1/completions", body, num_requests,
                           timeout_s)
    finally:
        stop.set()
        if probe_paths:
            while prober.is_alive() or not results.empty():
                try:
                    raw.append(results.get(timeout=1))
                except queue.Empty:
                    pass
            prober.join(timeout=30)
    # CLOCK_MONOTONIC is one clock for every process of the machine.
    return replies, [Probe(path, sent - started, latency, status) for path, sent, latency, status in raw]


def summarize(replies: list[Reply], probes: list[Probe], max_tokens: int) -> dict:
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    others = [r for r in replies if r.status not in (200, 429)]
    refused_lat = sorted(r.latency_s for r in refused)
    ok_lat = sorted(r.latency_s for r in ok)

    def probe_stats(path: str) -> dict:
        lat = sorted(p.latency_s for p in probes if p.path == path)
        return {"count": len(lat), "p50_ms": percentile(lat, 50) * 1000 if lat else None,
                "p99_ms": percentile(lat, 99) * 1000 if lat else None, "max_ms": lat[-1] * 1000 if lat else None,
                "not_200": sum(p.status != 200 for p in probes if p.path == path)}

    return {
        "ok": len(ok), "refused": len(refused), "other": len(others),
        "other_examples": sorted({f"{r.status} {r.error}" for r in others})[:5],
        "ok_full_tokens": sum(r.completion_tokens == max_tokens for r in ok),
        "refused_with_retry_after": sum(r.retry_after is not None for r in refused),
        "refused_openai_shape": sum(r.error_type == "rate_limit_exceeded" for r in refused),
        "refused_p50_ms": percentile(refused_lat, 50) * 1000 if refused_lat else None,
        "refused_p99_ms": percentile(refused_lat, 99) * 1000 if refused_lat else None,
        "refused_max_ms": refused_lat[-1] * 1000 if refused_lat else None,
        "ok_p50_s": percentile(ok_lat, 50) if ok_lat else None,
        "ok_max_s": ok_lat[-1] if ok_lat else None,
        "health": probe_stats("/health"),
        "metrics": probe_stats("/metrics"),
    }


def _refused_counters(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "llmq_frontend_refused":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["reason"]] = sample.value
    return out


def run(spec: AdmissionSpec, out: Path) -> Path:
    import urllib.request

    from tasks import keys

    out.mkdir(parents=True, exist_ok=True)
    sets = dict(item.split("=", 1) for item in spec.sets.split(",") if item)
    machine = MachineState.now()
    with LauncherDeployment(spec.config, out / "logs", redis_db=spec.redis_db, sets=sets) as dep:
        root = dep.base_url.removesuffix("/v1")
        prompt = [10 + (i * 37) % 1500 for i in range(spec.input_len)]
        # One request first, so the burst measures admission, not a cold engine.
        burst(root, 1, prompt, 4, spec.request_timeout_s, probe_paths=())
        at_burst = MachineState.now()
        started = time.monotonic()
        replies, probes = burst(root, spec.burst_size, prompt, spec.output_len, spec.request_timeout_s,
                                spec.poll_interval_s)
        wall_s = time.monotonic() - started
        with urllib.request.urlopen(f"{root}/metrics", timeout=30) as resp:
            counters = _refused_counters(resp.read().decode())
        left_in_set = int(dep.redis.zcard(keys.ADMITTED))
    summary = summarize(replies, probes, spec.output_len)
    summary.update(wall_s=wall_s, refused_counters=counters, admitted_set_after=left_in_set)
    write_json(out / "results.json", {"spec": asdict(spec), "machine": asdict(machine),
                                      "at_burst": asdict(at_burst), "summary": summary,
                                      "replies": [asdict(r) for r in replies],
                                      "probes": [asdict(p) for p in probes]})
    report = out / "report.md"
    report.write_text("\n".join(_report_lines(spec, summary, at_burst)))
    logger.info("200: %d, 429: %d, other: %d; 429 p99 %s ms; /health max %s ms", summary["ok"], summary["refused"],
                summary["other"], fmt(summary["refused_p99_ms"]), fmt(summary["health"]["max_ms"]))
    return report


def _report_lines(spec: AdmissionSpec, s: dict, at_burst: MachineState) -> list[str]:
    h, m = s["health"], s["metrics"]
    lines = [f"# A burst of {spec.burst_size} against {spec.config}", "",
             f"{spec.input_len}-token prompts, max_tokens {spec.output_len} (ignore_eos), non-streaming, one "
             f"connection each; overrides: {spec.sets or 'none'}. Load average at the burst: {at_burst.label}.", ""]
    lines += table(["answers", "count"], [
        ["200", str(s["ok"])], ["of which with all tokens", str(s["ok_full_tokens"])],
        ["429", str(s["refused"])], ["of which with Retry-After", str(s["refused_with_retry_after"])],
        ["of which type rate_limit_exceeded", str(s["refused_openai_shape"])],
        ["other", str(s["other"])], ["admission set in Redis after", str(s["admitted_set_after"])],
        ["refusals counted in /metrics", ", ".join(f"{k} {v:.0f}" for k, v in s["refused_counters"].items())]])
    lines += table(["latency", "p50", "p99", "max"], [
        ["429 (ms)", fmt(s["refused_p50_ms"]), fmt(s["refused_p99_ms"]), fmt(s["refused_max_ms"])],
        [f"/health (ms, {h['count']} calls, {h['not_200']} not 200)", fmt(h["p50_ms"]), fmt(h["p99_ms"]),
         fmt(h["max_ms"])],
        [f"/metrics (ms, {m['count']} calls, {m['not_200']} not 200)", fmt(m["p50_ms"]), fmt(m["p99_ms"]),
         fmt(m["max_ms"])],
        ["200 (s)", fmt(s["ok_p50_s"], 2), "–", fmt(s["ok_max_s"], 2)]])
    if s["other_examples"]:
        lines += ["Other answers: " + "; ".join(s["other_examples"]), ""]
    lines.append(f"The burst took {s['wall_s']:.1f} s from the first request sent to the last answer.")
    return lines
