"""/v1/responses: OpenAI's Responses API, as vLLM's server offers it, on the chat path.

A Responses request is translated into the frontend's chat request (``to_chat_body``, then
app/schemas.py's ChatCompletionRequest), and runs as a chat completion does: the same
admission, chat template, gateway, migration and workers (app/routes.py, start_generation). Its
chat output (whole bodies, or stream chunks) is translated back into a Response object or the
Responses stream events (``Shaper``, ``StreamTranslator``), built from the ``openai`` package's
own types so their shapes are OpenAI's. Both translations are pure functions of their input.

Beyond vLLM's server: stored responses live in Redis (app/response_store.py), so every frontend
process of every node shares them, they expire after ``frontend.responses_ttl_s``, and
``DELETE /v1/responses/{id}`` exists, as on OpenAI. A background response runs in a thread of
the frontend process that took it, holding its admission places until it ends; a cancel from any
process marks it in Redis, and the thread, which reads that mark once a poll interval, cancels
its engine work. Every option either is honoured or is a 400 naming it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from flask import Response as FlaskResponse
from flask import current_app, g, jsonify, request, stream_with_context
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from pydantic import BaseModel, Discriminator, Field, PrivateAttr, Tag

from app import openapi
from app.admission import TICKET_ENVIRON_KEY, Ticket
from app.api import endpoint
from app.errors import APIError, BadRequest
from app.gateway import Pause
from app.response_store import RUNNING, ResponseStore
from app.routes import (
    GENERATION_ERRORS,
    STREAMABLE,
    Generation,
    _check_model,
    _gateway,
    _processor,
    bp,
    client_gone_check,
    start_generation,
)
from app.schemas import INT32_MAX, ChatCompletionRequest, ChatMessage, Text, _Body, parse

logger = logging.getLogger(__name__)

# -- the request --------------------------------------------------------------------------------

# Sampling fields a Responses request may carry, as vLLM's server takes them (OpenAI's own are
# temperature and top_p; the rest are vLLM's extras). They go to the chat request unchanged,
# which validates them under the same names.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_tokens", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "stop", "stop_token_ids", "seed", "logit_bias", "ignore_eos")

# OpenAI options this deployment cannot honour: any value but "absent" (or null) is a 400 naming it.
REFUSED_FIELDS = {
    "reasoning": "reasoning options need a reasoning model and parser, which this deployment does not run",
    "conversation": "conversation objects are not supported; continue a conversation with previous_response_id",
    "prompt": "prompt templates are not supported",
    "max_tool_calls": "max_tool_calls is not supported: no built-in tools run here",
    "context_management": "context_management is not supported",
    "background_options": "background_options are not supported",
}


class InputTextPart(_Body):
    # output_text: an assistant message's own text, as a previous response returned it.
    type: Literal["input_text", "output_text"]
    text: Text


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[InputTextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[InputTextPart]

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_type(value: Any) -> str | None:
    # An "easy" message ({"role", "content"}) has no type.
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: None = None  # any value is refused: the model's length is max_output_tokens's


class ResponsesStreamOptions(_Body):
    include_obfuscation: Literal[False] = False  # no obfuscation padding is added


class ResponsesRequest(_Body):
    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    # Echoed in the response; checked (with the other SAMPLING_FIELDS) by the chat request.
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: Text | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    text: TextConfig | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None  # a hint: prefix caching is automatic
    include: list[Text] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    service_tier: Text | None = None

    # The body as sent: the chat request takes its sampling fields as given (to_chat_body).
    _raw: dict = PrivateAttr(default_factory=dict)

    @property
    def raw(self) -> dict:
        return self._raw

    def refuse_unsupported(self, raw: dict) -> None:
        """A 400 naming the first option this deployment cannot honour."""
        for name, why in REFUSED_FIELDS.items():
            if raw.get(name) is not None:
                raise BadRequest(f"{name}: {why}", param=name)
        fmt = self.text.format if self.text is not None else None
        problems = [
            ("include", bool(self.include), f"{self.include[0]!r} is not supported; no include values are"
             if self.include else ""),
            ("truncation", self.truncation == "auto",
             "only 'disabled' is supported; a prompt past the context is a 400"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported on /v1/responses"),
            ("service_tier", self.service_tier not in (None, "auto", "default"),
             f"{self.service_tier!r} is not supported; only 'auto' and 'default' are"),
            ("text", fmt is not None and fmt.type == "json_schema" and (not fmt.name or fmt.schema_ is None),
             "format: a json_schema format needs a name and a schema"),
            ("stream_options", self.stream_options is not None and not self.stream,
             "only allowed when stream is true"),
            ("background", self.background and not self.store,
             "a background response must be stored (store: true)"),
            ("background", self.background and self.stream,
             "streaming a background response is not supported; poll it with GET /v1/responses/{id}"),
        ]
        for name, bad, why in problems:
            if bad:
                raise BadRequest(f"{name}: {why}", param=name)

    @property
    def input_items(self) -> list[dict]:
        """This turn's input, as Responses input items (what a stored conversation keeps)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [item.model_dump(by_alias=True) for item in self.input]


