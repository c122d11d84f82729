"""Bad input gets OpenAI's error shape and the right status, and the server stays healthy."""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import fresh_redis_url, make_settings, start_deployment

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def post(base_url: str, path: str, body: bytes | str | dict, headers: dict | None = None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body if isinstance(body, bytes) else body.encode()
    req = urllib.request.Request(f"{base_url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def assert_openai_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("raw", ["{not json", "", "[1, 2", "null"])
def test_malformed_json(deployment, raw):
    assert_openai_error(*post(deployment.base_url, "/chat/completions", raw), 400)


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": "two"}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
])
def test_missing_ill_typed_or_out_of_range(deployment, body, param):
    assert_openai_error(*post(deployment.base_url, "/chat/completions", body), 400, param)


def test_bad_completion_prompt(deployment):
    assert_openai_error(*post(deployment.base_url, "/completions", {"model": MODEL, "prompt": []}), 400, "prompt")
    status, body = post(deployment.base_url, "/completions", {"model": MODEL, "prompt": [10**6]})
    assert "out of range" in assert_openai_error(status, body, 400, "prompt")["message"]


def test_unknown_model_is_404(deployment):
    with pytest.raises(openai.NotFoundError) as e:
        deployment.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        deployment.client().models.retrieve("gpt-9")


def test_prompt_longer_than_context(deployment):
    limit = deployment.settings.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        deployment.client().completions.create(model=MODEL, prompt=[5] * (limit + 10), max_tokens=1)
    assert str(limit) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        deployment.client().completions.create(model=MODEL, prompt=[5] * (limit - 10), max_tokens=100)
    assert str(limit) in e.value.body["message"]


def test_body_too_large_is_413(deployment):
    too_big = deployment.settings.frontend.max_body_bytes + 1024
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * too_big}]}
    assert_openai_error(*post(deployment.base_url, "/chat/completions", body), 413)


def test_unknown_route_and_method(deployment):
    assert_openai_error(*post(deployment.base_url, "/nope", {}), 404)
    try:
        urllib.request.urlopen(f"{deployment.base_url}/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert_openai_error(e.code, json.load(e), 405)
    else:
        pytest.fail("GET on a POST endpoint must fail")


def test_server_still_healthy_after_bad_input(deployment):
    for raw in ["{", "[]", json.dumps({"model": MODEL})]:
        post(deployment.base_url, "/chat/completions", raw)
    out = deployment.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3)
    assert out.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def bare_frontend(tmp_path_factory):
    """A frontend with two API keys and no workers at all."""
    settings = make_settings(fresh_redis_url(), **{"frontend.api_key": "sekrit", "frontend.api_keys.alice": "k-alice"})
    dep = start_deployment(settings, tmp_path_factory.mktemp("bare"), roles="frontend")
    yield dep
    dep.stop()


def test_missing_api_key_is_401(bare_frontend):
    status, body = post(bare_frontend.base_url, "/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(status, body, 401)
    for wrong in ("Bearer k-alic", "Bearer k-alice2", "k-alice", "Basic k-alice"):
        status, body = post(bare_frontend.base_url, "/chat/completions", {"model": MODEL, "messages": []},
                            headers={"Authorization": wrong})
        assert assert_openai_error(status, body, 401)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=bare_frontend.base_url, api_key="wrong", max_retries=0).models.list()


def test_each_api_key_works_under_its_name_alone(bare_frontend):
    for key in ("sekrit", "k-alice"):
        assert openai.OpenAI(base_url=bare_frontend.base_url, api_key=key, max_retries=0).models.list().data
    with urllib.request.urlopen(f"http://127.0.0.1:{bare_frontend.settings.frontend.port}/metrics", timeout=10) as r:
        page = r.read().decode()
    for name in ("default", "alice"):
        assert f'llmq_frontend_api_key_requests_total{{api_key="{name}",status="200"}}' in page
    log = bare_frontend.log()
    assert "API keys: default, alice" in log
    assert "sekrit" not in log and "k-alice" not in log and "sekrit" not in page and "k-alice" not in page


