"""A burst past admission control: `python -m bench admission`.

One deployment (configs/agg.yaml by default: one decode worker, 4 gunicorn processes of 80
threads). `--burst-size` non-streaming completions are sent at once, each on its own connection,
while one client polls /health and another /metrics, each sequentially, every `--poll-interval-s`;
`--bursts` times, each once the last one's admitted requests are done. The burst's client runs
in a session of its own at `--client-nice` (-10), as do the floor's client and server: on a
2-core machine it shares the CPU with the deployment, and its own waits for the CPU would count
as the server's latency (see _prioritized); 0 runs it as an ordinary process.
It reports how many were answered 200 and 429, the 429s' latency at the client (from each
request's connect to the last byte of its answer), whether every 429 carried Retry-After and
OpenAI's error shape, whether every 200 had all its tokens, the latencies of /health and /metrics
during the burst, the refusals the frontend counted in /metrics, where the frontend refused
(at accept, on gunicorn's main loop, or in the WSGI middleware on a thread) with its own
accept-to-429 time (llmq_frontend_refusal_seconds: the wait in the listen backlog is the
difference from the client's), and the deployment-wide admission set in Redis after the burst
(it must be empty: no leak). `python -m bench.admission --run LABEL=DIR ... --out PNG` plots
the 429s' latency by place in the burst, from results folders.
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
    floor: bool = field(default=True, metadata=help_text(
        "also burst the smallest Python server (a canned 429), with the engine idle and generating"))
    bursts: int = field(default=3, metadata=help_text(
        "bursts against the one deployment, each once the last one's admitted requests are done"))
    client_nice: int = field(default=-10, metadata=help_text(
        "niceness of the burst's client (and the floor's client and server), each in a session of its own; "
        "0: an ordinary process, whose waits for the CPU count in the latencies"))


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
    kept_alive: bool = False  # sent on a connection an earlier probe of the path kept alive


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


REFUSAL = (b'{"error": {"message": "over the limit; retry shortly", "type": "rate_limit_exceeded", '
           b'"param": null, "code": "rate_limit_exceeded"}}')
CANNED_429 = (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Type: application/json\r\n"
              b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(REFUSAL), REFUSAL))


def floor_server(listener: socket.socket) -> None:
    """The smallest Python server that answers a burst: one epoll loop, a canned 429 for each whole
    request (headers plus Content-Length body), no HTTP library. What it takes is a floor for any
    Python frontend on this machine. Runs until killed."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    received: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    received[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            buf = received[conn] = received[conn] + data
            head_end = buf.find(b"\r\n\r\n")
            if data and (head_end < 0 or len(buf) - head_end - 4 < _content_length(buf[:head_end])):
                continue  # not whole yet
            if data:
                try:
                    conn.send(CANNED_429)
                except OSError:
                    pass
            sel.unregister(conn)
            conn.close()
            del received[conn]


def _content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return int(value)
    return 0


def _prioritized(nice: int) -> None:
    """In a process just spawned: its own session at ``nice`` (placement.set_niceness). On 2 cores
    the client shares the CPU with the deployment it measures; at 0, under autogroup, it is one
    session among the frontend's, the gate's, the engine's, Redis's and the prober's, and the time
    it waits to send a request or read an answer counts as the server's. A remote client's does
    not: it runs on another machine. The same is done for the floor, so the two stay comparable."""
    import placement

    if nice:
        os.setsid()
        placement.set_niceness(nice)


def _send_all_at(nice: int, replies, *args) -> None:
    _prioritized(nice)
    replies.put(send_all(*args))


