"""Bad input gets OpenAI's error shape and the right status, and the server stays healthy."""

from __future__ import annotations

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
    """A frontend with an API key and no workers at all."""
    settings = make_settings(fresh_redis_url(), **{"frontend.api_key": "sekrit"})
    dep = start_deployment(settings, tmp_path_factory.mktemp("bare"), roles="frontend")
    yield dep
    dep.stop()


def test_missing_api_key_is_401(bare_frontend):
    status, body = post(bare_frontend.base_url, "/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(status, body, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=bare_frontend.base_url, api_key="wrong", max_retries=0).models.list()


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
