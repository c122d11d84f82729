"""The OpenAI HTTP API: /v1/chat/completions, /v1/completions, /v1/models, vLLM's /tokenize and
/detokenize, /health, and the OpenAPI document of them all. Each route is one ``@endpoint``
line (app/api.py), which validates its body and puts it in the document."""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import redis
from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context

from app import metrics, openapi
from app.api import endpoint
from app.disconnect import client_gone
from app.errors import APIError, BadRequest, ModelNotFound, RedisUnavailable
from app.gateway import Driving, Gateway, Pause, SubRequest
from app.processor import Processor
from app.responses import Choice, Formatter, Usage
from app.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from app.sink import Sink
from tasks.messages import Delta, TokenLogprob
from tasks.registry import live_workers

logger = logging.getLogger(__name__)

bp = Blueprint("openai", __name__)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


def _gateway() -> Gateway:
    return current_app.extensions["llmq.gateway"]


def _processor() -> Processor:
    return current_app.extensions["llmq.processor"]


@bp.before_app_request
def _assign_request_id() -> None:
    g.stage_times = {"recv": time.time()}
    # A caller's own id is kept when it is safe to put in Redis keys and logs. Callers may
    # reuse ids, so the id the engine and Redis see gets a unique suffix; it still starts with
    # the caller's id, so one grep finds every log line about the request.
    given = request.headers.get("X-Request-Id", "")
    if _CLIENT_REQUEST_ID.match(given):
        g.request_id, g.internal_id = given, f"{given}-{uuid.uuid4().hex[:12]}"
    else:
        g.request_id = g.internal_id = uuid.uuid4().hex


@bp.before_app_request
def _count_in_flight() -> None:
    if request.path.startswith("/v1/"):
        metrics.IN_FLIGHT.inc()
        g.in_flight = True


@bp.after_app_request
def _finish(response: Response) -> Response:
    response.headers["X-Request-Id"] = g.get("request_id", "")
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    metrics.REQUESTS.labels(endpoint, str(response.status_code)).inc()
    if key_name := g.get("api_key_name"):
        metrics.KEY_REQUESTS.labels(key_name, str(response.status_code)).inc()
    if g.pop("in_flight", False):
        # A stream is in flight until its last chunk is sent, not when its headers are.
        response.call_on_close(metrics.IN_FLIGHT.dec)
    return response


@endpoint(bp, "GET", "/metrics", summary="Prometheus metrics of this frontend process", response=None,
          content_types=("text/plain",), auth=False)
def prometheus_metrics():
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


@endpoint(bp, "GET", "/metrics/targets", summary="Prometheus HTTP service discovery", response=openapi.Targets,
          auth=False)
def prometheus_targets():
    """Prometheus HTTP service discovery: every live worker's and router's /metrics, so one
    scrape config (configs/prometheus.yml) reaches the whole deployment."""
    groups: dict[str, list[str]] = {}
    for w in live_workers(_gateway().redis):
        if w.metrics_address:
            groups.setdefault(w.role, []).append(w.metrics_address)
    return jsonify([{"targets": sorted(t), "labels": {"role": role}} for role, t in sorted(groups.items())])


def _check_model(name: str) -> None:
    served = current_app.config["LLMQ_SETTINGS"].model.name
    if name != served:
        raise ModelNotFound(f"the model '{name}' does not exist; this deployment serves '{served}'",
                            param="model", code="model_not_found")


# -- endpoints -------------------------------------------------------------------------------


@endpoint(bp, "GET", "/health", summary="Whether Redis answers and every needed role has a live worker",
          response=openapi.Health, other={503: openapi.Health}, auth=False)
def health():
    gateway = _gateway()
    try:
        gateway.redis.ping()
        missing = gateway.missing_roles(use_cache=False)
        roles = gateway.live_roles()
    except redis.RedisError as e:
        return (jsonify({"status": "unhealthy", "reason": f"Redis is unavailable: {e}"}), 503,
                {"Retry-After": str(RedisUnavailable.retry_after_s)})
    if missing:
        return jsonify({"status": "unhealthy", "reason": f"no live {' or '.join(missing)} worker"}), 503
    return jsonify({"status": "ok", "workers": roles.get("decode", 0), "roles": dict(roles)})


@endpoint(bp, "GET", "/v1/models", summary="The served model", response=openapi.ModelList)
def list_models():
    return jsonify({"object": "list", "data": [_model_card()]})


