"""/v1/responses through the real stack, with the official openai client: the shared aggregated
deployment (frontend A) plus a second frontend (B) of its own process on the same Redis, so that
a stored response is shown to be continued, read, cancelled and deleted across processes."""

from __future__ import annotations

import re

import openai
import pytest

from app.schemas import ChatCompletionRequest
from conftest import make_settings, start_deployment, wait_for
from tasks import keys
from test_bad_input import assert_openai_error, post

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def frontend_b(deployment, tmp_path_factory):
    """A second frontend on the shared deployment's Redis: its own launcher and gunicorn."""
    settings = make_settings(deployment.settings.redis_url, **{"frontend.workers": 1})
    dep = start_deployment(settings, tmp_path_factory.mktemp("frontend-b"), roles="frontend")
    yield dep
    dep.stop()


def served_by(dep, response_id: str) -> set[int]:
    """The frontend pids that logged taking the response (app/responses_api.py, create_response)."""
    pattern = rf"response {response_id} \(previous \S+\) in frontend pid (\d+)"
    return {int(pid) for pid in re.findall(pattern, dep.log())}


def test_create_and_stream(deployment):
    client = deployment.client()
    out = client.responses.create(model=MODEL, input="Hello!", instructions="Be brief.", max_output_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert out.object == "response" and out.id.startswith("resp_")
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].type == "message" and out.output[0].role == "assistant"
    assert out.output_text and out.instructions == "Be brief."
    assert out.usage.output_tokens == 8 and out.usage.total_tokens == out.usage.input_tokens + 8

    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Count to five."}],
                                          max_output_tokens=6, stream=True, extra_body={"ignore_eos": True}))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas and final.usage.output_tokens == 6
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    # Stored by default: any frontend can return it whole.
    assert client.responses.retrieve(final.id).output_text == deltas
    # The client's stream helper rebuilds the response from the events, checking their order.
    with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=4) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        rebuilt = stream.get_final_response()
    assert rebuilt.output_text == text and rebuilt.usage.output_tokens <= 4


def test_conversation_continues_on_another_frontend_process(deployment, frontend_b):
    a, b = deployment.client(), frontend_b.client()
    first = a.responses.create(model=MODEL, input="My name is Ada.", instructions="Be brief.", max_output_tokens=8)
    second = b.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=4)
    assert second.previous_response_id == first.id and second.status in ("completed", "incomplete")
    # Turn two's prompt is the whole conversation (without turn one's instructions, as OpenAI
    # does): the same prompt as the chat request that spells it out.
    chat = a.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    pids_a, pids_b = served_by(deployment, first.id), served_by(frontend_b, second.id)
    assert len(pids_a) == len(pids_b) == 1 and pids_a != pids_b
    assert not served_by(deployment, second.id)

    # Either frontend reads, and deletes, what the other stored.
    assert b.responses.retrieve(first.id).output_text == first.output_text
    b.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        a.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        a.responses.create(model=MODEL, input="again", previous_response_id=first.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
    # store: false keeps nothing.
    unstored = a.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(unstored.id)


def test_background_responses_finish_or_are_cancelled_from_another_frontend(deployment, frontend_b):
    a, b = deployment.client(), frontend_b.client()
    done = a.responses.create(model=MODEL, input="hi", max_output_tokens=5, background=True,
                              extra_body={"ignore_eos": True})
    assert done.status == "queued" and done.background
    finished = wait_for(lambda: (r := b.responses.retrieve(done.id)).status not in ("queued", "in_progress") and r,
                        60, "the background response to finish")
    assert finished.status == "incomplete" and finished.usage.output_tokens == 5 and finished.output_text

    long = a.responses.create(model=MODEL, input="hi", max_output_tokens=1800, background=True,
                              extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "bg-cancel"})
    cancelled = b.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.id == long.id
    # Frontend A's thread sees the cancel within a poll interval and cancels the engine work,
    # and gives its admission places back.
    redis = deployment.redis
    wait_for(lambda: list(redis.scan_iter(keys.cancel_flag("bg-cancel") + "*")), 30, "the engine work cancelled")
    wait_for(lambda: redis.zcard(keys.ADMITTED) == 0, 30, "admission places given back")
    assert a.responses.retrieve(long.id).status == "cancelled"
    # Cancelling again, or a response that never ran in the background, is a 400.
    with pytest.raises(openai.BadRequestError):
        a.responses.cancel(long.id)
    with pytest.raises(openai.BadRequestError):
        a.responses.cancel(finished.id)


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "input": "hi", "reasoning": {"effort": "low"}}, 400, "reasoning"),
    ({"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"model": MODEL, "input": "hi", "include": ["message.output_text.logprobs"]}, 400, "include"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input"),
    ({"model": MODEL, "input": "x" * 20_000, "max_output_tokens": 4}, 400, "input"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": 5000}, 400, None),
    ({"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"model": "gpt-4o", "input": "hi"}, 404, "model"),
])
def test_bad_input_is_openais_error_shape(deployment, body, status, param):
    code, out = post(deployment.base_url, "/responses", body)
    assert_openai_error(code, out, status, param)


def test_unknown_ids_are_404s(deployment):
    client = deployment.client()
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
        with pytest.raises(openai.NotFoundError) as e:
            call("resp_nope")
        assert e.value.body["param"] == "response_id"


# Bounded, so the tiny model's random answers fit in max_output_tokens.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
           "additionalProperties": False}


@pytest.mark.skipif("tool_choice" not in ChatCompletionRequest.model_fields,
                    reason="the chat path has no tools or response_format yet")
def test_function_tools_and_text_format_reach_the_chat_path(deployment):
    import json

    import jsonschema

    client = deployment.client()
    out = client.responses.create(model=MODEL, input="Weather in Rome?", max_output_tokens=120, tool_choice="required",
                                  extra_body={"seed": 4},
                                  tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER,
                                          "strict": True}])
    calls = [o for o in out.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls), out.output
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    # The call and its output go back as the next turn's input.
    follow = client.responses.create(model=MODEL, previous_response_id=out.id, max_output_tokens=4, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.status in ("completed", "incomplete")

    events = list(client.responses.create(
        model=MODEL, input="Weather in Rome?", max_output_tokens=120, stream=True, extra_body={"seed": 5},
        tool_choice={"type": "function", "name": "get_weather"},
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert len(done) == 1 and done[0].arguments == deltas
    jsonschema.validate(json.loads(deltas), WEATHER)
    assert events[-1].type == "response.completed" and events[-1].response.output[-1].type == "function_call"

    shaped = client.responses.create(model=MODEL, input="A city", max_output_tokens=120, extra_body={"seed": 6},
                                     text={"format": {
        "type": "json_schema", "name": "city", "schema": WEATHER, "strict": True}})
    jsonschema.validate(json.loads(shaped.output_text), WEATHER)