def send_all_prioritized(nice: int, *args) -> list[Reply]:
    """send_all(*args) in a process of its own, at ``nice`` (see _prioritized)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    replies = ctx.Queue()
    proc = ctx.Process(target=_send_all_at, args=(nice, replies, *args), daemon=True)
    proc.start()
    try:
        return replies.get(timeout=args[-1] + 60)
    finally:
        proc.join(timeout=30)


def _floor_server_at(nice: int, listener: socket.socket) -> None:
    _prioritized(nice)
    floor_server(listener)


def _generate(root_url: str, num_requests: int, body: bytes, timeout_s: float) -> None:
    """In a process of its own: `num_requests` completions at once, for the engine to work on."""
    from urllib.parse import urlsplit

    url = urlsplit(root_url)
    send_all(url.hostname or "127.0.0.1", url.port or 80, "/v1/completions", body, num_requests, timeout_s)


def measure_floor(num_requests: int, body: bytes, root_url: str, generating: int, timeout_s: float,
                  client_nice: int = 0) -> dict:
    """The floor server's 429 latencies for a burst of `num_requests`: with the engine idle, then
    while `generating` requests (within the limits) keep it busy. Same client as the real burst,
    at the same niceness, and the server at it too."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
    server = ctx.Process(target=_floor_server_at, args=(client_nice, listener), daemon=True)
    server.start()
    port = listener.getsockname()[1]
    out = {}
    try:
        send_all("127.0.0.1", port, "/v1/completions", body, 1, 60)  # the server is up and serving
        out["idle"] = _latencies_ms(send_all_prioritized(client_nice, "127.0.0.1", port, "/v1/completions", body,
                                                         num_requests, 60))
        load = ctx.Process(target=_generate, args=(root_url, generating, body, timeout_s), daemon=True)
        load.start()
        time.sleep(1.0)  # admitted and prefilled: the engine is decoding
        out["generating"] = _latencies_ms(send_all_prioritized(client_nice, "127.0.0.1", port, "/v1/completions",
                                                               body, num_requests, 60))
        load.join(timeout=timeout_s)
    finally:
        server.kill()
        server.join(timeout=10)
        listener.close()
    return out


def _latencies_ms(replies: list[Reply]) -> dict:
    lat = sorted(r.latency_s * 1000 for r in replies if r.status == 429)
    return {"refused": len(lat), "of": len(replies), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "max_ms": lat[-1] if lat else None}


def _probe_forever(root_url: str, paths: tuple[str, ...], interval_s: float, stop, results) -> None:
    """In a process of its own, so the burst's client does not delay the probes it times: GET
    each path in turn, until `stop` is set, twice: on a new connection (as a load balancer's
    health check does), and on one connection per path kept alive from probe to probe (as
    Prometheus scrapes), opened anew only when the server closed it."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(root_url)
    kept: dict[str, http.client.HTTPConnection] = {}
    while not stop.is_set():
        for path in paths:
            for reuse in (False, True):
                conn = kept.pop(path, None) if reuse else None
                was_open = conn is not None
                sent = time.monotonic()
                try:
                    conn = conn or http.client.HTTPConnection(url.hostname, url.port, timeout=30)
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                    if reuse and not resp.will_close:
                        kept[path] = conn
                    else:
                        conn.close()
                except Exception:  # noqa: BLE001  a probe that got no answer
                    status = 0
                results.put((path, sent, time.monotonic() - sent, status, was_open))
        stop.wait(interval_s)


def burst(root_url: str, num_requests: int, prompt: list[int], max_tokens: int, timeout_s: float,
          poll_interval_s: float = 0.05, probe_paths: tuple[str, ...] = ("/health", "/metrics"),
          client_nice: int = 0) -> tuple[list[Reply], list[Probe]]:
    """`num_requests` completions at once, each on its own connection (as that many independent
    clients would: all in the listen backlog at once), with `probe_paths` timed meanwhile from
    another process. `root_url` has no /v1. With `client_nice`, the client runs in a process of
    its own at that niceness (_prioritized); the prober does not."""
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
        # One whole round first: each path probed once on a new connection and once on its kept-
        # alive one, so both kinds are open before the burst starts.
        raw.extend(results.get(timeout=60) for _ in range(2 * len(probe_paths)))
    started = time.monotonic()
    try:
        url = urlsplit(root_url)
        args = (url.hostname or "127.0.0.1", url.port or 80, "/v1/completions", body, num_requests, timeout_s)
        replies = send_all_prioritized(client_nice, *args) if client_nice else send_all(*args)
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
    return replies, [Probe(path, sent - started, latency, status, kept_alive)
                     for path, sent, latency, status, kept_alive in raw]


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


def _refusal_metrics(text: str) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """The refusals /metrics counted by reason, and the accept-to-429 histogram's cumulative
    buckets (upper bound s, count) by where the refusal was made (accept, wsgi)."""
    from prometheus_client.parser import text_string_to_metric_families

    counters: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "llmq_frontend_refused" and sample.name.endswith("_total"):
                counters[sample.labels["reason"]] = sample.value
            elif family.name == "llmq_frontend_refusal_seconds" and sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels["where"], []).append((float(sample.labels["le"]), sample.value))
    return counters, {where: sorted(b) for where, b in buckets.items()}


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the histogram bucket that holds quantile q (0-1): 'at most this'."""
    total = buckets[-1][1] if buckets else 0
    return next((le for le, count in buckets if count >= q * total), None) if total else None


