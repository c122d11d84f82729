"""Structured outputs and tool calls without a deployment: the request's constraint, the 400s for
bad ones, the wire, the engine's parameters, and tool calls read out of fixed model text."""

from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar as xgr

from app.errors import BadRequest
from app.responses import Choice, Formatter, Usage
from app.schemas import ChatCompletionRequest, CompletionRequest, parse
from app.structured import choice_grammar, constraint_for, forced_tools_schema, json_safe
from app.tools import ChoiceTools
from tasks.messages import (
    Delta,
    GenerateRequest,
    SamplingSpec,
    StructuredSpec,
    request_from_task_arg,
    request_to_task_arg,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noop"}}]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {**CHAT, **fields})  # type: ignore[return-value]


def test_response_format_becomes_the_schema():
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    spec = constraint_for(chat(response_format=fmt))
    assert spec == StructuredSpec(json=json.dumps(WEATHER))
    assert constraint_for(chat(response_format={"type": "json_object"})) == StructuredSpec(json_object=True)
    assert constraint_for(chat(response_format={"type": "text"})) is None
    assert constraint_for(chat()) is None


def test_vllm_extras_on_completions():
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", "structured_outputs": {"choice": ["a", "b"]}})
    assert constraint_for(req) == StructuredSpec(choice=["a", "b"])  # type: ignore[arg-type]
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", "structured_outputs": {"json": WEATHER}})
    assert constraint_for(req) == StructuredSpec(json=json.dumps(WEATHER))  # type: ignore[arg-type]


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "string",
                                                                                      "pattern": "("}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "a\x00"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: \"a\" undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": 5}}}],
      "tool_choice": "required"}, "tools"),
])
def test_what_does_not_compile_is_a_400_naming_the_field(fields, param):
    with pytest.raises(BadRequest) as e:
        constraint_for(chat(**fields))
    assert e.value.param == param
    assert "[" not in e.value.message.split(":")[0]  # xgrammar's time and source location are dropped


def test_nesting_is_bounded_as_vllm_bounds_it():
    schema: dict = {"type": "object"}
    for _ in range(70):
        schema = {"type": "array", "items": schema}
    with pytest.raises(BadRequest, match="nested too deeply"):
        constraint_for(chat(response_format={"type": "json_schema",
                                             "json_schema": {"name": "d", "schema": schema}}))


def test_required_schema_is_vllms_list_of_calls():
    schema = forced_tools_schema(chat(tools=TOOLS, tool_choice="required"))
    assert schema is not None and schema["minItems"] == 1 and "maxItems" not in schema
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "noop", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "other", "parameters": {}}], schema)
    assert forced_tools_schema(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))["maxItems"] == 1
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced_tools_schema(named) == WEATHER
    assert forced_tools_schema(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "noop"}})) \
        == {"type": "object", "properties": {}}
    assert forced_tools_schema(chat(tools=TOOLS)) is None  # auto
    assert forced_tools_schema(chat(tools=TOOLS, tool_choice="none")) is None


def test_tools_defs_are_lifted_and_conflicts_refused():
    tool = {"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    schema = forced_tools_schema(chat(tools=[tool], tool_choice="required"))
    assert schema is not None and schema["$defs"] == {"P": {"type": "integer"}}
    xgr.Grammar.from_json_schema(schema)
    other = {"type": "function", "function": {"name": "b", "parameters": {"$defs": {"P": {"type": "string"}}}}}
    with pytest.raises(BadRequest, match="twice"):
        forced_tools_schema(chat(tools=[tool, other], tool_choice="required"))


def _accepts(schema: dict, text: str | bytes) -> bool:
    """Whether xgrammar, given this schema, lets a model write exactly ``text``."""
    vocab = [chr(i) for i in range(128)]  # one token a character, so any ASCII text can be written
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab)).compile_json_schema(json.dumps(schema))
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


def test_length_bounded_strings_never_admit_control_characters():
    bounded = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                "tags": {"type": "array", "items": {"type": "string", "minLength": 2}}},
               "required": ["city"]}
    # The bug the rewrite is for: as the client wrote it, xgrammar lets a raw U+0001 through.
    assert _accepts(bounded, '{"city": "ab\x01"}')
    for fields in ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": bounded}}},
                   {"tools": [{"type": "function", "function": {"name": "f", "parameters": bounded}}],
                    "tool_choice": {"type": "function", "function": {"name": "f"}}},
                   {"structured_outputs": {"json": bounded}},
                   {"structured_outputs": {"json": json.dumps(bounded)}}):
        spec = constraint_for(chat(**fields))
        assert spec is not None and spec.json is not None
        sent = json.loads(spec.json)
        assert not _accepts(sent, '{"city": "ab\x01"}')
        assert not _accepts(sent, '{"city": "a", "tags": ["b\tc"]}')
        assert _accepts(sent, '{"city": "Paris", "tags": ["ab", "cde"]}')
        assert not _accepts(sent, '{"city": "Lisbon"}')  # the bounds still hold
        assert not _accepts(sent, '{"city": "Rome", "tags": ["a"]}')
    # A string with a pattern or a format of its own is sent as written.
    own = {"type": "string", "maxLength": 3, "pattern": "^[a-z]+$"}
    assert json_safe(own) == own
    assert json_safe({"type": "string", "format": "email", "maxLength": 9})["maxLength"] == 9


