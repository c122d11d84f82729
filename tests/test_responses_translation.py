"""/v1/responses without a broker: the pure translations between a Responses request and the chat
request that serves it, and between chat output and Responses objects and stream events
(app/responses_api.py), plus the stored response's Redis writes (app/response_store.py)."""

from __future__ import annotations

import pytest
import redis
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from app.errors import BadRequest
from app.response_store import ResponseStore
from app.responses_api import (
    ResponsesRequest,
    Shaper,
    StreamTranslator,
    as_input_items,
    dump,
    parse_chat,
    parse_responses,
    rename_param,
    to_chat_body,
)
from app.schemas import ChatMessage

MODEL = "tiny-llama"
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
TOOL_HISTORY_SUPPORTED = {"tool_calls", "tool_call_id"} <= ChatMessage.model_fields.keys()


def request(**body) -> tuple[ResponsesRequest, dict]:
    raw = {"model": MODEL, "input": "Hi", **body}
    return parse_responses(raw), raw


def chat_body(history: list[dict] | None = None, **body) -> dict:
    req, raw = request(**body)
    return to_chat_body(req, raw, history or [])


def refused(**body) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        req, raw = request(**body)
        parse_chat(to_chat_body(req, raw, []))
    return e.value


# -- requests -------------------------------------------------------------------------------------


def test_text_input_instructions_and_limits_become_a_chat_request():
    body = chat_body(instructions="Be brief.", max_output_tokens=7, temperature=0.5, top_k=3, seed=1,
                     stream=True)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["max_completion_tokens"] == 7
    assert (body["temperature"], body["top_k"], body["seed"]) == (0.5, 3, 1)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = parse_chat(body)
    assert chat.requested_max_tokens == 7 and chat.stream


def test_message_items_follow_the_stored_conversation():
    history = [{"type": "message", "role": "user", "content": "one"},
               {"type": "message", "role": "assistant", "content": "two"}]
    items = [{"role": "developer", "content": "be terse"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thr"},
                                                             {"type": "input_text", "text": "ee"}]}]
    body = chat_body(history, input=items, instructions="sys")
    assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "one"},
                                {"role": "assistant", "content": "two"}, {"role": "developer", "content": "be terse"},
                                {"role": "user", "content": "three"}]
    parse_chat(body)


def test_function_calls_and_outputs_become_tool_messages():
    items = [{"role": "user", "content": "weather?"},
             {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"city":"Oslo"}'},
             {"type": "function_call", "call_id": "c2", "name": "get", "arguments": '{"city":"Rome"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "cold"},
             {"type": "function_call_output", "call_id": "c2", "output": "warm"}]
    messages = chat_body(input=items)["messages"]
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get", "arguments": '{"city":"Rome"}'}}]}
    assert messages[2:] == [{"role": "tool", "tool_call_id": "c1", "content": "cold"},
                            {"role": "tool", "tool_call_id": "c2", "content": "warm"}]
    if not TOOL_HISTORY_SUPPORTED:  # until the chat path takes tool messages: refused, never dropped
        assert refused(input=items).param == "input"


def test_text_format_and_function_tools_map_to_the_chat_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = chat_body(text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
                     tools=[{"type": "function", "name": "f", "description": "d", "parameters": schema,
                             "strict": True}],
                     tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False)
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "A", "schema": schema, "strict": True}}
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "description": "d",
                                                               "parameters": schema, "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False
    assert chat_body(text={"format": {"type": "json_object"}})["response_format"] == {"type": "json_object"}
    assert "response_format" not in chat_body(text={"format": {"type": "text"}})
    assert chat_body(tool_choice="required")["tool_choice"] == "required"


@pytest.mark.parametrize("body, param", [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"text": {"verbosity": "low"}}, "text"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options"),
    ({"background": True, "store": False}, "background"),
    ({"background": True, "stream": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_k": "2"}, "top_k"),
])
def test_options_that_cannot_be_honoured_are_400s_naming_them(body, param):
    assert refused(**body).param == param


def test_chat_errors_are_named_as_the_responses_fields():
    e = refused(input=[{"role": "user", "content": "\ud800"}])
    assert e.param == "input" and e.message.startswith("input.0")
    e = rename_param(BadRequest("messages.2.content: bad", param="messages"))
    assert (e.param, e.message) == ("input", "input.2.content: bad")
    e = rename_param(BadRequest("too long", param="max_tokens", code="context_length_exceeded"))
    assert (e.param, e.code) == ("max_output_tokens", "context_length_exceeded")


# -- output ---------------------------------------------------------------------------------------


def chat_chunk(content: str | None = None, finish: str | None = None, tool_calls: list | None = None,
               usage: dict | None = None) -> dict:
    delta: dict = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}