def server_side(before: dict[str, list[tuple[float, float]]], after: dict[str, list[tuple[float, float]]]) -> dict:
    """Per place of refusal, the burst's count and its accept-to-429 p50 and p99 (bucket bounds, ms)."""
    out = {}
    for where, buckets in after.items():
        prev = dict(before.get(where, []))
        delta = [(le, count - prev.get(le, 0.0)) for le, count in buckets]
        if delta and delta[-1][1]:
            p50, p99 = bucket_quantile(delta, .5), bucket_quantile(delta, .99)
            out[where] = {"count": int(delta[-1][1]), "p50_le_ms": p50 * 1000 if p50 is not None else None,
                          "p99_le_ms": p99 * 1000 if p99 is not None else None}
    return out


def run(spec: AdmissionSpec, out: Path) -> Path:
    import urllib.request

    from tasks import keys

    out.mkdir(parents=True, exist_ok=True)
    sets = dict(item.split("=", 1) for item in spec.sets.split(",") if item)
    machine = MachineState.now()
    bursts = []
    with LauncherDeployment(spec.config, out / "logs", redis_db=spec.redis_db, sets=sets) as dep:
        root = dep.base_url.removesuffix("/v1")
        prompt = [10 + (i * 37) % 1500 for i in range(spec.input_len)]
        # One request first, so the burst measures admission, not a cold engine.
        burst(root, 1, prompt, 4, spec.request_timeout_s, probe_paths=())
        for _ in range(spec.bursts):
            # Every admitted request of the last burst has been answered (send_all reads each to
            # its end); its place in the deployment goes back as its response closes.
            deadline = time.monotonic() + 60
            while dep.redis.zcard(keys.ADMITTED) and time.monotonic() < deadline:
                time.sleep(0.2)
            with urllib.request.urlopen(f"{root}/metrics", timeout=30) as resp:
                _, hist_before = _refusal_metrics(resp.read().decode())
            at_burst = MachineState.now()
            started = time.monotonic()
            replies, probes = burst(root, spec.burst_size, prompt, spec.output_len, spec.request_timeout_s,
                                    spec.poll_interval_s, client_nice=spec.client_nice)
            wall_s = time.monotonic() - started
            with urllib.request.urlopen(f"{root}/metrics", timeout=30) as resp:
                counters, hist_after = _refusal_metrics(resp.read().decode())
            summary = summarize(replies, probes, spec.output_len)
            summary.update(wall_s=wall_s, refused_counters=counters,
                           admitted_set_after=int(dep.redis.zcard(keys.ADMITTED)),
                           server_side=server_side(hist_before, hist_after))
            bursts.append({"at_burst": asdict(at_burst), "summary": summary, "replies": [asdict(r) for r in replies],
                           "probes": [asdict(p) for p in probes]})
            logger.info("burst %d: 200: %d, 429: %d, other: %d; 429 p99 %s ms; /health max %s ms", len(bursts),
                        summary["ok"], summary["refused"], summary["other"], fmt(summary["refused_p99_ms"]),
                        fmt(summary["health"]["max_ms"]))
        floor = {}
        if spec.floor:
            body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": spec.output_len, "ignore_eos": True,
                               "temperature": 0}).encode()
            floor = measure_floor(spec.burst_size, body, root, 150, spec.request_timeout_s, spec.client_nice)
    write_json(out / "results.json", {"spec": asdict(spec), "machine": asdict(machine), "bursts": bursts,
                                      "floor": floor})
    report = out / "report.md"
    report.write_text("\n".join(_report_lines(spec, bursts, floor)))
    return report


