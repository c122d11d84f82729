"""Admission control: a burst past the limits gets fast 429s in OpenAI's shape while every admitted
request completes and /health keeps answering; request size caps; and, without a deployment, the
accounting against a scratch Redis and the limits' arithmetic."""

from __future__ import annotations

import io
import json
import threading

import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from app.admission import (
    Admission,
    AdmissionMiddleware,
    DeploymentSlots,
    ProcessSlots,
    Refused,
    deployment_limit,
    process_limit,
)
from app.gunicorn_worker import generation_request, lane_of
from app.routes import ROUTING_HEADER_MAX_VALUES, _count_prompts, _header_values
from config import ConfigError, FrontendConfig, load_settings
from conftest import ROOT, fresh_redis_url, make_settings, start_deployment, wait_for
from tasks import keys

MODEL = "tiny-llama"

# -- the limits' arithmetic ------------------------------------------------------------------


def test_process_limit_leaves_the_reserved_threads():
    assert process_limit(FrontendConfig()) == 80 - 16
    assert process_limit(FrontendConfig(threads=12, reserved_threads=4)) == 8


def test_deployment_limit_scales_with_live_decode_workers():
    assert deployment_limit(192, 1) == 192
    assert deployment_limit(192, 3) == 576
    assert deployment_limit(192, 0) == 0


def test_defaults_refuse_part_of_a_burst_of_800_on_agg():
    settings = load_settings(ROOT / "configs" / "agg.yaml", environ={})
    frontend = settings.frontend
    by_processes = frontend.workers * process_limit(frontend)
    by_workers = deployment_limit(frontend.max_requests_per_decode_worker, settings.workers.num_decode)
    assert min(by_processes, by_workers) < 800
    assert frontend.reserved_threads >= 1


def test_threads_must_outnumber_the_reserved_ones():
    with pytest.raises(ConfigError, match="reserved_threads"):
        load_settings(ROOT / "configs" / "agg.yaml", ["frontend.threads=16", "frontend.reserved_threads=16"],
                      environ={})


# -- the per-process counter -----------------------------------------------------------------


def test_process_slots_never_exceed_the_limit_across_threads():
    slots = ProcessSlots(5)
    peak, lock, barrier = [0], threading.Lock(), threading.Barrier(16)

    def worker():
        barrier.wait()
        for _ in range(200):
            if slots.try_take():
                with lock:
                    peak[0] = max(peak[0], slots.taken)
                slots.give_back()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert 1 <= peak[0] <= 5
    assert slots.taken == 0


# -- the deployment-wide set, against a scratch Redis ----------------------------------------


@pytest.fixture
def scratch(scratch_redis_url) -> redis.Redis:
    client = redis.Redis.from_url(scratch_redis_url)
    client.delete(keys.ADMITTED)
    yield client
    client.delete(keys.ADMITTED)


def test_deployment_slots_admit_up_to_the_limit_and_free_on_give_back(scratch):
    slots = DeploymentSlots(scratch)
    assert slots.try_take("a", 2) == (True, 1)
    assert slots.try_take("b", 2) == (True, 2)
    assert slots.try_take("c", 2) == (False, 2)
    slots.give_back("a")
    assert slots.try_take("c", 2) == (True, 2)
    slots.give_back("b")
    slots.give_back("c")
    assert scratch.zcard(keys.ADMITTED) == 0


def test_a_crashed_frontends_places_lapse(scratch):
    crashed = DeploymentSlots(scratch, lease_s=0.5, renew_every_s=60)  # never renews in time
    assert crashed.try_take("gone", 1)[0]
    alive = DeploymentSlots(scratch)
    assert alive.try_take("new", 1) == (False, 1)
    admitted = wait_for(lambda: alive.try_take("new", 1)[0], timeout_s=10, what="the crashed member's lease to lapse")
    assert admitted
    assert scratch.zrange(keys.ADMITTED, 0, -1) == [b"new"]


def test_renewal_keeps_a_running_requests_place(scratch):
    slots = DeploymentSlots(scratch, lease_s=1.0, renew_every_s=0.2)
    assert slots.try_take("running", 1)[0]
    first = scratch.zscore(keys.ADMITTED, "running")
    assert wait_for(lambda: scratch.zscore(keys.ADMITTED, "running") > first + 0.3, timeout_s=10,
                    what="the renewer to extend the lease")
    slots.give_back("running")
    assert slots.renew() == 0  # nothing left to renew
    assert scratch.zcard(keys.ADMITTED) == 0


