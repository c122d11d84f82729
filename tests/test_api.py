"""The OpenAI API through the real stack: openai client -> gunicorn/Flask -> Celery on Redis ->
vLLM worker -> Redis Stream -> back. Each call a user makes in the README works."""

from __future__ import annotations

import json
import urllib.request

import httpx
import pytest

from tasks import keys
from tasks.messages import Failed, encode_event

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
SEED_PROMPT = ("In the heart of Eldoria, an ancient land of boundless magic and mysterious creatures, lies the "
               "long-forgotten city of Aeloria. Once a beacon of knowledge and power, Aeloria was buried beneath "
               "the shifting sands of time, lost to the world for centuries.")


def test_models_list(deployment):
    models = deployment.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert deployment.client().models.retrieve(MODEL).id == MODEL


def test_seed_curl_request(deployment):
    """The curl request of Dynamo's examples, byte for byte in shape, with our model's name."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": SEED_PROMPT}], "stream": False, "max_tokens": 30}
    req = urllib.request.Request(f"{deployment.base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"]
        out = json.load(resp)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 30
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 30


def test_chat_non_streaming(deployment):
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=12, temperature=0.7, top_p=0.9, seed=7)
    assert len(out.choices) == 1
    assert out.choices[0].finish_reason in ("length", "stop")
    assert 1 <= out.usage.completion_tokens <= 12
    # The chat template adds header tokens around both messages.
    assert out.usage.prompt_tokens > 10


def test_chat_streaming_with_usage(deployment):
    stream = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2, "tokens must arrive as several chunks, not one"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_without_usage(deployment):
    chunks = list(deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True))
    assert all(getattr(c, "usage", None) is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def _sse_lines(response: httpx.Response) -> list[str]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line for line in response.iter_lines() if line]


@pytest.mark.parametrize("path,body", [
    ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/completions", {"prompt": "Hi"}),
])
def test_raw_stream_ends_with_done(deployment, path, body):
    # The openai client swallows the terminator; clients that parse SSE by hand stop on it.
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", deployment.base_url + path, json=body, timeout=60) as response:
        lines = _sse_lines(response)
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: {") for line in lines[:-1]), lines
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] >= 1


def test_error_mid_stream_is_a_chunk_then_done(deployment):
    # A failure after the 200 and some tokens can only travel in the stream. It is injected as
    # the worker itself reports one (OutputWriter.fail): a Failed event in the output stream.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1500,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", deployment.base_url + "/chat/completions", json=body, timeout=60) as response:
        # No client id was sent, so the frontend's id is the one in the stream key.
        stream_key = keys.output_stream(response.headers["X-Request-Id"])
        deployment.redis.xadd(stream_key, {"m": encode_event(Failed(503, "service_unavailable", "engine died"))})
        lines = _sse_lines(response)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    # Had the request finished first, its Finished event would have ended the stream normally.
    assert error["message"] == "engine died" and error["type"] == "service_unavailable"


def test_chat_n_choices(deployment):
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=3, temperature=1.0,
        extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 15


def test_chat_logprobs(deployment):
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2,
        temperature=0, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_completion_string_prompt(deployment):
    out = deployment.client().completions.create(model=MODEL, prompt=SEED_PROMPT, max_tokens=8,
                                                 extra_body={"ignore_eos": True})
    assert out.object == "text_completion"
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"


def test_completion_list_of_strings(deployment):
    out = deployment.client().completions.create(model=MODEL, prompt=["First prompt", "A second, longer prompt"],
                                                 max_tokens=6, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12


def test_completion_token_ids(deployment):
    out = deployment.client().completions.create(model=MODEL, prompt=[0, 631, 320, 279, 345], max_tokens=5,
                                                 extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 5


def test_completion_list_of_token_id_lists_streaming(deployment):
    chunks = list(deployment.client().completions.create(
        model=MODEL, prompt=[[0, 631, 320], [0, 279, 345, 12]], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    per_choice = {}
    for c in chunks:
        for choice in c.choices:
            per_choice.setdefault(choice.index, []).append(choice)
    assert sorted(per_choice) == [0, 1]
    assert chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.completion_tokens == 8


def test_completion_logprobs(deployment):
    out = deployment.client().completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2,
                                                 temperature=0, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_string_ends_generation(deployment):
    client = deployment.client()
    free = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = [w for w in free.split(" ") if w]
    assert len(words) >= 2, free
    stop = words[1]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text
    assert free.startswith(out.choices[0].text)


def test_client_request_id_is_kept(deployment):
    resp = deployment.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "trace-abc-123"})
    assert resp.headers["x-request-id"] == "trace-abc-123"
    assert resp.parse().id == "chatcmpl-trace-abc-123"


def test_health(deployment):
    with urllib.request.urlopen(f"http://127.0.0.1:{deployment.settings.frontend.port}/health", timeout=10) as r:
        assert r.status == 200
        assert json.load(r)["workers"] == 1


def test_completion_echo_with_prompt_logprobs(deployment):
    """echo puts the prompt before the completion; with logprobs, the prompt tokens' logprobs
    lead (the first None, as vLLM's server has it), then the completion's."""
    client = deployment.client()
    plain = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0,
                                      logprobs=1, extra_body={"ignore_eos": True})
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True,
                                    logprobs=1, extra_body={"ignore_eos": True})
    prompt_ids = _tokenize(deployment, {"prompt": "Hello there"})["tokens"]
    choice = out.choices[0]
    assert choice.text == "Hello there" + plain.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(prompt_ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[len(prompt_ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-3)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 3
    # Streamed: the first chunk carries the prompt and its logprobs.
    chunks = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0,
                                            echo=True, logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        lp.token_logprobs, abs=1e-3)


def test_completion_echo_without_generation_scores_the_prompt(deployment):
    out = deployment.client().completions.create(model=MODEL, prompt=[[5, 6, 7, 8]], max_tokens=0, echo=True,
                                                 logprobs=0)
    choice = out.choices[0]
    assert choice.text == _detokenize(deployment, [5, 6, 7, 8])
    assert len(choice.logprobs.token_logprobs) == 4 and choice.logprobs.token_logprobs[0] is None
    assert out.usage.completion_tokens == 0
    echoed = deployment.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith("Hi") and echoed.choices[0].logprobs is None


def test_user_and_metadata_are_accepted(deployment):
    client = deployment.client()
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                         user="user-1", metadata={"team": "a"})
    assert out.choices[0].message.content is not None
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user="user-1").choices


def _post(dep, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{dep.settings.frontend.port}{path}", json=body, timeout=30)


def _tokenize(dep, body: dict) -> dict:
    resp = _post(dep, "/tokenize", body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _detokenize(dep, tokens: list[int]) -> str:
    resp = _post(dep, "/detokenize", {"model": MODEL, "tokens": tokens})
    assert resp.status_code == 200, resp.text
    return resp.json()["prompt"]


def test_tokenize_and_detokenize(deployment):
    """vLLM's /tokenize and /detokenize, in its request and answer shapes."""
    got = _tokenize(deployment, {"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) and got["max_model_len"] == 2048
    out = deployment.client().completions.create(model=MODEL, prompt="Hello world", max_tokens=1)
    assert out.usage.prompt_tokens == got["count"]  # the same tokens a completion's prompt has
    bare = _tokenize(deployment, {"prompt": "Hello world", "add_special_tokens": False})["tokens"]
    assert _detokenize(deployment, bare) == "Hello world"
    chat = _tokenize(deployment, {"messages": [{"role": "user", "content": "Hi"}]})
    reply = deployment.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens
    for path, body, param in [("/tokenize", {"model": "other", "prompt": "x"}, "model"),
                              ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
                              ("/detokenize", {"tokens": [10**6]}, "tokens")]:
        resp = _post(deployment, path, body)
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text