def test_no_live_worker_is_503_quickly(bare_frontend):
    client = bare_frontend.client(timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert e.value.status_code == 503
    assert time.monotonic() - started < 10
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(f"http://127.0.0.1:{bare_frontend.settings.frontend.port}/health", timeout=10)
    assert health.value.code == 503


# -- hostile input: each refused with a 4xx naming the field, none reaching the catch-all --------


def metric(dep, name: str) -> float:
    """One unlabelled sample of the frontend's /metrics (0 before it is first written)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{dep.settings.frontend.port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and not s.labels)


UNHANDLED = "llmq_frontend_unhandled_errors_total"
CHAT_HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_HI = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.fixture
def no_catch_all(deployment):
    """Fails the test if any of its requests reached the frontend's catch-all error handler."""
    before = metric(deployment, UNHANDLED)
    yield
    assert metric(deployment, UNHANDLED) == before, "a request reached the catch-all handler (a bug)"


@pytest.mark.parametrize("field,value", [
    ("seed", 2**64), ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 10**30),
    ("top_k", 2**64), ("top_k", 2**31), ("max_tokens", 2**64), ("min_tokens", 2**64), ("n", 2**64),
    ("stop_token_ids", [2**64]), ("top_logprobs", 2**64), ("temperature", 10**400),
])
def test_out_of_range_integers_are_refused_at_the_schema(deployment, no_catch_all, field, value):
    assert_openai_error(*post(deployment.base_url, "/chat/completions", {**CHAT_HI, field: value}), 400, field)


@pytest.mark.parametrize("body,param", [
    ({**COMPLETION_HI, "seed": 2**64}, "seed"),
    ({**COMPLETION_HI, "top_k": 2**64}, "top_k"),
    ({**COMPLETION_HI, "logprobs": 2**64}, "logprobs"),
    ({**COMPLETION_HI, "prompt": [2**64]}, "prompt"),
    ({**COMPLETION_HI, "prompt": [[1, 2], [2**64]]}, "prompt"),
    ({**COMPLETION_HI, "stop_token_ids": [10**6]}, "stop_token_ids"),  # an int32, but not in the vocabulary
])
def test_out_of_range_completion_integers(deployment, no_catch_all, body, param):
    assert_openai_error(*post(deployment.base_url, "/completions", body), 400, param)


def test_largest_seed_and_top_k_are_served(deployment, no_catch_all):
    """The bounds are the engine's own: a seed of 2**63 - 1 and a top_k past the vocabulary work."""
    status, body = post(deployment.base_url, "/completions",
                        {**COMPLETION_HI, "seed": 2**63 - 1, "top_k": 2**31 - 1, "temperature": 1})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path,raw,param", [
    ("/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages"),
    ("/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": '
                          '[{"type": "text", "text": "\\udfff"}]}]}', "messages"),
    ("/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
                          '"stop": ["\\ud83d"]}', "stop"),
    ("/completions", '{"model": "tiny-llama", "prompt": "\\ud800"}', "prompt"),
    ("/completions", '{"model": "tiny-llama", "prompt": ["ok", "\\udc00"]}', "prompt"),
    ("/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
])
def test_lone_surrogate_is_refused_at_the_schema(deployment, no_catch_all, path, raw, param):
    err = assert_openai_error(*post(deployment.base_url, path, raw), 400, param)
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("raw", [
    "[" * 100_000 + "]" * 100_000,
    '{"a": ' * 100_000 + "1" + "}" * 100_000,
    '{"model": "tiny-llama", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"model": "tiny-llama", "prompt": "hi", "stop": ' + "[" * 5_000 + "]" * 5_000 + "}",
])
def test_deeply_nested_json_is_400(deployment, no_catch_all, raw):
    for path in ("/chat/completions", "/completions"):
        assert "nested too deeply" in assert_openai_error(*post(deployment.base_url, path, raw), 400)["message"]


def test_non_finite_floats_are_400(deployment, no_catch_all):
    for value in ("NaN", "Infinity", "-Infinity"):
        raw = '{"model": "tiny-llama", "prompt": "hi", "max_tokens": 2, "temperature": %s}' % value
        err = assert_openai_error(*post(deployment.base_url, "/completions", raw), 400, "temperature")
        assert "finite" in err["message"]