@endpoint(bp, "GET", "/v1/models/<path:model_id>", summary="One model", response=openapi.Model, errors=(404,))
def get_model(model_id: str):
    _check_model(model_id)
    return jsonify(_model_card())


def _model_card() -> dict:
    settings = current_app.config["LLMQ_SETTINGS"]
    return {"id": settings.model.name, "object": "model", "created": current_app.config["LLMQ_STARTED"],
            "owned_by": "llmq", "root": settings.model.resolved_path,
            "max_model_len": settings.engine.max_model_len}


GENERATION_ERRORS = (404, 429, 504)
STREAMABLE = ("application/json", "text/event-stream")


@endpoint(bp, "POST", "/v1/chat/completions", summary="Chat completion", request=ChatCompletionRequest,
          response=openapi.ChatCompletion, content_types=STREAMABLE, errors=GENERATION_ERRORS)
def chat_completions(req: ChatCompletionRequest):
    _stage("parsed")
    _check_model(req.model)
    _check_request_size(req, num_prompts=1)
    prompt = _processor().chat_prompt(req)
    return _generate("chat", req, [prompt])


@endpoint(bp, "POST", "/v1/completions", summary="Completion", request=CompletionRequest,
          response=openapi.Completion, content_types=STREAMABLE, errors=GENERATION_ERRORS)
def completions(req: CompletionRequest):
    _stage("parsed")
    _check_model(req.model)
    _check_request_size(req, num_prompts=_count_prompts(req.prompt))
    prompts = _processor().completion_prompts(req)
    return _generate("completion", req, prompts)


@endpoint(bp, "POST", "/tokenize", summary="Token ids of a prompt or of chat messages, as vLLM's server",
          request=TokenizeRequest, response=openapi.TokenizeResponse, errors=(404,))
def tokenize(req: TokenizeRequest):
    if req.model is not None:
        _check_model(req.model)
    processor = _processor()
    ids = processor.tokenize(req)
    return jsonify({"count": len(ids), "max_model_len": processor.max_model_len, "tokens": ids,
                    "token_strs": processor.token_strings(ids) if req.return_token_strs else None})


@endpoint(bp, "POST", "/detokenize", summary="The text of token ids, as vLLM's server", request=DetokenizeRequest,
          response=openapi.DetokenizeResponse, errors=(404,))
def detokenize(req: DetokenizeRequest):
    if req.model is not None:
        _check_model(req.model)
    return jsonify({"prompt": _processor().detokenize(req.tokens)})


@endpoint(bp, "GET", "/openapi.json", summary="This API's OpenAPI document", response=openapi.OpenAPIDocument,
          auth=False)
def openapi_document():
    return jsonify(openapi.document(current_app.config["LLMQ_SETTINGS"]))


def _count_prompts(prompt: str | list) -> int:
    """A string or a list of token ids is one prompt; a list of either is several."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _check_request_size(req: ChatCompletionRequest | CompletionRequest, num_prompts: int) -> None:
    """Bounds one request's work before anything is tokenized: each choice is an engine sequence."""
    frontend = current_app.config["LLMQ_SETTINGS"].frontend
    if num_prompts > frontend.max_prompts_per_request:
        raise BadRequest(f"this request has {num_prompts} prompts; at most {frontend.max_prompts_per_request} "
                         f"are allowed per request (frontend.max_prompts_per_request)", param="prompt")
    if num_prompts * req.n > frontend.max_choices_per_request:
        raise BadRequest(f"n={req.n} for {num_prompts} prompt(s) asks for {num_prompts * req.n} choices; at most "
                         f"{frontend.max_choices_per_request} are allowed per request "
                         f"(frontend.max_choices_per_request)", param="n")


# -- generation ------------------------------------------------------------------------------


