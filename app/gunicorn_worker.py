"""gunicorn's gthread worker, with the errors gunicorn answers itself in OpenAI's shape.

A request line or header over gunicorn's limits (``limit_request_line``,
``limit_request_field_size``, ``limit_request_fields``), or one it cannot parse, never reaches
the app: gunicorn's worker writes an HTML page for it. This worker writes the same status as
{"error": {"message", "type", "param", "code"}} instead, like every other error of the API.
"""

from __future__ import annotations

import json

from gunicorn import util
from gunicorn.http import errors
from gunicorn.workers.gthread import ThreadWorker

# (exception types, status, reason); the first match wins. Errors in the app's own response
# headers, gunicorn's configuration or TLS stay gunicorn's (they are not the client's).
_CLIENT_ERRORS: list[tuple[tuple[type[Exception], ...], int, str]] = [
    ((errors.InvalidResponseHeader, errors.InvalidResponseHeaderName), 0, ""),
    ((errors.LimitRequestHeaders,), 431, "Request Header Fields Too Large"),
    ((errors.LimitRequestLine,), 414, "URI Too Long"),
    ((errors.InvalidRequestLine, errors.InvalidRequestMethod, errors.InvalidHTTPVersion, errors.InvalidHeader,
      errors.InvalidHeaderName, errors.ObsoleteFolding, errors.InvalidChunkSize, errors.ChunkMissingTerminator,
      errors.InvalidChunkExtension, errors.InvalidSchemeHeaders, errors.InvalidProxyLine), 400, "Bad Request"),
]


def client_error(exc: BaseException) -> tuple[int, str] | None:
    """The status and reason for an error of the client's request, or None for any other."""
    for types, status, reason in _CLIENT_ERRORS:
        if isinstance(exc, types):
            return (status, reason) if status else None
    return None


def error_bytes(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class JsonErrorThreadWorker(ThreadWorker):
    def handle_error(self, req, client, addr, exc):
        answer = client_error(exc)
        if answer is None:
            return super().handle_error(req, client, addr, exc)
        status, reason = answer
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        try:
            util.write_nonblock(client, error_bytes(status, reason, f"{reason}: {exc}"))
        except Exception:  # noqa: BLE001  the client may be gone; gunicorn's own writer does the same
            self.log.debug("Failed to send error message.")
        return None
