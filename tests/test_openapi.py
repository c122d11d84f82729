"""GET /openapi.json describes every route, and the live deployment keeps to it.

schemathesis draws requests from the document, valid ones and ones the document forbids, for
every operation, and sends them to the real deployment (gunicorn, a decode worker, the tiny
model). It holds when no answer is a 5xx, each answer's status, content type and JSON body are
those the document gives for it, and every request the document forbids is refused with a 4xx.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

import app.responses_api  # noqa: F401  registers /v1/responses in ENDPOINTS
import app.routes  # noqa: F401  registers every route in ENDPOINTS
from app.api import ENDPOINTS, openapi_path
from test_bad_input import UNHANDLED, metric

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# Output budgets the document allows run up to the whole context; the fuzz's are a few tokens, so
# that its hundreds of requests stay within seconds. Budgets outside the allowed range go as drawn.
BUDGETS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
FEW_TOKENS = 2
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 20}


def _root(dep) -> str:
    return f"http://127.0.0.1:{dep.settings.frontend.port}"


@pytest.fixture(scope="module")
def api_schema(deployment):
    return schemathesis.openapi.from_url(f"{_root(deployment)}/openapi.json", timeout=10)


def test_document_lists_every_route(deployment):
    doc = httpx.get(f"{_root(deployment)}/openapi.json", timeout=10).json()
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(e.method, openapi_path(e.rule)[0]) for e in ENDPOINTS}
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/health"} <= set(doc["paths"])
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    assert props["model"]["enum"] == ["tiny-llama"] and "echo" in props and "logit_bias" in props


def _bound_budgets(case) -> None:
    if case.path not in GENERATION_PATHS or not isinstance(case.body, dict):
        return
    if not any(k in case.body for k in BUDGETS):
        case.body["max_output_tokens" if case.path == "/v1/responses" else "max_tokens"] = FEW_TOKENS
    for key in BUDGETS:
        value = case.body.get(key)
        if type(value) is int and FEW_TOKENS < value < 2**31:
            case.body[key] = FEW_TOKENS


# Each route in both modes: requests the document allows, and requests it forbids in their body
# (any string is a valid path parameter). schemathesis' pytest plugin does not run under pytest 9
# (it sets a node attribute pytest 9 removed), so each operation's strategy is driven here.
CASES = [pytest.param(e.method, openapi_path(e.rule)[0], mode, id=f"{e.method} {e.rule} {mode}")
         for e in ENDPOINTS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or e.request is not None]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,path,mode", CASES)
def test_api_keeps_to_its_document(api_schema, deployment, method, path, mode):
    operation = api_schema[path][method]
    root = _root(deployment)

    @settings(max_examples=EXAMPLES[mode], deadline=20_000, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def keeps_to_it(case):
        _bound_budgets(case)
        before = metric(deployment, UNHANDLED)
        case.call_and_validate(base_url=root, checks=CHECKS, timeout=60)
        assert metric(deployment, UNHANDLED) == before, "a request reached the catch-all handler (a bug)"

    keeps_to_it()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_a_stream_keeps_to_its_document(api_schema, deployment, path, body):
    # The fuzz draws a stream that succeeds only now and then; each server-sent event is checked
    # against the document's text/event-stream schema here every time.
    body = {**body, "model": deployment.settings.model.name, "stream": True, "max_tokens": FEW_TOKENS}
    case = api_schema[path]["POST"].Case(body=body, media_type="application/json")
    case.call_and_validate(base_url=_root(deployment), checks=CHECKS, timeout=60)