# -- request translation (pure) -------------------------------------------------------------------

# Chat field -> the Responses field it came from, for errors the chat request's checks raise.
_CHAT_TO_RESPONSES = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                      "max_tokens": "max_output_tokens", "response_format": "text", "prompt": "input"}


def to_chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Responses input items -> chat messages. Consecutive function calls form one assistant
    message with several tool_calls, as a chat history has them."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for raw in items:
        item = parse_item(raw)
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    return messages


def parse_item(raw: dict) -> MessageItem | FunctionCallItem | FunctionCallOutputItem:
    kind = _item_type(raw)
    if kind == "function_call":
        return FunctionCallItem.model_validate(raw)
    if kind == "function_call_output":
        return FunctionCallOutputItem.model_validate(raw)
    return MessageItem.model_validate(raw)


def to_chat_tools(tools: list[dict]) -> list[dict]:
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise BadRequest(f"tools[{i}]: tools of type {tool.get('type')!r} are not supported; only "
                             f"'function' tools are (no built-in tools run here)", param="tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def to_chat_tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"tool_choice: {choice.get('type')!r} is not supported; use 'none', 'auto', 'required' "
                     f"or {{'type': 'function', 'name': ...}}", param="tool_choice")


def to_response_format(fmt: TextFormat) -> dict:
    if fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}
    return {"type": fmt.type}


def to_chat_body(req: ResponsesRequest, raw: dict, history: list[dict]) -> dict:
    """The chat request that serves a Responses request: ``history`` (a previous response's
    stored conversation) then this turn's input, after the instructions."""
    body: dict[str, Any] = {"model": req.model,
                            "messages": to_chat_messages(req.instructions, history + req.input_items)}
    body.update({k: raw[k] for k in SAMPLING_FIELDS if k in raw})
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.text is not None and req.text.format is not None and req.text.format.type != "text":
        body["response_format"] = to_response_format(req.text.format)
    if req.tools:
        body["tools"] = to_chat_tools(req.tools)
    if req.tool_choice is not None:
        body["tool_choice"] = to_chat_tool_choice(req.tool_choice)
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def parse_responses(raw: object) -> ResponsesRequest:
    req: ResponsesRequest = parse(ResponsesRequest, raw)  # type: ignore[assignment]
    assert isinstance(raw, dict)  # parse refused anything else
    req.refuse_unsupported(raw)
    req._raw = raw
    return req


def parse_chat(body: dict) -> ChatCompletionRequest:
    """The chat request, with its errors named as the Responses request's fields."""
    if any("tool_calls" in m or "tool_call_id" in m for m in body["messages"]) and not {
            "tool_calls", "tool_call_id"} <= ChatMessage.model_fields.keys():
        # Chat messages would silently drop these fields: refused rather than lost.
        raise BadRequest("input: function_call and function_call_output items are not supported by this "
                         "deployment's chat path", param="input")
    try:
        return parse(ChatCompletionRequest, body)  # type: ignore[return-value]
    except BadRequest as e:
        raise rename_param(e) from None


