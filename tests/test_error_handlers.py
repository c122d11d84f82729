"""The frontend's error handlers: the catch-all is for bugs, and says so; gunicorn's own refusals
come in OpenAI's shape too."""

from __future__ import annotations

import json
import logging

from flask import Flask
from gunicorn.http import errors as gunicorn_errors
from prometheus_client import REGISTRY

from app.errors import BadRequest, register_error_handlers
from app.gunicorn_worker import client_error, error_bytes


class _Unsendable(Exception):
    pass


def _app() -> Flask:
    app = Flask(__name__)
    register_error_handlers(app)

    @app.post("/bug")
    def bug():
        raise KeyError("a bug")

    @app.post("/broken-handler")
    def broken_handler():
        raise _Unsendable("no")

    @app.errorhandler(_Unsendable)
    def _fails(e):
        raise RuntimeError("an error handler with a bug")

    @app.post("/bad")
    def bad():
        raise BadRequest("no", param="x")

    return app


def _unhandled() -> float:
    return REGISTRY.get_sample_value("llmq_frontend_unhandled_errors_total") or 0.0


def test_catch_all_is_logged_as_error_counted_and_openai_shaped(caplog):
    before = _unhandled()
    with caplog.at_level(logging.ERROR):
        resp = _app().test_client().post("/bug")
    assert resp.status_code == 503
    assert set(resp.json["error"]) == {"message", "type", "param", "code"}
    assert resp.json["error"]["type"] == "server_error"
    assert _unhandled() == before + 1
    [record] = [r for r in caplog.records if "unhandled" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info and record.exc_info[0] is KeyError
    assert "/bug" in record.getMessage()


def test_client_errors_do_not_reach_the_catch_all():
    before = _unhandled()
    client = _app().test_client()
    assert client.post("/bad").status_code == 400
    assert client.post("/nope").status_code == 404
    assert _unhandled() == before


def test_gunicorn_refusals_map_to_openai_statuses():
    assert client_error(gunicorn_errors.LimitRequestHeaders("limit request headers fields size")) == (
        431, "Request Header Fields Too Large")
    assert client_error(gunicorn_errors.LimitRequestLine(5000, 4094))[0] == 414
    assert client_error(gunicorn_errors.InvalidHeaderName("x y"))[0] == 400
    # The app's own bad response header and anything else stay gunicorn's (a 500: not the client's).
    assert client_error(gunicorn_errors.InvalidResponseHeaderName("x y")) is None
    assert client_error(RuntimeError("boom")) is None


def test_gunicorn_refusal_is_a_complete_json_response():
    raw = error_bytes(431, "Request Header Fields Too Large", "Request Header Fields Too Large: \u00e9 \"q\"")
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert "Content-Type: application/json" in lines and f"Content-Length: {len(body)}" in lines
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"].endswith('\u00e9 "q"')


def test_an_error_handler_that_fails_is_a_counted_503_not_a_500():
    before = _unhandled()
    resp = _app().test_client().post("/broken-handler")
    assert resp.status_code == 503 and resp.json["error"]["type"] == "server_error"
    assert _unhandled() == before + 1
