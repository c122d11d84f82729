"""The OpenAPI document, built from the route registry (app/api.py): the request schemas are the
pydantic models that validate the bodies; the answers are described by the models below, which
tests/test_openapi.py holds the live answers to."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, RootModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app.api import ENDPOINTS, Endpoint, openapi_path
from config import Settings

REF = "#/components/schemas/{model}"


# -- answers ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx but /health's."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


# One server-sent event, the schema OpenAPI gives for text/event-stream (OpenAPI 3.0/3.1 put the
# per-event schema in "schema"; 3.2 names it itemSchema): a JSON chunk in "data", or "[DONE]".
SSE_EVENT = {"type": "object", "properties": {
    "data": {"type": "string", "contentMediaType": "application/json"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}


class ChatCompletion(BaseModel):
    """The whole answer; with ``stream``, server-sent events of chat.completion.chunk objects."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    # None for an echoed prompt's first token, which nothing precedes.
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    """The whole answer; with ``stream``, server-sent events of text_completion objects."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Health(BaseModel):
    """``ok`` with the live workers by role, or ``unhealthy`` with the reason (a 503)."""

    status: Literal["ok", "unhealthy"]
    reason: str | None = None
    workers: int | None = None
    roles: dict[str, int] | None = None


class TargetGroup(BaseModel):
    targets: list[str]
    labels: dict[str, str]


class Targets(RootModel[list[TargetGroup]]):
    """Prometheus HTTP service discovery: every live worker's and router's /metrics."""


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


class OpenAPIDocument(RootModel[dict[str, Any]]):
    """This document."""


# -- the document ----------------------------------------------------------------------------


def document(settings: Settings) -> dict:
    requests = sorted({e.request for e in ENDPOINTS if e.request}, key=lambda m: m.__name__)
    answers = {ErrorResponse} | {e.response for e in ENDPOINTS if e.response}
    answers |= {m for e in ENDPOINTS for m in e.other.values()}
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m, "validation") for m in requests]
    inputs += [(m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)]
    refs, schemas = models_json_schema(inputs, ref_template=REF)
    components = schemas.get("$defs", {})
    for model in requests:
        # The deployment serves one model: any other name is a 404, so the document says which.
        props = components[model.__name__].get("properties", {})
        if "model" in props and "type" in props["model"]:
            props["model"]["enum"] = [settings.model.name]

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict:
        return refs[(model, mode)]

    def operation(e: Endpoint) -> dict:
        ok: dict[str, Any] = {}
        for ctype in e.content_types:
            if ctype == "text/event-stream":
                ok[ctype] = {"schema": SSE_EVENT}
            elif ctype == "application/json" and e.response is not None:
                ok[ctype] = {"schema": ref(e.response, "serialization")}
            else:
                ok[ctype] = {"schema": {"type": "string"}}
        responses: dict[str, Any] = {"200": {"description": (e.response.__doc__ or "OK").strip().splitlines()[0]
                                             if e.response else "OK", "content": ok}}
        for status in e.statuses():
            responses[str(status)] = {"description": _STATUS[status],
                                      "content": {"application/json": {"schema": ref(ErrorResponse, "serialization")}}}
        for status, model in e.other.items():
            responses[str(status)] = {"description": _STATUS.get(status, "see the body"),
                                      "content": {"application/json": {"schema": ref(model, "serialization")}}}
        op: dict[str, Any] = {"operationId": e.name, "summary": e.summary, "responses": responses}
        _, params = openapi_path(e.rule)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                for p in params]
        if e.request is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(e.request, "validation")}}}
        if e.auth and settings.frontend.api_key:
            op["security"] = [{"apiKey": []}]
        return op

    paths: dict[str, dict] = {}
    for e in ENDPOINTS:
        path, _ = openapi_path(e.rule)
        paths.setdefault(path, {})[e.method.lower()] = operation(e)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "llmq: the OpenAI API over a Celery queue of vLLM workers", "version": "1"},
        "paths": paths,
        "components": {"schemas": components},
    }
    if settings.frontend.api_key:
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    return doc


_STATUS = {
    400: "invalid request, naming the field (param)",
    401: "missing or invalid API key",
    404: "unknown model",
    413: "request body over frontend.max_body_bytes",
    429: "past an admission limit; Retry-After says when to retry",
    499: "the client closed the connection",
    503: "no live worker, Redis unavailable, or the request could not move off a lost worker",
    504: "no worker took the request in time, or it ran past its deadline",
}