def run_stream(chunks: list[dict], **body) -> tuple[list, StreamTranslator]:
    req, _ = request(**body)
    translator = StreamTranslator(Shaper(req))
    events = list(translator.start())
    for chunk in chunks:
        events.extend(translator.feed(chunk))
    events.extend(translator.finish())
    # Each event is one of OpenAI's own, as its client parses it from the wire.
    parsed = [STREAM_EVENT.validate_json(e.model_dump_json(exclude_unset=True, by_alias=True)) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    return parsed, translator


def test_a_text_stream_has_openais_events_in_order():
    events, translator = run_stream([chat_chunk(""), chat_chunk("Hel"), chat_chunk("lo", finish="stop"),
                                     chat_chunk(usage=USAGE)], max_output_tokens=9)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.max_output_tokens == 9
    assert events[6].text == "Hello"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Hello"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (5, 3, 8)
    assert final.usage.input_tokens_details.cached_tokens == 2
    assert as_input_items(translator.final.output) == [{"type": "message", "role": "assistant", "content": "Hello"}]


def test_a_stream_without_text_still_has_its_message():
    events, _ = run_stream([chat_chunk(""), chat_chunk(finish="stop"), chat_chunk(usage=USAGE)])
    assert "response.output_text.delta" not in [e.type for e in events]
    assert events[-1].type == "response.completed" and events[-1].response.output[0].type == "message"


def test_a_stream_cut_by_max_output_tokens_is_incomplete():
    events, _ = run_stream([chat_chunk("ab", finish="length"), chat_chunk(usage=USAGE)])
    assert events[-1].type == "response.completed" and events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-2].item.status == "incomplete"


def test_streamed_tool_calls_become_function_call_items():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}
    events, translator = run_stream([
        chat_chunk(tool_calls=[call]),
        chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}]),
        chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
        chat_chunk(tool_calls=[{"index": 1, "id": "call_2", "function": {"name": "put", "arguments": "{}"}}],
                   finish="tool_calls"),
        chat_chunk(usage=USAGE)])
    types = [e.type for e in events]
    assert types.count("response.function_call_arguments.delta") == 3
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(d.arguments, d.output_index) for d in done] == [('{"city":"Oslo"}', 0), ("{}", 1)]
    final = events[-1].response
    assert [(o.type, o.call_id, o.name) for o in final.output] == [("function_call", "call_1", "get"),
                                                                    ("function_call", "call_2", "put")]
    assert as_input_items(translator.final.output)[0] == {"type": "function_call", "call_id": "call_1",
                                                          "name": "get", "arguments": '{"city":"Oslo"}'}


def test_a_whole_chat_body_becomes_a_response():
    schema = {"type": "object"}
    req, _ = request(instructions="sys", metadata={"k": "v"}, user="u1",
                     text={"format": {"type": "json_schema", "name": "A", "schema": schema}},
                     tools=[{"type": "function", "name": "f", "parameters": schema}])
    chat = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "thinking",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": USAGE}
    response = Shaper(req).from_chat(chat)
    parsed = Response.model_validate_json(response.model_dump_json(exclude_unset=True, by_alias=True))
    assert parsed.status == "completed" and parsed.id.startswith("resp_")
    assert [o.type for o in parsed.output] == ["message", "function_call"]
    assert parsed.output_text == "thinking"
    assert (parsed.instructions, parsed.metadata, parsed.user) == ("sys", {"k": "v"}, "u1")
    # The request's options are echoed in OpenAI's field names.
    assert dump(response)["text"]["format"] == {"type": "json_schema", "name": "A", "schema": schema}
    assert [t.name for t in parsed.tools] == ["f"]


# -- the store ------------------------------------------------------------------------------------


@pytest.fixture
def store(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    yield ResponseStore(client, ttl_s=30)


def test_a_cancel_wins_over_a_late_result_and_a_delete_over_both(store):
    store.put({"id": "resp_a", "status": "queued"}, [{"role": "user", "content": "x"}])
    assert store.redis.ttl("llmq:response:resp_a") > 0
    assert store.cancel("resp_a") == "queued"
    assert not store.update("resp_a", "completed", {"id": "resp_a", "status": "completed"})
    got = store.get("resp_a")
    assert got is not None and got.status == "cancelled" and got.response["status"] == "cancelled"
    assert store.cancel("resp_a") == "cancelled"  # not running any more: nothing changes
    assert store.delete("resp_a") and store.get("resp_a") is None and store.cancel("resp_a") is None
    assert not store.update("resp_a", "completed", {"id": "resp_a"})  # a deleted response stays deleted


def test_a_running_response_takes_its_result(store):
    store.put({"id": "resp_b", "status": "queued"}, [])
    assert store.update("resp_b", "completed", {"id": "resp_b", "status": "completed", "output": []},
                        [{"role": "assistant", "content": "y"}])
    got = store.get("resp_b")
    assert got is not None and got.status == "completed"
    assert got.conversation == [{"role": "assistant", "content": "y"}]
