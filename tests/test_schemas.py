"""Request parsing: OpenAI bodies validate, and each problem becomes a 400 naming the field."""

import pytest

from app.errors import BadRequest
from app.schemas import ChatCompletionRequest, CompletionRequest, parse

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bad(model, body, field):
    with pytest.raises(BadRequest) as e:
        parse(model, body)
    assert e.value.status == 400
    assert e.value.param == field, e.value.message
    return e.value


def test_minimal_chat():
    req = parse(ChatCompletionRequest, CHAT)
    assert req.requested_max_tokens is None and req.n == 1 and not req.stream


def test_max_completion_tokens_wins():
    req = parse(ChatCompletionRequest, {**CHAT, "max_tokens": 5, "max_completion_tokens": 7})
    assert req.requested_max_tokens == 7


def test_content_parts_are_joined():
    req = parse(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text == "ab"


@pytest.mark.parametrize("field,value", [
    ("temperature", 3), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0),
    ("max_tokens", 0), ("top_k", -2), ("presence_penalty", 5), ("stop", 7), ("messages", []),
    ("model", None), ("stream", "yes"),
])
def test_out_of_range_chat_fields(field, value):
    bad(ChatCompletionRequest, {**CHAT, field: value}, field)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "5"), ("max_tokens", 5.0), ("temperature", "0.5"), ("top_p", "1"), ("top_k", 2.0),
    ("n", True), ("seed", "7"), ("presence_penalty", "0"), ("stop_token_ids", ["2"]),
    ("max_completion_tokens", 3.0), ("top_logprobs", "2"),
])
def test_ill_typed_numbers_are_refused_not_converted(field, value):
    bad(ChatCompletionRequest, {**CHAT, field: value}, field)


def test_floats_take_integers_as_openai_does():
    req = parse(ChatCompletionRequest, {**CHAT, "temperature": 1, "top_p": 1, "presence_penalty": -1})
    assert (req.temperature, req.top_p, req.presence_penalty) == (1.0, 1.0, -1.0)
    assert isinstance(req.temperature, float)


@pytest.mark.parametrize("prompt", [[1.0, 2.0], [["1"]], [[1, True]]])
def test_token_ids_must_be_integers(prompt):
    bad(CompletionRequest, {"model": "m", "prompt": prompt}, "prompt")


def test_ill_typed_completion_logprobs():
    bad(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": "2"}, "logprobs")


def test_missing_messages():
    bad(ChatCompletionRequest, {"model": "m"}, "messages")


def test_unknown_role():
    bad(ChatCompletionRequest, {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages")


def test_body_must_be_object():
    with pytest.raises(BadRequest, match="JSON object"):
        parse(ChatCompletionRequest, [1, 2])


def test_stream_options_need_stream():
    with pytest.raises(BadRequest, match="stream_options"):
        parse(ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": True}})


def test_tools_refused():
    with pytest.raises(BadRequest, match="tools"):
        parse(ChatCompletionRequest, {**CHAT, "tools": [{"type": "function"}]})


def test_chat_logprobs():
    req = parse(ChatCompletionRequest, {**CHAT, "logprobs": True, "top_logprobs": 3})
    assert req.num_logprobs == 3
    assert parse(ChatCompletionRequest, CHAT).num_logprobs is None
    with pytest.raises(BadRequest, match="top_logprobs"):
        parse(ChatCompletionRequest, {**CHAT, "top_logprobs": 3})


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_shapes(prompt):
    req = parse(CompletionRequest, {"model": "m", "prompt": prompt})
    assert req.prompt == prompt
    assert req.requested_max_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize("prompt", [[], [-1], [[1], []], 5, None, [1.5]])
def test_bad_completion_prompts(prompt):
    bad(CompletionRequest, {"model": "m", "prompt": prompt}, "prompt")


def test_echo_refused():
    with pytest.raises(BadRequest, match="echo"):
        parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True})


def test_unknown_fields_are_ignored():
    req = parse(ChatCompletionRequest, {**CHAT, "user": "u1", "metadata": {"a": 1}})
    assert req.model == "m"