@dataclass
class Generation:
    """One request's engine work, submitted: what /v1/chat/completions, /v1/completions and
    /v1/responses (app/responses_api.py) each shape into their own answer."""

    fmt: Formatter
    req: ChatCompletionRequest | CompletionRequest
    subs: list[SubRequest]
    events: Iterator[tuple[SubRequest, Delta] | Pause]  # closing it cancels whatever still runs
    # Pauses come only while ``driving`` asks for them (a stream's sink, app/sink.py).
    deltas: Iterator[tuple[int, Delta] | Pause]
    usage: Usage
    driving: Driving

    def headers(self, final: bool) -> dict[str, str]:
        return {**_routing_headers(self.subs), **_migration_header(self.subs, final)}

    def whole(self) -> dict:
        """The whole chat or completion body, once every choice has finished."""
        choices: dict[int, Choice] = {}
        for item in self.deltas:
            if isinstance(item, Pause):
                continue
            index, delta = item
            choice = choices.setdefault(index, Choice())
            choice.text += delta.text
            choice.logprobs.extend(delta.logprobs or [])
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        self.usage.cached_tokens = sum(s.finished.num_cached_tokens for s in self.subs if s.finished)
        return self.fmt.response(choices, self.usage)

    def chunks(self, pending: list[tuple[int, Delta]]) -> Iterator[dict | Pause]:
        """The stream's chunk bodies, after ``pending`` (deltas already read), and the Pauses
        ``driving`` asks for. Raises APIError if the request fails mid-stream."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        started: set[int] = set()
        for item in itertools.chain(pending, self.deltas):
            if isinstance(item, Pause):
                yield item
                continue
            index, delta = item
            if self.fmt.chat and index not in started:
                started.add(index)
                yield self.fmt.role_chunk(index, include_usage)
            yield from self.fmt.delta_chunk(index, delta, include_usage)
        if include_usage:
            self.usage.cached_tokens = sum(s.finished.num_cached_tokens for s in self.subs if s.finished)
            yield self.fmt.usage_chunk(self.usage)


def start_generation(kind: str, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                     client_gone: Callable[[], bool] | None) -> Generation:
    """Submits the request's prompts; ``client_gone`` as in Gateway.events."""
    _stage("tokenized")
    processor, gateway = _processor(), _gateway()
    max_tokens = min(processor.max_tokens_for(p, req.requested_max_tokens) for p in prompts)
    spec = processor.sampling(req, max_tokens)
    tools = processor.tools_for(req) if isinstance(req, ChatCompletionRequest) else None
    subs = gateway.submit(g.internal_id, prompts, spec, api_key_name=g.get("api_key_name"))
    _stage("published")
    fmt = Formatter(kind, g.request_id, req.model, want_logprobs=req.num_logprobs is not None, tools=tools)
    usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
    metrics.PROMPT_TOKENS.inc(usage.prompt_tokens)
    driving = Driving()
    events = gateway.events(subs, client_gone=client_gone, driving=driving)
    echoed = _echoed(events, subs, req, prompts) if isinstance(req, CompletionRequest) and req.echo else events
    return Generation(fmt, req, subs, events, _numbered(echoed, usage), usage, driving)


def client_gone_check() -> Callable[[], bool]:
    """For an answer that writes nothing until the end: whether its client hung up."""
    environ = request.environ
    return lambda: client_gone(environ)


def _generate(kind: str, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]]):
    gen = start_generation(kind, req, prompts, client_gone=None if req.stream else client_gone_check())
    if req.stream:
        return _stream(gen)
    return jsonify(gen.whole()), 200, gen.headers(final=True)


# A routing header lists one value per prompt up to this many prompts; past it, each distinct
# value once with its count, so a request of many prompts cannot grow its headers past what
# clients read (aiohttp refuses a header over 8 KB).
ROUTING_HEADER_MAX_VALUES = 16


def _header_values(values: list[str]) -> str:
    """``a,b,a`` for a few prompts; ``a*40,b*24`` (first seen first, at most
    ROUTING_HEADER_MAX_VALUES of them, then ``+N`` prompts not listed) for many."""
    if len(values) <= ROUTING_HEADER_MAX_VALUES:
        return ",".join(values)
    shown = list(Counter(values).items())[:ROUTING_HEADER_MAX_VALUES]
    parts = [f"{value}*{count}" for value, count in shown]
    if rest := len(values) - sum(count for _, count in shown):
        parts.append(f"+{rest}")
    return ",".join(parts)


def _routing_headers(subs: list[SubRequest]) -> dict[str, str]:
    """Where each prompt went and why: one comma-separated value per prompt, in prompt order
    (a single prompt's values are plain), bounded by _header_values for many prompts."""
    def each(value) -> str:
        return _header_values([value(sub) for sub in subs])

    headers = {"X-Worker-Id": each(lambda s: s.routed.worker_id if s.routed else (s.worker_id or ""))}
    if subs[0].routed:
        headers.update({"X-Route-Mode": subs[0].routed.mode,
                        "X-Overlap-Blocks": each(lambda s: str(s.routed.overlap_blocks) if s.routed else ""),
                        "X-Prompt-Blocks": each(lambda s: str(s.routed.prompt_blocks) if s.routed else "")})
    return headers


