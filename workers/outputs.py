"""Turns vLLM's RequestOutputs into wire events and appends them to the request's Redis Stream."""

from __future__ import annotations

from typing import Any

import logging

from tasks import keys
from tasks.messages import Delta, Failed, OutputEvent, TokenLogprob, TopLogprob, encode_event

logger = logging.getLogger(__name__)


class OutputWriter:
    """Appends events to one request's stream. The stream expires, so nothing is left behind.

    ``client`` is a redis.Redis for ``write`` and a redis.asyncio.Redis for ``awrite``; the worker
    streams tokens from the engine's event loop (async) and reports failures from its task thread.
    """

    def __init__(self, client, request_id: str, ttl_s: int):
        self._client = client
        self._key = keys.output_stream(request_id)
        self._ttl_s = ttl_s

    def _pipeline(self, events: list[OutputEvent]):
        pipe = self._client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self._key, {"m": encode_event(event)})
        pipe.expire(self._key, self._ttl_s)
        return pipe

    def write(self, events: list[OutputEvent]) -> None:
        if events:
            self._pipeline(events).execute()

    async def awrite(self, events: list[OutputEvent]) -> None:
        if events:
            await self._pipeline(events).execute()

    def fail(self, status: int, error_type: str, message: str) -> None:
        self.write([Failed(status=status, type=error_type, message=message)])


def _logprobs(completion: Any, num_top: int) -> list[TokenLogprob]:
    result = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank)
        top = [TopLogprob(lp.decoded_token or "", lp.logprob) for lp in ranked[:num_top]]
        result.append(TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top))
    return result


def deltas_from(output: Any, num_logprobs: int | None) -> list[Delta]:
    """One Delta per choice that moved in this RequestOutput (DELTA output kind)."""
    return [
        Delta(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            logprobs=_logprobs(c, num_logprobs) if num_logprobs is not None and c.logprobs else None,
            finish_reason=c.finish_reason,
        )
        for c in output.outputs
    ]


def reject_malformed(client, payload: object, reason: str, ttl_s: int) -> None:
    """A task whose message does not decode: tell its client, if it says who that is."""
    rid = payload.get("request_id") if isinstance(payload, dict) else None
    logger.error("[%s] malformed task: %s", rid, reason)
    if isinstance(rid, str):
        OutputWriter(client, rid, ttl_s).fail(400, "invalid_request_error", f"malformed task: {reason}")