def test_concurrent_takers_never_overfill_the_set(scratch):
    limit, admitted, lock = 7, [], threading.Lock()
    barrier = threading.Barrier(12)

    def taker(i: int):
        slots = DeploymentSlots(redis.Redis(connection_pool=scratch.connection_pool))
        barrier.wait()
        for j in range(10):
            ok, count = slots.try_take(f"{i}-{j}", limit)
            assert count <= limit
            if ok:
                with lock:
                    admitted.append(f"{i}-{j}")

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(admitted) == limit == scratch.zcard(keys.ADMITTED)


def _admission(client, workers: int = 1, **frontend) -> Admission:
    return Admission(FrontendConfig(**frontend), client, lambda: workers)


def test_admission_checks_the_process_first_then_the_deployment(scratch):
    admission = _admission(scratch, threads=4, reserved_threads=2, max_requests_per_decode_worker=3)
    tickets = [admission.admit(), admission.admit()]
    with pytest.raises(Refused) as refused:
        admission.admit()
    assert refused.value.reason == "process" and "frontend.reserved_threads" in refused.value.message
    other = _admission(scratch, threads=4, reserved_threads=2, max_requests_per_decode_worker=3)
    tickets.append(other.admit())
    with pytest.raises(Refused) as refused:
        other.admit()
    assert refused.value.reason == "deployment"
    assert "frontend.max_requests_per_decode_worker" in refused.value.message
    assert other.process.taken == 1  # a deployment refusal gives the process slot back
    for ticket in tickets:
        ticket.release()
        ticket.release()  # once only
    assert admission.process.taken == other.process.taken == 0
    assert scratch.zcard(keys.ADMITTED) == 0


def test_a_deployment_refusal_stands_for_the_next_requests_until_a_place_is_given_back(scratch):
    admission = _admission(scratch, threads=8, reserved_threads=2, max_requests_per_decode_worker=1)
    assert admission.refusing() is None
    ticket = admission.admit()
    with pytest.raises(Refused) as refused:
        admission.admit()
    assert admission.refusing() is refused.value  # answered at accept, without Redis
    ticket.release()
    assert admission.refusing() is None
    full = _admission(scratch, threads=2, reserved_threads=1)
    held = full.admit()
    assert full.refusing() is not None and full.refusing().reason == "process"
    held.release()


def test_admission_skips_the_deployment_check_without_workers_or_redis(scratch):
    no_workers = _admission(scratch, workers=0).admit()
    assert no_workers.member is None
    no_workers.release()
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    admission = _admission(dead)
    ticket = admission.admit()
    assert ticket.member is None and admission.process.taken == 1
    ticket.release()
    assert admission.process.taken == 0


# -- the WSGI middleware ---------------------------------------------------------------------


class _App:
    def __init__(self, fail: bool = False):
        self.calls, self.closed, self.fail = 0, 0, fail

    def __call__(self, environ, start_response):
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        start_response("200 OK", [("Content-Type", "text/plain")])
        app = self

        class Body(list):
            def close(self):
                app.closed += 1

        return Body([b"ok"])


def _call(middleware, method="POST", path="/v1/completions", body=b'{"x": 1}'):
    seen = {}

    def start_response(status, headers):
        seen.update(status=status, headers=dict(headers))

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body)}
    result = middleware(environ, start_response)
    return seen, result, environ