def rename_param(e: BadRequest) -> BadRequest:
    """A chat-path error, named as the Responses request's field it came from."""
    param = _CHAT_TO_RESPONSES.get(e.param or "", e.param)
    message = e.message
    if e.param and param and param != e.param and message.startswith(e.param):
        message = param + message[len(e.param):]
    return BadRequest(message, param=param, code=e.code)


# -- response translation (pure) ------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_from_chat(usage: dict | None) -> ResponseUsage | None:
    if usage is None:
        return None
    return ResponseUsage(
        input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        input_tokens_details={"cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                              "cache_write_tokens": 0},
        output_tokens_details={"reasoning_tokens": 0})


def output_from_chat_message(message: dict, finish_reason: str | None) -> list:
    """A chat choice's message -> Responses output items: its text as one message, then one
    function_call item per tool call."""
    item_status = "incomplete" if finish_reason == "length" else "completed"
    items: list = []
    if message.get("content") or not message.get("tool_calls"):
        items.append(ResponseOutputMessage(
            id=_new_id("msg"), type="message", role="assistant", status=item_status,
            content=[ResponseOutputText(type="output_text", text=message.get("content") or "", annotations=[],
                                        logprobs=[])]))
    for call in message.get("tool_calls") or []:
        items.append(ResponseFunctionToolCall(
            id=_new_id("fc"), type="function_call", status="completed", call_id=call["id"],
            name=call["function"]["name"], arguments=call["function"]["arguments"]))
    return items


def as_input_items(output: list) -> list[dict]:
    """Output items as a next turn's input items (what a stored conversation keeps)."""
    items: list[dict] = []
    for item in output:
        if isinstance(item, ResponseOutputMessage):
            items.append({"type": "message", "role": "assistant",
                          "content": "".join(p.text for p in item.content if isinstance(p, ResponseOutputText))})
        elif isinstance(item, ResponseFunctionToolCall):
            items.append({"type": "function_call", "call_id": item.call_id, "name": item.name,
                          "arguments": item.arguments})
    return items


class Shaper:
    """Builds one response's Response objects: the echo of its request, its status and output."""

    def __init__(self, req: ResponsesRequest, response_id: str | None = None, created_at: float | None = None):
        self.req = req
        self.id = response_id or _new_id("resp")
        self.created_at = created_at if created_at is not None else int(time.time())

    def response(self, status: str, output: list | None = None, usage: ResponseUsage | None = None,
                 finish_reason: str | None = None, error: APIError | None = None) -> Response:
        req = self.req
        text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}}
        if status == "completed" and finish_reason == "length":
            status = "incomplete"
        return Response(
            id=self.id, object="response", created_at=self.created_at, model=req.model, status=status,
            output=output or [], usage=usage, instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, previous_response_id=req.previous_response_id,
            metadata=req.metadata or {}, temperature=req.temperature,
            top_p=req.top_p, text=text, tools=req.tools or [],
            tool_choice=req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice else "auto",
            parallel_tool_calls=req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            truncation="disabled", background=req.background, user=req.user,
            safety_identifier=req.safety_identifier, prompt_cache_key=req.prompt_cache_key,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            error={"code": "server_error", "message": error.message} if error is not None else None,
            completed_at=int(time.time()) if status == "completed" else None,
        )

    def from_chat(self, chat: dict) -> Response:
        """A whole chat completion body -> the whole Response."""
        choice = chat["choices"][0]
        return self.response("completed", output_from_chat_message(choice["message"], choice["finish_reason"]),
                             usage_from_chat(chat.get("usage")), finish_reason=choice["finish_reason"])


