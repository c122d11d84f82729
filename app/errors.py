"""One error shape for every failure: OpenAI's {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import redis
from flask import Flask, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException, InternalServerError

from app import metrics


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class BadRequest(APIError):
    """Malformed or invalid request (400)."""


class Unauthorized(APIError):
    """Missing or wrong API key (401)."""

    status = 401
    type = "authentication_error"


class ModelNotFound(APIError):
    """The request names a model this deployment does not serve (404)."""

    status = 404
    type = "not_found_error"


class NoWorkers(APIError):
    """No live worker can take the request (503). Retry-After: a worker that restarts, or whose
    consumer reconnects after a Redis failover, holds its lease again within seconds."""

    status = 503
    type = "service_unavailable"
    retry_after_s = 2


class ClientGone(APIError):
    """The client hung up before its answer was whole. Nobody reads this status; the access
    log shows it, as nginx's 499 does."""

    status = 499
    type = "client_closed_request"


class UpstreamTimeout(APIError):
    """The request did not finish within its deadline (504)."""

    status = 504
    type = "timeout"


class RedisUnavailable(APIError):
    """Redis, the broker and the token path in one, does not answer (503). Retry-After: a Redis
    that the launcher started is back within about a second, and the workers consume again within
    seconds more (README, "Failure behaviour")."""

    status = 503
    type = "service_unavailable"
    retry_after_s = 2

    @classmethod
    def from_error(cls, e: Exception) -> RedisUnavailable:
        return cls(f"Redis is unavailable ({type(e).__name__}: {e}); retry shortly")




def error_response(err: APIError):
    retry_after = getattr(err, "retry_after_s", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return jsonify(err.body()), err.status, headers


# An oversized body this large or smaller is read and dropped before the 413 goes out, so a client
# that sends its whole body before it reads the answer gets the 413 rather than a broken pipe.
# A larger one is refused unread, and its connection closed.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024


def _drain_refused_body() -> None:
    # A chunked body has no length: it is read up to the same limit, or to its end.
    remaining = request.content_length if request.content_length is not None else DRAIN_LIMIT_BYTES
    if remaining > DRAIN_LIMIT_BYTES:
        return
    stream = request.environ["wsgi.input"]
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 16))
        if not chunk:
            return
        remaining -= len(chunk)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(APIError, error_response)

    # An outage, not a bug: a fast 503 the client can retry, not the catch-all below. What the
    # Redis client (redis-py) and the broker client (kombu, under send_task) raise when Redis
    # does not answer.
    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def _redis_unavailable(e: Exception):
        app.logger.warning("Redis unavailable: %s: %s", type(e).__name__, e)
        return error_response(RedisUnavailable.from_error(e))

    # Routing errors (404, 405) and body limits (413) come from werkzeug before any blueprint
    # sees the request, so they are handled on the app, in the same shape.
    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if isinstance(e, InternalServerError):  # Flask's answer when an error handler itself failed
            return _unexpected(e.original_exception or e)
        kind: dict[int | None, str] = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large"}
        if e.code == 413:
            _drain_refused_body()
        return error_response(APIError(e.description or e.name, status=e.code,
                                       type=kind.get(e.code, "invalid_request_error")))

    # For bugs only: every input a client can send has its own 4xx above. A request that gets
    # here is logged with its traceback and counted, so a test or an alert sees it.
    @app.errorhandler(Exception)
    def _unexpected(e: BaseException):
        metrics.UNHANDLED_ERRORS.inc()
        app.logger.error("unhandled error (a bug) on %s %s", request.method, request.path, exc_info=e)
        return error_response(APIError(f"internal error: {type(e).__name__}", status=503,
                                       type="server_error"))
