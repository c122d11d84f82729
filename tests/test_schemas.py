"""Request parsing: OpenAI bodies validate, and each problem becomes a 400 naming the field."""

import pytest

from app.errors import BadRequest
from app.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse

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


def test_a_tool_needs_its_function():
    with pytest.raises(BadRequest, match="tools.0.function"):
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


def test_echo_asks_for_prompt_logprobs_only_with_logprobs():
    assert parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True}).num_prompt_logprobs is None
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "logprobs": 2})
    assert (req.num_prompt_logprobs, req.num_logprobs, req.echo_only) == (2, 2, False)


def test_max_tokens_zero_only_with_echo():
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "max_tokens": 0})
    assert req.echo_only and req.requested_max_tokens == 1  # one token generated, then dropped
    with pytest.raises(BadRequest, match="max_tokens may be 0 only with echo"):
        parse(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0})


def test_unknown_fields_are_ignored():
    req = parse(ChatCompletionRequest, {**CHAT, "unknown": {"a": 1}})
    assert req.model == "m"


def test_user_and_metadata_are_accepted_and_typed():
    req = parse(ChatCompletionRequest, {**CHAT, "user": "u1", "metadata": {"team": "a"}})
    assert (req.user, req.metadata) == ("u1", {"team": "a"})
    for field, value in [("user", 7), ("metadata", {"a": 1}), ("metadata", "x"),
                         ("metadata", {f"k{i}": "v" for i in range(17)}), ("metadata", {"k" * 65: "v"}),
                         ("metadata", {"k": "v" * 513})]:
        bad(CompletionRequest, {"model": "m", "prompt": "x", field: value}, field)


def test_tokenize_takes_exactly_one_input():
    assert parse(TokenizeRequest, {"prompt": "hi"}).prompt == "hi"
    assert parse(TokenizeRequest, {"messages": [{"role": "user", "content": "hi"}]}).messages
    for body in ({}, {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
                 {"prompt": "hi", "add_generation_prompt": True, "continue_final_message": True}):
        with pytest.raises(BadRequest):
            parse(TokenizeRequest, body)
    bad(DetokenizeRequest, {"tokens": [-1]}, "tokens")
    # As vLLM's: continuing the last message leaves the generation prompt out, unless both are asked for.
    assert not parse(TokenizeRequest, {"prompt": "x", "continue_final_message": True}).generation_prompt


# -- hostile values: every integer bounded, text UTF-8, floats finite, logit_bias well formed ----

COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize("field,value", [
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 2**64), ("top_k", 2**31), ("top_k", 2**64),
    ("max_tokens", 2**31), ("min_tokens", 2**31), ("min_tokens", -1), ("n", 17), ("n", 2**64),
    ("stop_token_ids", [2**31]), ("stop_token_ids", [-1]), ("top_logprobs", 21), ("max_completion_tokens", 2**31),
    ("temperature", 10**400), ("stop", ""), ("stop", ["a", ""]),
])
def test_values_are_bounded_to_what_the_engine_takes(field, value):
    bad(ChatCompletionRequest, {**CHAT, field: value}, field)


@pytest.mark.parametrize("field,value", [
    ("seed", 2**63 - 1), ("seed", -(2**63)), ("top_k", 2**31 - 1), ("top_k", -1), ("max_tokens", 2**31 - 1),
    ("stop_token_ids", [0, 2**31 - 1]),
])
def test_integer_bounds_are_inclusive(field, value):
    assert getattr(parse(ChatCompletionRequest, {**CHAT, field: value}), field) == value


@pytest.mark.parametrize("prompt", [[2**31], [[1], [2**64]], [-1]])
def test_token_id_prompts_are_bounded(prompt):
    err = bad(CompletionRequest, {**COMPLETION, "prompt": prompt}, "prompt")
    assert "equal to" in err.message


def test_completion_logprobs_bounded():
    bad(CompletionRequest, {**COMPLETION, "logprobs": 2**64}, "logprobs")


@pytest.mark.parametrize("model,body,field", [
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages"),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, "messages"),
    (ChatCompletionRequest, {**CHAT, "stop": "\ud83d"}, "stop"),
    (ChatCompletionRequest, {**CHAT, "stop": ["ok", "\ud83d"]}, "stop"),
    (ChatCompletionRequest, {**CHAT, "model": "\ud800"}, "model"),
    (CompletionRequest, {**COMPLETION, "prompt": "\ud800"}, "prompt"),
    (CompletionRequest, {**COMPLETION, "prompt": ["fine", "\udfff"]}, "prompt"),
    (CompletionRequest, {**COMPLETION, "suffix": "\udfff"}, "suffix"),
])
def test_lone_surrogates_are_refused(model, body, field):
    err = bad(model, body, field)
    assert "surrogate" in err.message
    err.message.encode("utf-8")  # the message itself must be sendable


def test_the_error_names_the_type_the_client_meant():
    # A list of strings with one bad string: not "prompt.0: Input should be a valid integer".
    err = bad(CompletionRequest, {**COMPLETION, "prompt": ["fine", "\udfff"]}, "prompt")
    assert err.message.startswith("prompt.1: ")
    assert "function-after" not in err.message and "list[" not in err.message


def test_valid_unicode_is_kept():
    req = parse(CompletionRequest, {**COMPLETION, "prompt": "h\u00e9llo \U0001f642 \u4e2d"})
    assert req.prompt == "h\u00e9llo \U0001f642 \u4e2d"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_floats_must_be_finite(value):
    for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        err = bad(ChatCompletionRequest, {**CHAT, field: value}, field)
        assert "finite" in err.message


def test_logit_bias_becomes_token_ids():
    req = parse(ChatCompletionRequest, {**CHAT, "logit_bias": {"7": 100, "12": -100, "0": 0.5}})
    assert req.token_logit_bias == {7: 100.0, 12: -100.0, 0: 0.5}
    assert parse(ChatCompletionRequest, CHAT).token_logit_bias == {}


@pytest.mark.parametrize("bias", [
    {"abc": 1}, {"-1": 1}, {" 7": 1}, {"+7": 1}, {"7_0": 1}, {"\u0667": 1}, {"": 1}, {"7": 100.5}, {"7": -101},
    {"7": "1"}, {"7": float("nan")}, {"7": None}, {str(2**31): 1}, {"1" * 40: 1}, {"\ud800": 1},
    {str(i): 1 for i in range(301)}, [["7", 1]], "7",
])
def test_invalid_logit_bias(bias):
    err = bad(CompletionRequest, {**COMPLETION, "logit_bias": bias}, "logit_bias")
    err.message.encode("utf-8")
    assert len(err.message) < 300


def test_logit_bias_of_300_entries_is_allowed():
    assert len(parse(CompletionRequest, {**COMPLETION, "logit_bias": {str(i): 1 for i in range(300)}})
               .token_logit_bias) == 300