class StreamTranslator:
    """Chat completion chunks -> Responses stream events, numbered from 0.

    A text delta goes to the open message item (added, with its output_text part, at the first
    text); a tool call delta to its function_call item. ``finish`` closes what is open and ends
    with response.completed."""

    def __init__(self, shaper: Shaper):
        self.shaper = shaper
        self.sequence = 0
        self.output: list = []  # items, finished or not, in output order
        self._text: ResponseOutputMessage | None = None
        self._calls: dict[int, ResponseFunctionToolCall] = {}  # by the chat tool call's index
        self._finish_reason: str | None = None
        self._usage: ResponseUsage | None = None

    def _event(self, cls: type[BaseModel], **fields) -> BaseModel:
        event = cls(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def start(self) -> Iterator[BaseModel]:
        created = self.shaper.response("in_progress")
        yield self._event(ResponseCreatedEvent, type="response.created", response=created)
        yield self._event(ResponseInProgressEvent, type="response.in_progress", response=created)

    def feed(self, chunk: dict) -> Iterator[BaseModel]:
        if chunk.get("usage"):
            self._usage = usage_from_chat(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield from self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                yield from self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]

    def _text_delta(self, text: str) -> Iterator[BaseModel]:
        yield from self._open_text()
        assert self._text is not None
        part = self._text.content[0]
        assert isinstance(part, ResponseOutputText)
        part.text += text
        yield self._event(ResponseTextDeltaEvent, type="response.output_text.delta", item_id=self._text.id,
                          output_index=self._index(self._text), content_index=0, delta=text, logprobs=[])

    def _open_text(self) -> Iterator[BaseModel]:
        if self._text is None:
            yield from self._close_calls()
            self._text = ResponseOutputMessage(id=_new_id("msg"), type="message", role="assistant",
                                               status="in_progress", content=[])
            self.output.append(self._text)
            yield self._event(ResponseOutputItemAddedEvent, type="response.output_item.added",
                              output_index=self._index(self._text), item=self._text.model_copy(deep=True))
            self._text.content.append(ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[]))
            yield self._event(ResponseContentPartAddedEvent, type="response.content_part.added",
                              item_id=self._text.id, output_index=self._index(self._text), content_index=0,
                              part=ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[]))

    def _call_delta(self, call: dict) -> Iterator[BaseModel]:
        index = call.get("index", 0)
        item = self._calls.get(index)
        function = call.get("function") or {}
        if item is None:
            yield from self._close_text()
            item = ResponseFunctionToolCall(id=_new_id("fc"), type="function_call", status="in_progress",
                                            call_id=call.get("id") or _new_id("call"),
                                            name=function.get("name") or "", arguments="")
            self._calls[index] = item
            self.output.append(item)
            yield self._event(ResponseOutputItemAddedEvent, type="response.output_item.added",
                              output_index=self._index(item), item=item.model_copy())
        if function.get("arguments"):
            item.arguments += function["arguments"]
            yield self._event(ResponseFunctionCallArgumentsDeltaEvent,
                              type="response.function_call_arguments.delta", item_id=item.id,
                              output_index=self._index(item), delta=function["arguments"])

    def _index(self, item: Any) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _close_text(self) -> Iterator[BaseModel]:
        item, self._text = self._text, None
        if item is None:
            return
        part = item.content[0]
        assert isinstance(part, ResponseOutputText)
        index = self._index(item)
        item.status = "incomplete" if self._finish_reason == "length" else "completed"
        yield self._event(ResponseTextDoneEvent, type="response.output_text.done", item_id=item.id,
                          output_index=index, content_index=0, text=part.text, logprobs=[])
        yield self._event(ResponseContentPartDoneEvent, type="response.content_part.done", item_id=item.id,
                          output_index=index, content_index=0, part=part)
        yield self._event(ResponseOutputItemDoneEvent, type="response.output_item.done", output_index=index,
                          item=item)

    def _close_calls(self) -> Iterator[BaseModel]:
        calls, self._calls = self._calls, {}
        for item in calls.values():
            item.status = "completed"
            index = self._index(item)
            yield self._event(ResponseFunctionCallArgumentsDoneEvent, type="response.function_call_arguments.done",
                              item_id=item.id, output_index=index, arguments=item.arguments, name=item.name)
            yield self._event(ResponseOutputItemDoneEvent, type="response.output_item.done", output_index=index,
                              item=item)

    def finish(self) -> Iterator[BaseModel]:
        """The closing events; ``self.final`` is then the whole Response."""
        if not self.output:  # no text at all: still one (empty) message, as a whole response has
            yield from self._open_text()
        yield from self._close_text()
        yield from self._close_calls()
        self.final = self.shaper.response("completed", self.output, self._usage, finish_reason=self._finish_reason)
        # response.completed even for a response cut by max_output_tokens (its status says
        # "incomplete"), as vLLM's server sends it: OpenAI sends response.incomplete there, which
        # the openai client's stream helper (get_final_response) and agent frameworks that wait
        # for response.completed do not take as an end.
        yield self._event(ResponseCompletedEvent, type="response.completed", response=self.final)

    def fail(self, error: APIError) -> Iterator[BaseModel]:
        self.final = self.shaper.response("failed", self.output, self._usage, error=error)
        yield self._event(ResponseFailedEvent, type="response.failed", response=self.final)


