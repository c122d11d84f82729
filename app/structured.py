"""Structured outputs and forced tool calls: a request's constraint on its output, checked here.

The frontend turns ``response_format``, vLLM's ``structured_outputs`` and a ``required`` or named
``tool_choice`` into one StructuredSpec, which travels in the task message; the decode engine
applies it (workers/engine.py). Each constraint is compiled here with xgrammar, the grammar
backend vLLM's engine tries first, before the request is queued: a schema or grammar that cannot
be compiled is the client's 400 naming the field, never a worker's failure after the queue.

The checks follow vLLM's own (vllm/v1/structured_output/backend_xgrammar.py,
validate_xgrammar_grammar) without importing vLLM, which the frontend does not load. vLLM's
engine, on backend "auto", may still serve with llguidance a schema whose features xgrammar
ignores (multipleOf, uniqueItems); it never gets one xgrammar cannot parse.

A JSON schema travels rewritten in one way (``json_safe``): xgrammar compiles a string bounded by
``minLength``/``maxLength`` to a character class that admits raw control characters, which JSON
forbids, so a sampled answer could fail ``json.loads`` (mlc-ai/xgrammar#800). The same bounds as a
``pattern`` go through xgrammar's JSON-string-aware regex, which never emits them. That pattern
spells a character as one alternative per UTF-8 length (``UTF8_CHAR``): a single class for any
character also lets through byte sequences that are not UTF-8 (an overlong ``F0 80 80 80``, a
surrogate's ``ED A0 80``), which xgrammar counts as one character and the detokenizer turns into
up to four U+FFFD, past ``maxLength``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr

from app.errors import BadRequest
from app.schemas import ChatCompletionRequest, CompletionRequest, Tool
from tasks.messages import StructuredSpec

# vLLM's limit on nesting in a schema (vllm/sampling_params.py, MAX_STRUCTURED_OUTPUT_JSON_NESTING).
MAX_JSON_NESTING = 64
# One Unicode scalar value, an alternative per UTF-8 length: xgrammar compiles each of these
# ranges to exactly its well-formed byte sequences, and nothing else.
UTF8_CHAR = r"(?:[\u0000-\u007f]|[\u0080-\u07ff]|[\u0800-\ud7ff]|[\ue000-\uffff]|[\u{10000}-\u{10ffff}])"
# xgrammar prefixes its errors with a time and a C++ source location.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def constraint_for(req: ChatCompletionRequest | CompletionRequest) -> StructuredSpec | None:
    """The request's constraint, compiled once to prove it compiles; None for free text."""
    if isinstance(req, ChatCompletionRequest):
        forced = forced_tools_schema(req)
        if forced is not None:
            spec = StructuredSpec(json=json.dumps(json_safe(forced)))
            _compile(spec, "tools")
            return spec
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return StructuredSpec(json_object=True)
    if fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None  # the schema requires it for this type
        spec = StructuredSpec(json=json.dumps(json_safe(fmt.json_schema.json_schema)))
        _compile(spec, "response_format")
        return spec
    so = req.structured_outputs
    if so is None:
        return None
    schema = so.json_
    spec = StructuredSpec(
        json=json.dumps(json_safe(schema)) if isinstance(schema, dict) else _json_safe_text(schema),
        json_object=so.json_object, regex=so.regex,
        choice=list(so.choice) if so.choice is not None else None, grammar=so.grammar)
    _compile(spec, "structured_outputs")
    return spec


