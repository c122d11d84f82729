"""A schema fuzz of both generation endpoints, against the real deployment.

Bodies are drawn from the request schemas' own fields (app/schemas.py), each field either left
out, given a plausible value, or given a hostile one: integers past every bound, lone UTF-16
surrogates, non-finite floats, wrong types, JSON nested thousands deep, and unknown fields. Every
answer must be a 2xx, or a 4xx in OpenAI's error shape; none may be a 5xx, and none may reach the
frontend's catch-all handler, whose counter is read after each request.

Accepted bodies are cheap: max_tokens (and max_completion_tokens) are only ever 1-3 or refused.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.schemas import ChatCompletionRequest, CompletionRequest
from test_bad_input import UNHANDLED, metric

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
VOCAB = 1600  # the tiny model's (scripts/build_tiny_model.py); ids past it are hostile too
EXAMPLES_PER_ENDPOINT = 500

INT_EDGES = [0, -1, 1, 2, 16, 17, 20, 21, VOCAB, 2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1,
             2**64, 10**30, -(10**30), 10**400]
SURROGATES = ["\ud800", "a\udfffb", "\ud83d", "\udc00x", "ok\ud83d\ude00\ud800"]

hostile_ints = st.one_of(st.sampled_from(INT_EDGES), st.integers())
hostile_floats = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -0.0, 5e-324, 2.0000001]),
                           st.floats())
hostile_text = st.one_of(st.text(max_size=20), st.sampled_from(SURROGATES),
                         st.tuples(st.text(max_size=5), st.sampled_from(SURROGATES)).map("".join))
scalars = st.one_of(st.none(), st.booleans(), hostile_ints, hostile_floats, hostile_text)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(hostile_text, inner, max_size=3)),
                    max_leaves=8)
# A placeholder that becomes JSON nested this deep once the body is serialized (json.dumps
# itself cannot nest that deep).
DEEP = "\x00deep:"
deep = st.integers(min_value=200, max_value=100_000).map(lambda n: f"{DEEP}{n}")
hostile = st.one_of(hostile_ints, hostile_floats, hostile_text, junk, deep)

text = st.text(max_size=30)
few_tokens = st.integers(min_value=1, max_value=3)
token_id = st.integers(min_value=0, max_value=VOCAB - 1)
COMMON = {
    "model": st.just(MODEL),
    "max_tokens": few_tokens,
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.one_of(st.integers(-1, 50), st.just(2**31 - 1)),
    "min_tokens": st.integers(0, 3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 2),
    "stop": st.one_of(st.none(), text, st.lists(text, max_size=3)),
    "stop_token_ids": st.lists(token_id, max_size=3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "n": st.integers(1, 4),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(token_id.map(str), st.floats(-100, 100), max_size=4),
    "user": text,
    "metadata": st.dictionaries(st.text(max_size=10), text, max_size=3),
}
message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)),
})
VALID = {
    ChatCompletionRequest: {
        **COMMON,
        "messages": st.lists(message, min_size=1, max_size=3),
        "max_completion_tokens": few_tokens,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "tools": st.one_of(st.none(), st.just([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "boolean"}}}}}])),
        "tool_choice": st.sampled_from(["none", "required", {"type": "function", "function": {"name": "f"}}]),
        "response_format": st.one_of(st.none(), st.just({"type": "text"}), st.just({"type": "json_object"})),
    },
    CompletionRequest: {
        **COMMON,
        "prompt": st.one_of(st.text(min_size=1, max_size=40), st.lists(token_id, min_size=1, max_size=8),
                            st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3),
                            st.lists(st.lists(token_id, min_size=1, max_size=4), min_size=1, max_size=2)),
        "logprobs": st.integers(0, 5),
        "echo": st.booleans(),
        "suffix": st.none(),
        "best_of": st.one_of(st.none(), st.just(1)),
    },
}
# Output budgets take hostile values only outside what would be a costly valid request.
BUDGETS = ("max_tokens", "max_completion_tokens")


def hostile_value(name: str):
    # The edges first: half of the hostile values are an integer edge or a lone surrogate, so
    # each field meets 2**64 and "\ud800" within a few hundred examples.
    value = st.one_of(st.sampled_from(INT_EDGES), st.sampled_from(SURROGATES), hostile)
    if name in BUDGETS:  # past every bound, or refused for its type: never a costly valid budget
        return value.filter(lambda v: not (isinstance(v, int) and 3 < v <= 4096))
    return value


@st.composite
def bodies(draw, model):
    """A body with up to three hostile fields (none, about a third of the time), the rest
    plausible or left out, and now and then unknown fields."""
    names = list(model.model_fields)
    bad = set(draw(st.lists(st.sampled_from(names), max_size=3, unique=True)))
    body = {}
    for name in names:
        valid = VALID[model].get(name)
        if name in bad:
            body[name] = draw(hostile_value(name))
        elif valid is None:
            continue  # a field this fuzz has no plausible value for is only sent hostile
        elif name in ("model", "messages", "prompt"):
            if draw(st.integers(0, 19)) < 19:  # a required field left out, now and then
                body[name] = draw(valid)
        elif name in BUDGETS or draw(st.booleans()):
            body[name] = draw(valid)
    # Plausible fields that need another one get it, unless that one is the hostile one.
    for field, needs in (("stream_options", "stream"), ("top_logprobs", "logprobs")):
        if field in body and field not in bad and needs not in bad:
            body[needs] = True
    unknown = draw(st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in model.model_fields),
                                   junk, max_size=2))
    return {**body, **unknown}


def serialize(body) -> bytes:
    raw = json.dumps(body)  # NaN and Infinity as Python writes them, which its parser takes
    mark = json.dumps(DEEP)[:-1]  # the opening quote and the escaped placeholder
    while mark in raw:
        start = raw.index(mark)
        end = raw.index('"', start + 1)
        depth = int(raw[start + len(mark):end])
        raw = raw[:start] + "[" * depth + "]" * depth + raw[end + 1:]
    return raw.encode()


def request_bodies(model):
    # Now and then (one in ten) the whole body is something other than an object.
    return st.integers(0, 9).flatmap(lambda i: junk if i == 9 else deep if i == 8 else bodies(model))


def send(dep, path: str, body) -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"{dep.base_url}{path}", data=serialize(body), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def check(dep, path: str, body) -> None:
    before = metric(dep, UNHANDLED)
    status, ctype, raw = send(dep, path, body)
    event(f"HTTP {status}")  # shown with --hypothesis-show-statistics
    assert status < 500, (status, raw[:500])
    if status >= 300:
        assert ctype.startswith("application/json"), (status, ctype, raw[:500])
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}, raw[:500]
        assert isinstance(err["message"], str) and err["message"]
        assert 400 <= status < 500
    elif ctype.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", raw[-500:]
        for line in events[:-1]:
            assert "error" not in json.loads(line), line  # a refusal belongs before the 200
    else:
        assert json.loads(raw)["choices"], raw[:500]
    assert metric(dep, UNHANDLED) == before, f"reached the catch-all handler: {status} {raw[:500]!r}"


FUZZ = settings(max_examples=EXAMPLES_PER_ENDPOINT, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.mark.timeout(300)
@FUZZ
@given(body=request_bodies(ChatCompletionRequest))
def test_fuzz_chat_completions(deployment, body):
    check(deployment, "/chat/completions", body)


@pytest.mark.timeout(300)
@FUZZ
@given(body=request_bodies(CompletionRequest))
def test_fuzz_completions(deployment, body):
    check(deployment, "/completions", body)