def test_length_bounded_strings_admit_only_well_formed_utf8():
    bounded = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"]}
    sent = json_safe(bounded)
    for text in ("abc", "é", "你好", "😀", "\U0010ffff", "\ufffd", "\ue000"):
        assert _accepts(sent, '{"city": "%s"}' % text), text
    assert not _accepts(sent, '{"city": "abcd"}')
    # Not UTF-8: an overlong NUL in 4, 3 and 2 bytes, a surrogate, past U+10FFFF. Each would come
    # out of the detokenizer as 1-4 U+FFFD, so 3 of them could make 12 characters.
    not_utf8 = (b"\xf0\x80\x80\x80", b"\xe0\x80\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80")
    for raw in not_utf8:
        assert not _accepts(sent, b'{"city": "' + raw + b'"}'), raw
    # Why the pattern spells each length apart: one class for any character admits the overlongs.
    one_class = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[\\s\\S]{0,3}$"}}}
    assert _accepts(one_class, b'{"city": "\xf0\x80\x80\x80"}')


def test_choice_grammar_escapes_like_vllm():
    grammar = choice_grammar(['say "hi"', "a\\b", "line\nbreak"])
    assert grammar == r'root ::= "say \"hi\"" | "a\\b" | "line\nbreak"'
    xgr.Grammar.from_ebnf(grammar)


def test_the_constraint_round_trips_the_wire_and_reaches_vllm():
    from workers.engine import sampling_params

    spec = SamplingSpec(max_tokens=4, structured=StructuredSpec(json=json.dumps({"$defs": {}, "type": "object"})))
    req = GenerateRequest("r", [1], spec, 1.0)
    assert request_from_task_arg(json.loads(json.dumps(request_to_task_arg(req)))) == req
    params = sampling_params(spec).structured_outputs
    assert params.json == spec.structured.json and params.choice is None  # type: ignore[union-attr]
    assert sampling_params(SamplingSpec(max_tokens=1, structured=StructuredSpec(choice=["a"]))) \
        .structured_outputs.choice == ["a"]
    assert sampling_params(SamplingSpec(max_tokens=1)).structured_outputs is None


# -- tool calls read from fixed text -----------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_parser(model_path):
    from transformers import AutoTokenizer

    from app.tools import load_parser

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cls = load_parser("llama3_json")
    return tokenizer, lambda: cls(tokenizer)


