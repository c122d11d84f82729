"""Every HTTP route's one registration: its request schema, which validates the body, and its
answers, which the OpenAPI document (app/openapi.py, ``GET /openapi.json``) describes.

A route is one ``@endpoint(...)`` line over its view. The view receives the validated body, so
the document is built from the very schemas that validate the requests and cannot drift from
them; tests/test_openapi.py checks the answers against it on a live deployment.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import Blueprint, current_app, g, request
from pydantic import BaseModel
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.auth import APIKeys
from app.errors import BadRequest, Unauthorized
from app.schemas import parse


@dataclass(frozen=True)
class Endpoint:
    method: str
    rule: str  # Flask's form: /v1/models/<path:model_id>
    name: str  # the OpenAPI operationId
    summary: str
    request: type[BaseModel] | None  # the JSON body's schema; None = no body
    # The 200's JSON body; None for a body of another content type (content_types).
    response: type[BaseModel] | None
    content_types: tuple[str, ...] = ("application/json",)
    # Statuses whose answer is OpenAI's error shape, beyond those every route can give (errors()).
    errors: tuple[int, ...] = ()
    # Statuses answered with another body (e.g. /health's 503), status -> schema.
    other: dict[int, type[BaseModel]] = field(default_factory=dict)
    auth: bool = True  # the API key is checked (when frontend.api_key is set)

    def statuses(self) -> list[int]:
        """Every error status this route may answer with OpenAI's error shape."""
        codes = set(self.errors) | {503}  # Redis unavailable, on every route that touches it
        if self.request is not None:
            codes |= {400, 413}
        if self.auth:
            codes.add(401)
        return sorted(codes - set(self.other))


ENDPOINTS: list[Endpoint] = []


def endpoint(bp: Blueprint, method: str, rule: str, *, summary: str, request: type[BaseModel] | None = None,
             response: type[BaseModel] | None = None, content_types: tuple[str, ...] = ("application/json",),
             errors: tuple[int, ...] = (), other: dict[int, type[BaseModel]] | None = None,
             auth: bool = True, parser: Callable[[object], BaseModel] | None = None) -> Callable:
    """Registers a view on ``bp`` and in the document. With ``request``, the view's first
    argument is the validated body (a 400 naming the field otherwise); the API key is checked
    first, so a caller without it learns nothing about the body. ``parser`` replaces the plain
    validation for a body with checks across fields (it must validate with ``request`` first)."""
    def register(view: Callable) -> Callable:
        spec = Endpoint(method.upper(), rule, view.__name__, summary, request, response, content_types,
                        errors, other or {}, auth)

        @functools.wraps(view)
        def handler(**kwargs):
            if spec.auth:
                check_api_key()
            if spec.request is not None:
                body = json_body()
                return view(parser(body) if parser is not None else parse(spec.request, body), **kwargs)
            return view(**kwargs)

        bp.add_url_rule(rule, view.__name__, handler, methods=[spec.method])
        ENDPOINTS.append(spec)
        return view
    return register


def openapi_path(rule: str) -> tuple[str, list[str]]:
    """Flask's rule as an OpenAPI path, and its path parameters: ``/a/<path:x>`` -> ``/a/{x}``."""
    params: list[str] = []

    def param(m: re.Match) -> str:
        params.append(m.group(2))
        return "{" + m.group(2) + "}"

    return re.sub(r"<(?:(\w+):)?(\w+)>", param, rule), params


def check_api_key() -> None:
    keys: APIKeys = current_app.extensions["llmq.api_keys"]
    if not keys.required:
        return
    name = keys.name_for(request.headers.get("Authorization", ""))
    if name is None:
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
    g.api_key_name = name


def json_body() -> object:
    if not request.is_json:
        raise BadRequest("the request body is not valid JSON (or Content-Type is not application/json)")
    try:
        raw = request.get_data(cache=False)
        # Without a Content-Length (a chunked body) werkzeug stops reading at MAX_CONTENT_LENGTH
        # and returns what it has, as if the body ended there: any byte left means it was over.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if (limit is not None and request.content_length is None and len(raw) >= limit
                and request.environ["wsgi.input"].read(1)):
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except Exception as e:  # noqa: BLE001  a broken chunked encoding fails in gunicorn's reader
        raise BadRequest(f"the request body could not be read: {type(e).__name__}") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as e:  # invalid JSON or invalid UTF-8
        raise BadRequest(f"the request body is not valid JSON: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