def sse(event: BaseModel) -> str:
    # Named events, as OpenAI and vLLM send them; no [DONE] after the last.
    return f"event: {event.type}\ndata: {event.model_dump_json(exclude_unset=True, by_alias=True)}\n\n"  # type: ignore[attr-defined]


def dump(response: Response) -> dict:
    return response.model_dump(mode="json", exclude_unset=True, by_alias=True)


# -- endpoints ----------------------------------------------------------------------------------


def _store() -> ResponseStore:
    app = current_app
    store = app.extensions.get("llmq.response_store")
    if store is None:
        store = app.extensions["llmq.response_store"] = ResponseStore(
            _gateway().redis, app.config["LLMQ_SETTINGS"].frontend.responses_ttl_s)
    return store


def _not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(f"Response with id '{response_id}' not found.", param=param, status=404,
                    type="invalid_request_error", code="not_found")


@endpoint(bp, "POST", "/v1/responses", summary="Create a model response (OpenAI's Responses API)",
          request=ResponsesRequest, parser=parse_responses, response=Response, content_types=STREAMABLE,
          errors=GENERATION_ERRORS)
def create_response(req: ResponsesRequest):
    raw = req.raw
    _check_model(req.model)
    store = _store()
    history: list[dict] = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        if previous.status in RUNNING or previous.status in ("failed", "cancelled"):
            raise BadRequest(f"previous_response_id: response '{req.previous_response_id}' is {previous.status}; "
                             f"only a completed or incomplete response can be continued",
                             param="previous_response_id")
        history = previous.conversation
    chat = parse_chat(to_chat_body(req, raw, history))
    shaper = Shaper(req)
    if req.background:
        # A background response has no client to lose, but may be cancelled or deleted from any
        # frontend: the gateway asks this once a poll interval, and cancels the engine work.
        client_gone: Callable[[], bool] | None = cancel_check(store, shaper.id)
    else:
        client_gone = None if req.stream else client_gone_check()
    try:
        prompt = _processor().chat_prompt(chat)
        gen = start_generation("chat", chat, [prompt], client_gone=client_gone)
    except BadRequest as e:
        raise rename_param(e) from None
    conversation = history + req.input_items
    logger.info("[%s] response %s (previous %s) in frontend pid %d", g.internal_id, shaper.id,
                req.previous_response_id, os.getpid())
    if req.background:
        return _run_in_background(gen, shaper, store, conversation)
    if req.stream:
        return _stream(gen, shaper, store if req.store else None, conversation)
    response = shaper.from_chat(gen.whole())
    if req.store:
        store.put(dump(response), conversation + as_input_items(response.output))
    return jsonify(dump(response)), 200, gen.headers(final=True)