def json_safe(schema: Any) -> Any:
    """The schema with every length-bounded string that has no pattern or format of its own
    bounded by a pattern instead: the same strings, never a raw control character."""
    if isinstance(schema, list):
        return [json_safe(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: json_safe(value) for key, value in schema.items()}
    if (out.get("type") == "string" and "pattern" not in out and "format" not in out
            and ("minLength" in out or "maxLength" in out)):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        if not isinstance(low, int) or not isinstance(high, (int, str)):
            return schema  # not a bound xgrammar accepts; _compile reports it as it is
        out["pattern"] = f"^{UTF8_CHAR}{{{low},{high}}}$"
    return out


def _json_safe_text(schema: str | None) -> str | None:
    """A schema given as JSON text, rewritten as json_safe does; text that is not a JSON object
    is left for _compile to refuse."""
    if schema is None:
        return None
    try:
        parsed = json.loads(schema)
    except ValueError:
        return schema
    return json.dumps(json_safe(parsed)) if isinstance(parsed, dict) else schema


def forced_tools_schema(req: ChatCompletionRequest) -> dict | None:
    """The JSON schema a named function or ``required`` constrains the output to, as vLLM's server
    builds it (vllm/tool_parsers/utils.py, get_json_schema_from_tools): a named function's
    parameters; for ``required``, a list of one or more ``{"name", "parameters"}`` calls (at most
    one when parallel_tool_calls is false)."""
    choice = req.effective_tool_choice
    forced = req.forced_tool
    if forced is not None:
        return _parameters(forced.parameters)
    if choice != "required":
        return None
    tools = req.tools or []
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": [_call_schema(t) for t in tools]}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    defs = _shared_defs(tools)
    if defs:
        schema["$defs"] = defs
    return schema


def _parameters(params: dict | None) -> dict:
    return params if params else {"type": "object", "properties": {}}


def _call_schema(tool: Tool) -> dict:
    params = {k: v for k, v in _parameters(tool.function.parameters).items() if k != "$defs"}
    return {"properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": params},
            "required": ["name", "parameters"]}


def _shared_defs(tools: list[Tool]) -> dict:
    """Every tool's "$defs", lifted to the top of the list's schema, where their "$ref"s
    (#/$defs/...) then point."""
    defs: dict[str, Any] = {}
    for tool in tools:
        own = (tool.function.parameters or {}).get("$defs", {})
        if not isinstance(own, dict):
            raise BadRequest(f"$defs in the parameters of {tool.function.name!r} must be an object", param="tools")
        for name, schema in own.items():
            if defs.setdefault(name, schema) != schema:
                raise BadRequest(f"tools define {name!r} in $defs twice, differently", param="tools")
    return defs


def _compile(spec: StructuredSpec, param: str) -> None:
    try:
        if spec.json is not None:
            schema = json.loads(spec.json)
            if _nesting(schema) > MAX_JSON_NESTING:
                raise ValueError(f"the JSON schema is nested too deeply: objects and arrays may nest at most "
                                 f"{MAX_JSON_NESTING} levels")
            if not isinstance(schema, dict):
                raise ValueError("the JSON schema must be an object")
            xgr.Grammar.from_json_schema(schema)
        elif spec.regex is not None:
            if "\x00" in spec.regex:
                raise ValueError("the regex must not contain a NUL character")
            xgr.Grammar.from_regex(spec.regex)
        elif spec.choice is not None:
            xgr.Grammar.from_ebnf(choice_grammar(spec.choice))
        elif spec.grammar is not None:
            if _is_lark(spec.grammar):
                xgr.Grammar.from_lark(spec.grammar)
            else:
                xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        what = {"tools": "the tools' parameters do not compile to a grammar",
                "response_format": "the JSON schema in response_format does not compile to a grammar",
                "structured_outputs": "structured_outputs does not compile to a grammar"}[param]
        raise BadRequest(f"{what}: {_XGRAMMAR_PREFIX.sub('', str(e)).strip()[:500]}", param=param) from None


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar of exactly these strings, escaped as vLLM escapes them
    (vllm/v1/structured_output/utils.py, choice_as_grammar)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(escape(ch) for ch in c) + '"' for c in choices)


def _is_lark(grammar: str) -> bool:
    """vLLM's test (grammar_is_likely_lark): EBNF defines its rules with "::="."""
    for line in grammar.split("\n"):
        if "::=" in re.sub(r"(#|//).*$", "", line):
            return False
    return True


def _nesting(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
        depth += 1
        if depth > MAX_JSON_NESTING + 1:
            break
    return depth - 1