def _report_lines(spec: AdmissionSpec, bursts: list[dict], floor: dict) -> list[str]:
    lines = [f"# {len(bursts)} bursts of {spec.burst_size} against {spec.config}", "",
             f"{spec.input_len}-token prompts, max_tokens {spec.output_len} (ignore_eos), non-streaming, one "
             f"connection each; overrides: {spec.sets or 'none'}; the client at niceness {spec.client_nice}"
             f"{' in a session of its own' if spec.client_nice else ''}.", ""]
    lines += table(["burst", "load average", "200 (all tokens)", "429", "other", "429 p50 / p99 / max (ms)",
                    "/health p99 / max (ms)", "/metrics p99 / max (ms)"], [
        [str(i + 1), MachineState(**b["at_burst"]).label, f"{s['ok']} ({s['ok_full_tokens']})", str(s["refused"]),
         str(s["other"]), f"{fmt(s['refused_p50_ms'])} / {fmt(s['refused_p99_ms'])} / {fmt(s['refused_max_ms'])}",
         f"{fmt(s['health']['p99_ms'])} / {fmt(s['health']['max_ms'])}",
         f"{fmt(s['metrics']['p99_ms'])} / {fmt(s['metrics']['max_ms'])}"]
        for i, b in enumerate(bursts) for s in [b["summary"]]])
    for i, b in enumerate(bursts):
        lines += [f"## Burst {i + 1}", ""] + _burst_lines(b["summary"])
    if floor:
        lines += ["The floor: the smallest Python server answering a canned 429 (bench/admission.py, floor_server), "
                  "the same burst from the same client, after ours:", ""]
        lines += table(["floor server, engine", "429s", "p50 (ms)", "p99 (ms)", "max (ms)"], [
            [state, f"{v['refused']} of {v['of']}", fmt(v["p50_ms"]), fmt(v["p99_ms"]), fmt(v["max_ms"])]
            for state, v in floor.items()])
    return lines


def _burst_lines(s: dict) -> list[str]:
    h, m = s["health"], s["metrics"]
    lines = table(["answers", "count"], [
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
    lines += table(["refused at", "count", "accept to 429, p50 at most (ms)", "p99 at most (ms)"], [
        [where, str(v["count"]), fmt(v["p50_le_ms"]), fmt(v["p99_le_ms"])] for where, v in s["server_side"].items()])
    if s["other_examples"]:
        lines += ["Other answers: " + "; ".join(s["other_examples"]), ""]
    lines += [f"The burst took {s['wall_s']:.1f} s from the first request sent to the last answer.", ""]
    return lines


def write_plot(runs: dict[str, Path], path: Path, goal_ms: float = 50.0) -> Path:
    """The 429s' latency against their place in the burst (the n-th request sent), a colour per
    run (label -> results folder) and a line per burst, with the goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for c, (label, folder) in enumerate(runs.items()):
        results = json.loads((folder / "results.json").read_text())
        p99s = ", ".join(fmt(one["summary"]["refused_p99_ms"], 0) for one in results["bursts"])
        for b, one in enumerate(results["bursts"]):
            points = [(i, r["latency_s"] * 1000) for i, r in enumerate(one["replies"]) if r["status"] == 429]
            ax.plot([i for i, _ in points], [ms for _, ms in points], color=f"C{c % 10}", linewidth=0.8,
                    label=f"{label} (p99 per burst: {p99s} ms)" if b == 0 else None)
    ax.axhline(goal_ms, color="black", linestyle="--", linewidth=0.8, label=f"goal: p99 under {goal_ms:g} ms")
    ax.set(xlabel="place in the burst of 800 (n-th request sent)", ylabel="429 latency at the client (ms)",
           title="Refusals during a burst, configs/agg.yaml, a line per burst")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as image:  # a palette of a few colours: under 30 KB, for git
        image.convert("RGB").quantize(colors=32).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.admission",
                                     description="plot the 429s' latency by place in the burst, from results folders")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a run's results folder")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    runs = {label: Path(folder) for label, _, folder in (item.rpartition("=") for item in args.run)}
    print(write_plot(runs, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
