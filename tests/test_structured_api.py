"""Structured outputs and tool calling through the real stack, with the official client.

The tiny model's weights are random, so its answers are nonsense, but a constrained answer is
still valid: it parses, and it validates against the schema it was constrained to.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "celsius": {"type": "integer", "minimum": -50, "maximum": 50}},
           "required": ["city", "celsius"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Today's weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# Enough for any answer these bounded schemas allow, whitespace aside.
MAX_TOKENS = 120


class Weather(BaseModel):
    city: str = Field(max_length=12)
    celsius: int = Field(ge=-50, le=50)
    sunny: bool


def test_parse_returns_a_schema_valid_object(deployment):
    completion = deployment.client().beta.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Weather, max_tokens=MAX_TOKENS, seed=1)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Weather)
    assert len(message.parsed.city) <= 12 and -50 <= message.parsed.celsius <= 50


def test_streamed_json_schema_is_valid_json(deployment):
    stream = deployment.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), WEATHER)


def test_json_object_and_vllm_extras(deployment):
    client = deployment.client()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=3,
                                         response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":  # an object may outgrow max_tokens; a prefix of one is no JSON
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    choice = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=10, logprobs=3,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert choice.choices[0].text in ("yes", "no", "maybe")
    # The tokens the grammar rules out have a logprob of -inf, sent as vLLM's server sends it.
    assert all(lp >= -9999.0 for top in choice.choices[0].logprobs.top_logprobs for lp in top.values())
    regex = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                           extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex.choices[0].message.content)
    grammar = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, extra_body={
        "structured_outputs": {"grammar": 'root ::= "red" | "green" | "blue"'}})
    assert grammar.choices[0].text in ("red", "green", "blue")


def test_required_tool_call_arguments_validate(deployment):
    out = deployment.client().chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                                      tool_choice="required", max_tokens=MAX_TOKENS, seed=4)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_streams_deltas_that_reassemble_to_valid_json(deployment):
    stream = deployment.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=MAX_TOKENS, seed=5, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["id"] = delta.id or call.get("id")
                call["name"] += delta.function.name or "" if delta.function else ""
                call["arguments"] += delta.function.arguments or "" if delta.function else ""
    assert finish == "stop"  # OpenAI's for a named function
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_required_streams_whole_calls_and_finishes_with_tool_calls(deployment):
    stream = deployment.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=MAX_TOKENS, seed=6, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(deltas) == 1  # parallel_tool_calls=false: one call
    jsonschema.validate(json.loads(deltas[0].function.arguments), SCHEMAS[deltas[0].function.name])


def test_auto_with_a_tool_conversation_in_the_history(deployment):
    """The history's call and the tool's answer go through the chat template; "auto" leaves the
    random model free, and whatever it writes comes back as content or as parsed calls."""
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "celsius": 21})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    for stream in (False, True):
        out = deployment.client().chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                                          max_tokens=8, seed=7, stream=stream)
        finish = [c for c in out if c.choices][-1].choices[0].finish_reason if stream else out.choices[0].finish_reason
        assert finish in ("stop", "length", "tool_calls")
    none = deployment.client().chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                                       tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": []}, "tools"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages"),
])
def test_bad_structured_and_tool_inputs_are_400_naming_the_field(deployment, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    resp = httpx.post(f"{deployment.base_url}/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


def test_bad_schema_is_a_400_from_the_official_client(deployment):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        deployment.client().completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "integer", "minimum": 5, "maximum": 2}}}})


def test_length_bounded_strings_always_parse(deployment):
    # Unconstrained by a seed, many draws: a raw control character in the bounded "city" would
    # fail json.loads (app/structured.py, json_safe).
    out = deployment.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, n=16, temperature=1.5,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    finished = [c.message.content for c in out.choices if c.finish_reason == "stop"]
    assert len(finished) >= 12
    for text in finished:
        jsonschema.validate(json.loads(text), WEATHER)