def test_huge_prompt_is_refused_from_its_size_before_tokenizing(deployment, no_catch_all):
    """900 KB of text, far below the body limit and far over the context: refused from its bytes.
    The frontend's counter of such refusals proves the tokenizer never saw it; prompt tokens are
    counted only for prompts that were tokenized and served."""
    text = "The quick brown fox jumps over the lazy dog. " * 20_000
    assert len(text) > 850_000
    refused = "llmq_frontend_prompts_refused_by_size_total"
    before = metric(deployment, refused)
    for path, body, param in [
        ("/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}, "prompt"),
        ("/completions", {"model": MODEL, "prompt": ["short", text], "max_tokens": 1}, "prompt"),
        ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}, "messages"),
    ]:
        err = assert_openai_error(*post(deployment.base_url, path, body), 400, param)
        assert err["code"] == "context_length_exceeded"
        assert str(deployment.settings.engine.max_model_len) in err["message"]
    assert metric(deployment, refused) == before + 3


def test_chat_message_the_template_trims_is_measured_after_trimming(deployment, no_catch_all):
    """The size is measured on the text the chat template renders: 200 KB of spaces the template
    trims away is a short prompt, not one refused for its bytes."""
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": " " * 200_000 + "hi"}], max_tokens=2)
    assert out.usage.prompt_tokens < 50


def _raw_post(deployment, path: str, body, headers: dict, encode_chunked: bool = False):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", deployment.settings.frontend.port, timeout=60)
    try:
        conn.request("POST", f"/v1{path}", body=body, headers={"Content-Type": "application/json", **headers},
                     encode_chunked=encode_chunked)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def test_chunked_body_over_the_limit_is_413(deployment, no_catch_all):
    limit = deployment.settings.frontend.max_body_bytes
    head = b'{"model": "tiny-llama", "prompt": "'
    filler = b"x" * 65536

    def chunks():
        yield head
        for _ in range(10 * 1024 * 1024 // len(filler)):
            yield filler
        yield b'"}'

    assert 10 * 1024 * 1024 > limit
    status, ctype, raw = _raw_post(deployment, "/completions", chunks(), {"Transfer-Encoding": "chunked"},
                                   encode_chunked=True)
    assert_openai_error(status, json.loads(raw), 413)


def test_chunked_body_within_the_limit_is_served(deployment, no_catch_all):
    body = json.dumps(COMPLETION_HI).encode()
    status, _, raw = _raw_post(deployment, "/completions", iter([body[:10], body[10:]]),
                               {"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] >= 1


def test_oversized_header_is_json_431(deployment, no_catch_all):
    status, ctype, raw = _raw_post(deployment, "/completions", json.dumps(COMPLETION_HI), {"X-Padding": "a" * 10240})
    assert ctype == "application/json"
    assert_openai_error(status, json.loads(raw), 431)
    too_many = {f"X-H{i}": "v" for i in range(120)}
    status, ctype, raw = _raw_post(deployment, "/completions", json.dumps(COMPLETION_HI), too_many)
    assert_openai_error(status, json.loads(raw), 431)


def test_overlong_request_line_is_json_414(deployment, no_catch_all):
    try:
        urllib.request.urlopen(f"{deployment.base_url}/models?{'q' * 5000}", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        assert_openai_error(e.code, json.load(e), 414)
    else:
        pytest.fail("a 5000-byte request line must be refused")


@functools.cache
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _token_ids(deployment, text: str) -> list[int]:
    return _tokenizer(deployment.settings.model.resolved_path).encode(text, add_special_tokens=False)


def test_logit_bias_is_honoured(deployment, no_catch_all):
    client = deployment.client()
    common = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
              "logprobs": 0, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**common)
    greedy = plain.choices[0].logprobs.tokens
    [target] = _token_ids(deployment, " conversation")
    target_text = " conversation"
    assert target_text not in greedy, "pick a token the model does not emit on its own"
    pushed = client.completions.create(**common, logit_bias={str(target): 100})
    assert pushed.choices[0].logprobs.tokens == [target_text] * 4
    # A bias of -100 bans the greedy first token, so the first token changes.
    [first] = _token_ids(deployment, greedy[0])
    banned = client.completions.create(**common, logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != greedy[0]
    # Chat takes it too.
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(target): 100})
    assert chat.choices[0].message.content.strip() == (target_text * 3).strip()


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"-1": 1}, {" 7": 1}, {"7": 101}, {"7": -100.5}, {"7": "1"}, {"99999": 1},
    {"18446744073709551616": 1}, {str(i): 1 for i in range(301)}, [1, 2],
])
def test_invalid_logit_bias_is_400(deployment, no_catch_all, bias):
    assert_openai_error(*post(deployment.base_url, "/completions", {**COMPLETION_HI, "logit_bias": bias}),
                        400, "logit_bias")