def _stream(gen: Generation, shaper: Shaper, store: ResponseStore | None, conversation: list[dict]) -> FlaskResponse:
    # As chat streams do: the first delta before the 200, so an early failure has its own status.
    first = next(gen.deltas, None)
    assert not isinstance(first, Pause)  # this thread waits: no Pause (no sink here, app/sink.py)
    request_id = g.internal_id
    translator = StreamTranslator(shaper)

    def body() -> Iterator[str]:
        try:
            yield from map(sse, translator.start())
            for chunk in gen.chunks([first] if first is not None else []):
                if not isinstance(chunk, Pause):
                    yield from map(sse, translator.feed(chunk))
            yield from map(sse, translator.finish())
            if store is not None:
                store.put(dump(translator.final), conversation + as_input_items(translator.final.output))
        except APIError as e:
            logger.warning("[%s] failed mid-stream: %s", request_id, e.message)
            yield from map(sse, translator.fail(e))
            if store is not None:
                store.put(dump(translator.final), conversation)
        finally:
            gen.events.close()  # type: ignore[attr-defined]

    return FlaskResponse(stream_with_context(body()), mimetype="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **gen.headers(final=False)})


def _run_in_background(gen: Generation, shaper: Shaper, store: ResponseStore, conversation: list[dict]):
    """Answers at once with the queued response, and lets a thread of this process see the
    generation through. The admission places stay taken until the thread ends."""
    response_id = shaper.id
    queued = shaper.response("queued")
    store.put(dump(queued), conversation)  # before the thread reads events, and so checks for a cancel
    ticket: Ticket | None = request.environ.get(TICKET_ENVIRON_KEY)
    if ticket is not None:
        ticket.keep()
    request_id = g.internal_id

    def run() -> None:
        try:
            response = shaper.from_chat(gen.whole())
            store.update(response_id, response.status or "completed", dump(response),
                         conversation + as_input_items(response.output))
        except APIError as e:
            if store.status(response_id) in RUNNING:
                logger.warning("[%s] background response %s failed: %s", request_id, response_id, e.message)
                store.update(response_id, "failed", dump(shaper.response("failed", error=e)))
            else:
                logger.info("[%s] background response %s was cancelled or deleted; its engine work is "
                            "cancelled", request_id, response_id)
        except Exception:  # noqa: BLE001  a bug: the response must not stay in progress for ever
            logger.exception("[%s] background response %s failed", request_id, response_id)
            store.update(response_id, "failed",
                         dump(shaper.response("failed", error=APIError("internal error", status=503))))
        finally:
            if ticket is not None:
                ticket.release()

    threading.Thread(target=run, name=f"response-{response_id}", daemon=True).start()
    return jsonify(dump(queued)), 200, gen.headers(final=False)


def cancel_check(store: ResponseStore, response_id: str) -> Callable[[], bool]:
    return lambda: store.status(response_id) not in RUNNING


@endpoint(bp, "GET", "/v1/responses/<response_id>", summary="A stored response", response=Response, errors=(404,))
def get_response(response_id: str):
    for param in ("stream", "starting_after", "include", "include_obfuscation"):
        value = request.args.get(param)
        if value is not None and value.lower() not in ("false", ""):
            raise BadRequest(f"{param}: not supported; a stored response is returned whole", param=param)
    stored = _store().get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return jsonify(stored.response)


@endpoint(bp, "DELETE", "/v1/responses/<response_id>", summary="Delete a stored response",
          response=openapi.DeletedResponse, errors=(404,))
def delete_response(response_id: str):
    # A running background response finds itself gone at its next check, and stops.
    if not _store().delete(response_id):
        raise _not_found(response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


@endpoint(bp, "POST", "/v1/responses/<response_id>/cancel", summary="Cancel a background response",
          response=Response, errors=(400, 404))
def cancel_response(response_id: str):
    store = _store()
    before = store.cancel(response_id)
    if before is None:
        raise _not_found(response_id)
    if before not in RUNNING:
        raise BadRequest(f"Cannot cancel a response that is {before}; only a background response that is "
                         f"queued or in progress can be cancelled.", param="response_id")
    stored = store.get(response_id)
    if stored is None:  # deleted in between
        raise _not_found(response_id)
    return jsonify(stored.response)