def _migration_header(subs: list[SubRequest], always: bool) -> dict[str, str]:
    """How many times the request moved to another worker after one died (app/migration.py).
    A stream's headers go out with its first token, so a stream shows only the moves before it."""
    count = sum(s.migrations for s in subs)
    return {"X-Migrations": str(count)} if count or always else {}


def _echoed(events: Iterator[tuple[SubRequest, Delta] | Pause], subs: list[SubRequest], req: CompletionRequest,
            prompts: list[list[int]]) -> Iterator[tuple[SubRequest, Delta] | Pause]:
    """Puts each prompt's text, and with logprobs its tokens' logprobs, before its choices' first
    delta, as vLLM's server echoes; with max_tokens 0 the one token generated is dropped."""
    processor = _processor()
    texts = processor.echo_texts(req, prompts)
    which = {id(sub): i for i, sub in enumerate(subs)}
    started: set[tuple[int, int]] = set()
    for item in events:
        if isinstance(item, Pause):
            yield item
            continue
        sub, delta = item
        if req.echo_only:
            delta = msgspec.structs.replace(delta, text="", token_ids=[],
                                            logprobs=[] if delta.logprobs is not None else None)
        key = (which[id(sub)], delta.index)
        if key not in started:
            started.add(key)
            i = key[0]
            logprobs = delta.logprobs
            if req.num_logprobs is not None:
                # The first prompt token has no logprob: nothing precedes it.
                first = TokenLogprob(prompts[i][0], processor.token_text(prompts[i][0]), None, [])
                logprobs = [first, *(delta.prompt_logprobs or []), *(delta.logprobs or [])]
            delta = msgspec.structs.replace(delta, text=texts[i] + delta.text, logprobs=logprobs)
        yield sub, delta


def _numbered(events: Iterator[tuple[SubRequest, Delta] | Pause], usage: Usage) -> Iterator[tuple[int, Delta] | Pause]:
    """Gives each delta its choice index in the response, and counts completion tokens."""
    for item in events:
        if isinstance(item, Pause):
            yield item
            continue
        sub, delta = item
        usage.completion_tokens += len(delta.token_ids)
        metrics.COMPLETION_TOKENS.inc(len(delta.token_ids))
        yield sub.choice_offset + delta.index, delta


def _stream(gen: Generation) -> Response:
    # Wait for the first delta before answering, so that failures before any output (no worker
    # took it, the engine refused it) still get their own status code rather than a 200 stream.
    first = next(gen.deltas, None)
    assert not isinstance(first, Pause)  # this thread waits: no Pause
    _stage("first")
    request_id = g.internal_id
    environ = request.environ

    def body() -> Iterator[bytes]:
        chunks = gen.chunks([first] if first is not None else [])
        sink: Sink | None = None
        first_out = False
        try:
            for chunk in chunks:
                if isinstance(chunk, Pause):  # only while a sink drives it, which takes its own
                    continue
                yield gen.fmt.sse(chunk)
                if not first_out:
                    first_out = True
                    # gunicorn has sent the headers and the first chunk: the stream reader thread
                    # writes the chunks from here, and this thread waits until it hands the
                    # stream back (its end, an error, a client that does not keep up).
                    sink = Sink.start(environ, chunks, gen.fmt.sse, gen.driving)
                    if sink is not None:
                        sink.park()
        except APIError as e:
            logger.warning("[%s] failed mid-stream: %s", request_id, e.message)
            yield gen.fmt.error_chunk(e.body())
        finally:
            if sink is not None:
                sink.close()
            # Runs when the client disconnects too: closing the event reader cancels the work.
            gen.events.close()  # type: ignore[attr-defined]
        yield gen.fmt.DONE

    return Response(stream_with_context(body()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **gen.headers(final=False),
                             **_stage_header()})


# -- stage times -----------------------------------------------------------------------------
# Where a request's time to first token goes inside the frontend, for `python -m bench stages`:
# a request that sends the header X-Stage-Times gets back, on a stream, the Unix times at which
# the frontend received it, had parsed and validated it, had tokenized it, had published it and
# its output stream, and held its first token. Recording costs a few clock reads a request.

STAGE_HEADER = "X-Stage-Times"


def _stage(name: str) -> None:
    times = g.get("stage_times")
    if times is not None:
        times[name] = time.time()


def _stage_header() -> dict[str, str]:
    if STAGE_HEADER not in request.headers:
        return {}
    return {STAGE_HEADER: ",".join(f"{k}={v:.6f}" for k, v in g.get("stage_times", {}).items())}