def stream_text(tools: ChoiceTools, tokenizer, text: str) -> list[dict]:
    """Feeds the text one token at a time, as the engine's deltas come."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, sent = [], ""
    for i in range(len(ids)):
        now = tokenizer.decode(ids[:i + 1])
        if body := tools.delta(now[len(sent):], [ids[i]]):
            out.append(body)
        sent = now
    if body := tools.finish():
        out.append(body)
    return out


def reassemble(bodies: list[dict]) -> tuple[str, dict[int, dict]]:
    content, calls = "", {}
    for body in bodies:
        content += body.get("content") or ""
        for d in body.get("tool_calls", []):
            call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            if d.get("id"):
                call["id"] = d["id"]
            call["name"] += d.get("function", {}).get("name") or ""
            call["arguments"] += d.get("function", {}).get("arguments") or ""
    return content, calls


def test_auto_reads_llama3_json_calls_whole_and_streamed(llama3_parser):
    tokenizer, make = llama3_parser
    req = chat(tools=TOOLS)
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    content, calls = ChoiceTools(req, make).message(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    tools = ChoiceTools(req, make)
    streamed, calls_by_index = reassemble(stream_text(tools, tokenizer, text))
    assert streamed == "" and tools.called and tools.finish_reason("stop", tools.called) == "tool_calls"
    assert calls_by_index[0]["name"] == "get_weather" and calls_by_index[0]["id"]
    assert json.loads(calls_by_index[0]["arguments"]) == {"city": "Paris"}


def test_auto_leaves_plain_text_as_content(llama3_parser):
    tokenizer, make = llama3_parser
    req = chat(tools=TOOLS)
    assert ChoiceTools(req, make).message("It is sunny.") == ("It is sunny.", [])
    tools = ChoiceTools(req, make)
    content, calls = reassemble(stream_text(tools, tokenizer, "It is sunny."))
    assert content == "It is sunny." and calls == {} and tools.finish_reason("stop", tools.called) == "stop"


def test_required_and_named_answers_become_calls():
    required = ChoiceTools(chat(tools=TOOLS, tool_choice="required"), None)
    content, calls = required.message('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
                                      '{"name": "noop", "parameters": {}}]')
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "noop"]
    assert required.finish_reason("stop", True) == "tool_calls"
    # Cut off by max_tokens: no calls, the text as content.
    assert required.message('[{"name": "get_we') == ('[{"name": "get_we', [])
    named = ChoiceTools(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}), None)
    call = named.message('{"city": "Oslo"}')[1][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert named.finish_reason("stop", True) == "stop"


def test_required_streams_each_call_once_its_object_closes():
    tools = ChoiceTools(chat(tools=TOOLS, tool_choice="required"), None)
    pieces = ['[{"name": "get_weather", "para', 'meters": {"city": "Oslo"}}',
              ', {"name": "noop", "parameters": {}', '}]']
    sent = [tools.delta(piece, [1]) for piece in pieces]
    assert sent[0] is None and sent[2] is None
    assert [c["index"] for c in sent[1]["tool_calls"]] == [0] and [c["index"] for c in sent[3]["tool_calls"]] == [1]
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert tools.finish() is None and tools.finish_reason("stop", tools.called) == "tool_calls"
    cut = ChoiceTools(chat(tools=TOOLS, tool_choice="required"), None)
    assert cut.delta('[{"name": "no', [1]) is None
    assert cut.finish() == {"content": '[{"name": "no'}  # max_tokens came before any call closed


def test_formatter_streams_tool_call_chunks_and_finish_reason():
    req = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    fmt = Formatter("chat", "r", "m", want_logprobs=False, tools=lambda: ChoiceTools(req, None))
    chunks = fmt.delta_chunk(0, Delta(0, '{"city": ', [1]), False) + fmt.delta_chunk(
        0, Delta(0, '"Rome"}', [2], None, "stop"), False)
    _, calls = reassemble([c["choices"][0]["delta"] for c in chunks])
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"} and calls[0]["name"] == "get_weather"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]
    required = chat(tools=TOOLS, tool_choice="required")
    fmt = Formatter("chat", "r", "m", want_logprobs=False, tools=lambda: ChoiceTools(required, None))
    assert fmt.delta_chunk(0, Delta(0, '[{"name": "noop", ', [1]), False) == []  # held back until whole
    [last] = fmt.delta_chunk(0, Delta(0, '"parameters": {}}]', [2], None, "stop"), False)
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    assert last["choices"][0]["delta"]["tool_calls"][0]["function"] == {"name": "noop", "arguments": "{}"}
    body = Formatter("chat", "r", "m", False, tools=lambda: ChoiceTools(required, None)).response(
        {0: Choice(text='[{"name": "noop", "parameters": {}}]', finish_reason="stop")}, Usage())
    assert body["choices"][0]["finish_reason"] == "tool_calls" and body["choices"][0]["message"]["content"] is None


def test_auto_needs_a_configured_parser(model_path):
    from app.processor import Processor
    from config import load_settings

    processor = Processor(load_settings(None, [f"model.path={model_path}"], environ={}))
    with pytest.raises(BadRequest) as e:
        processor.tools_for(chat(tools=TOOLS))
    assert e.value.param == "tool_choice"
    assert processor.tools_for(chat(tools=TOOLS, tool_choice="required")) is not None
    assert processor.tools_for(chat(tools=TOOLS, tool_choice="none")) is None


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"choice": ["a"]}}, "tool_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "disable_any_whitespace": True}}, "structured_outputs"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_inconsistent_tool_and_format_fields_are_400s(fields, param):
    with pytest.raises(BadRequest) as e:
        chat(**fields)
    assert e.value.param == param


def test_logprobs_of_tokens_a_grammar_rules_out_are_floored_as_vllm_does():
    from types import SimpleNamespace

    from tasks.messages import SamplingSpec, decode_event, encode_event
    from workers.outputs import DeltaMaker

    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank, decoded_token="t")  # noqa: E731
    choice = SimpleNamespace(index=0, text="t", token_ids=[5], finish_reason=None,
                             logprobs=[{5: lp(-0.1, 1), 6: lp(float("-inf"), 2)}])
    [delta] = DeltaMaker(SamplingSpec(max_tokens=4, logprobs=2))(SimpleNamespace(outputs=[choice]))
    decoded = decode_event(encode_event(delta))
    assert [t.logprob for t in decoded.logprobs[0].top] == [-0.1, -9999.0]  # type: ignore[union-attr,index]