def test_middleware_refuses_with_429_in_openais_shape_without_calling_the_app(scratch):
    app = _App()
    admission = _admission(scratch, threads=2, reserved_threads=1)
    middleware = AdmissionMiddleware(app, admission, FrontendConfig(retry_after_s=3))
    seen, result, _ = _call(middleware)
    assert seen["status"] == "200 OK" and app.calls == 1 and admission.process.taken == 1
    refused, body, environ = _call(middleware)
    assert refused["status"].startswith("429") and refused["headers"]["Retry-After"] == "3"
    error = json.loads(b"".join(body))["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "frontend.reserved_threads" in error["message"] and error["param"] is None
    assert app.calls == 1
    assert environ["wsgi.input"].read() == b""  # the body was read and dropped, not parsed
    result.close()  # gunicorn closes the response iterable after the last chunk, or on a disconnect
    assert app.closed == 1 and admission.process.taken == 0
    assert scratch.zcard(keys.ADMITTED) == 0


def test_middleware_leaves_other_paths_alone_and_releases_on_errors(scratch):
    admission = _admission(scratch, threads=2, reserved_threads=1)
    app = _App()
    for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/completions")]:
        seen, _, _ = _call(AdmissionMiddleware(app, admission, FrontendConfig()), method, path)
        assert seen["status"] == "200 OK"
    assert admission.process.taken == 0
    with pytest.raises(RuntimeError):
        _call(AdmissionMiddleware(_App(fail=True), admission, FrontendConfig()))
    assert admission.process.taken == 0 and scratch.zcard(keys.ADMITTED) == 0


# -- bounded requests and headers ------------------------------------------------------------


def test_counting_prompts():
    assert _count_prompts("one") == 1
    assert _count_prompts([1, 2, 3]) == 1
    assert _count_prompts(["a", "b"]) == 2
    assert _count_prompts([[1], [2], [3]]) == 3


def test_routing_headers_stay_bounded():
    few = [f"w{i % 2}" for i in range(ROUTING_HEADER_MAX_VALUES)]
    assert _header_values(few) == ",".join(few)
    many = ["decode0@some-host"] * 600 + ["decode1@some-host"] * 400
    assert _header_values(many) == "decode0@some-host*600,decode1@some-host*400"
    distinct = [str(i) for i in range(1000)]
    value = _header_values(distinct)
    assert value.endswith(f",+{1000 - ROUTING_HEADER_MAX_VALUES}") and len(value) < 200


def test_a_request_refused_at_accept_is_a_whole_generation_post():
    body = b'{"model": "m", "prompt": "hi"}'
    whole = b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert generation_request(whole) == ("/v1/completions", len(whole))
    assert generation_request(whole + b"more") == ("/v1/completions", len(whole))
    assert generation_request(whole[:-1]) is None  # the body is not all there yet
    chat = whole.replace(b"/v1/completions", b"/v1/chat/completions?x=1")
    assert generation_request(chat) == ("/v1/chat/completions", len(chat))
    assert generation_request(whole.replace(b"POST", b"GET")) is None
    assert generation_request(whole.replace(b"/v1/completions", b"/tokenize")) is None
    assert generation_request(whole.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")) is None


def test_probe_lane_is_chosen_from_the_request_line():
    assert lane_of(b"GET /health HTTP/1") == "probe"
    assert lane_of(b"GET /metrics HTTP/") == "probe"
    assert lane_of(b"GET /metrics/targets") == "probe"
    assert lane_of(b"POST /v1/completions") == "ordinary"
    assert lane_of(b"GET /v1/models HTTP") == "ordinary"
    assert lane_of(b"GET /healthz HTTP/1") == "ordinary"
    assert lane_of(b"GET /hea") is None  # wait for the rest
    assert lane_of(None) is None
    assert lane_of(b"") == "ordinary"  # the client closed


# -- a real deployment -----------------------------------------------------------------------

PER_PROCESS = 6
PER_WORKER = 8
BURST = 60
# Long enough that the admitted requests outlast several rounds of the prober's probes.
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def small_limits(model_path, tmp_path_factory):
    """agg.yaml with limits small enough that a burst of 60 passes them: 2 frontend processes
    of 6 generation threads each, 8 requests per decode worker."""
    settings = make_settings(fresh_redis_url(), **{
        "frontend.workers": 2, "frontend.threads": 12, "frontend.reserved_threads": 12 - PER_PROCESS,
        "frontend.max_requests_per_decode_worker": PER_WORKER, "frontend.retry_after_s": 2,
        "frontend.max_prompts_per_request": 4, "frontend.max_choices_per_request": 8})
    dep = start_deployment(settings, tmp_path_factory.mktemp("admission"))
    yield dep
    dep.stop()


def _refusals(dep) -> tuple[float, dict[str, float]]:
    """Refusals counted in /metrics: in all, and by where they were answered."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{dep.settings.frontend.port}/metrics", timeout=10) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    total = sum(s.value for f in families if f.name == "llmq_frontend_refused" for s in f.samples
                if s.name.endswith("_total"))
    where = {s.labels["where"]: s.value for f in families if f.name == "llmq_frontend_refusal_seconds"
             for s in f.samples if s.name.endswith("_count")}
    return total, where


@pytest.mark.integration
def test_a_burst_gets_429s_admitted_requests_complete_and_health_answers(small_limits):
    from bench.admission import burst

    dep = small_limits
    root = f"http://127.0.0.1:{dep.settings.frontend.port}"
    before, where_before = _refusals(dep)
    prompt = [10 + (i * 37) % 1500 for i in range(24)]
    replies, probes = burst(root, BURST, prompt, MAX_TOKENS, timeout_s=180, poll_interval_s=0.05)

    statuses = sorted({r.status for r in replies})
    assert statuses == [200, 429], [r.error for r in replies if r.status not in (200, 429)][:3]
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert all(r.completion_tokens == MAX_TOKENS for r in ok)
    assert all(r.retry_after == "2" and r.error_type == "rate_limit_exceeded" for r in refused)
    assert all("frontend." in r.error for r in refused)  # the message names the limit
    after, where_after = _refusals(dep)
    assert after - before == len(refused)
    # The gate (frontend.gate, on by default) answered most of them itself, in its own process.
    assert dep.settings.frontend.gate
    by_gate = where_after.get("gate", 0) - where_before.get("gate", 0)
    assert by_gate >= len(refused) / 2, (where_before, where_after)

    during = [p for p in probes if p.sent_at_s >= 0]
    assert {p.path for p in during} == {"/health", "/metrics"}
    # Monitors that keep their connection alive (frontend.keepalive_s) get the probe lane too.
    assert {p.path for p in during if p.kept_alive} == {"/health", "/metrics"}
    # A generous bound, to show the probes do not queue behind the burst; speed is for the bench.
    slow = [(p.path, round(p.latency_s, 3), p.status) for p in during if p.status != 200 or p.latency_s > 1.0]
    assert not slow

    # Every admitted request gave its place back: nothing leaks in the deployment-wide set.
    wait_for(lambda: dep.redis.zcard(keys.ADMITTED) == 0, timeout_s=10, what="the admission set to empty")


@pytest.mark.integration
def test_a_stream_keeps_its_place_until_the_client_hangs_up(small_limits):
    dep = small_limits
    stream = dep.client().completions.create(model=MODEL, prompt="Count with me:", max_tokens=1500, stream=True,
                                             extra_body={"ignore_eos": True})
    next(iter(stream))
    assert dep.redis.zcard(keys.ADMITTED) == 1
    stream.close()
    wait_for(lambda: dep.redis.zcard(keys.ADMITTED) == 0, timeout_s=10, what="the stream's place to be freed")


@pytest.mark.integration
def test_too_many_prompts_or_choices_is_a_400_naming_the_field(small_limits):
    client = small_limits.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a prompt"] * 5, max_tokens=1)
    assert e.value.body["param"] == "prompt" and "frontend.max_prompts_per_request" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["a prompt"] * 3, n=3, max_tokens=1)
    assert e.value.body["param"] == "n" and "frontend.max_choices_per_request" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=9, max_tokens=1)
    assert e.value.body["param"] == "n"
    out = client.completions.create(model=MODEL, prompt=["a prompt"] * 4, n=2, max_tokens=2)
    assert len(out.choices) == 8
    assert small_limits.redis.zcard(keys.ADMITTED) == 0


def test_a_kept_ticket_holds_its_places_until_its_last_holder_releases(scratch):
    """A background /v1/responses request keeps its ticket past its HTTP answer (Ticket.keep)."""
    admission = _admission(scratch, threads=4, reserved_threads=2)
    ticket = admission.admit()
    ticket.keep()
    ticket.release()  # the HTTP answer is done
    assert admission.process.taken == 1 and scratch.zcard(keys.ADMITTED) == 1
    ticket.release()  # the background work is done
    ticket.release()  # once only
    assert admission.process.taken == 0 and scratch.zcard(keys.ADMITTED) == 0
