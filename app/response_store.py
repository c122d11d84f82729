"""Stored /v1/responses responses, in Redis, so that any frontend process on any node can return
one (GET), delete it, cancel it while it runs in the background, or continue its conversation
(``previous_response_id``).

One hash per response (tasks.keys.stored_response), expiring ``frontend.responses_ttl_s`` after
its last write:

- ``status``: ``queued`` or ``in_progress`` while a background response runs, then ``completed``,
  ``incomplete``, ``failed`` or ``cancelled``. The body's own ``status`` is overwritten by it on
  read, so a cancel is one field, not a rewrite of the body.
- ``response``: the Response body as the client got it.
- ``conversation``: every input item of the conversation so far (the previous turns' too), then
  this turn's output items, as Responses input items: a next turn's messages are its
  ``instructions``, this list, and its own input. Instructions are not kept, as OpenAI does not
  carry them over. Each response keeps its whole conversation rather than a link to the one
  before, so a turn whose predecessor expired or was deleted can still be continued.

A running background response's writes go through ``_UPDATE_LUA``, which writes only while the
status is still running: a cancel (or a delete) that came first wins, and the late result is
dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis

from tasks import keys

RUNNING = ("queued", "in_progress")

# KEYS[1]: the hash. ARGV: ttl seconds, status, response JSON ("" keeps it), conversation JSON
# ("" keeps it). Writes only if the response exists and is still running. Returns 1 if written.
_UPDATE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'in_progress' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'response', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'conversation', ARGV[4]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS[1]: the hash. Marks a running response cancelled. Returns {found (0/1), status before}.
_CANCEL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {0, ''}
end
if status == 'queued' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
end
return {1, status}
"""


@dataclass
class StoredResponse:
    status: str
    response: dict  # with ``status`` set to the stored status
    conversation: list[dict]


class ResponseStore:
    def __init__(self, client: redis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s
        self._update = client.register_script(_UPDATE_LUA)
        self._cancel = client.register_script(_CANCEL_LUA)

    def put(self, response: dict, conversation: list[dict]) -> None:
        key = keys.stored_response(response["id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={"status": response["status"], "response": _dumps(response),
                                "conversation": _dumps(conversation)})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def update(self, response_id: str, status: str, response: dict | None = None,
               conversation: list[dict] | None = None) -> bool:
        """Writes a running response's new status (and body, and conversation), unless it was
        cancelled or deleted meanwhile. True if written."""
        return bool(self._update(keys=[keys.stored_response(response_id)], args=[
            self.ttl_s, status, _dumps(response) if response is not None else "",
            _dumps(conversation) if conversation is not None else ""]))

    def get(self, response_id: str) -> StoredResponse | None:
        fields = cast("dict[bytes, bytes]", self.redis.hgetall(keys.stored_response(response_id)))
        if not fields or b"response" not in fields:
            return None
        status = fields[b"status"].decode()
        response = json.loads(fields[b"response"])
        response["status"] = status
        return StoredResponse(status, response, json.loads(fields.get(b"conversation", b"[]")))

    def status(self, response_id: str) -> str | None:
        """The stored status, or None once the response is gone (deleted or expired)."""
        status = cast("bytes | None", self.redis.hget(keys.stored_response(response_id), "status"))
        return status.decode() if status is not None else None

    def cancel(self, response_id: str) -> str | None:
        """Cancels a running response. Returns its status before (a status not in RUNNING means
        nothing was changed), or None if there is no such response."""
        found, before = self._cancel(keys=[keys.stored_response(response_id)])
        return before.decode() if found else None

    def delete(self, response_id: str) -> bool:
        return bool(self.redis.delete(keys.stored_response(response_id)))


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
