"""Turns vLLM's RequestOutputs into wire events and appends them to the request's Redis Stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from tasks import keys
from tasks.messages import Accepted, Delta, Failed, OutputEvent, SamplingSpec, TokenLogprob, TopLogprob, encode_event

logger = logging.getLogger(__name__)


def _append(pipe, key: str, events: Sequence[OutputEvent]) -> None:
    """The one place that shapes a stream entry: field "m", an encoded OutputEvent."""
    for event in events:
        pipe.xadd(key, {"m": encode_event(event)})


class OutputWriter:
    """Appends events to one request's stream. The stream expires, so nothing is left behind.

    Synchronous: the task thread writes Accepted, Finished and failures with it; tokens go
    through ``BatchedStreamWriter`` on the engine's loop.
    """

    def __init__(self, client, request_id: str, ttl_s: int):
        self._client = client
        self._request_id = request_id
        self._key = keys.output_stream(request_id)
        self._ttl_s = ttl_s

    def _pipeline(self, events: list[OutputEvent]):
        pipe = self._client.pipeline(transaction=False)
        _append(pipe, self._key, events)
        pipe.expire(self._key, self._ttl_s)
        return pipe

    def write(self, events: list[OutputEvent]) -> None:
        if events:
            self._pipeline(events).execute()

    def fail(self, status: int, error_type: str, message: str) -> None:
        self.write([Failed(status=status, type=error_type, message=message)])

    def accept(self, worker_id: str, claim_ttl_s: float) -> str:
        """Claims the request for this worker and writes its Accepted, in one atomic step, unless
        the frontend has cancelled it or another copy of its message was claimed first.

        Returns ``ACCEPTED``, ``CANCELLED`` or ``CLAIMED`` (the second copy of a message). Atomic,
        so a request is claimed if and only if its stream says Accepted: the frontend may then
        resend a message that has no Accepted (its worker may have died holding it), and the
        copy that runs second finds the claim and is dropped before the client could see it.
        """
        request_id = self._request_id
        # register_script costs a SHA1 of the source; the call is EVALSHA, loading the script
        # on a Redis that does not hold it yet (a new one, or one restarted).
        reply = self._client.register_script(_ACCEPT_LUA)(
            keys=[keys.cancel_flag(request_id), keys.claim(request_id), self._key],
            args=[worker_id, max(1, int(claim_ttl_s)), encode_event(Accepted(worker_id)), self._ttl_s])
        return reply.decode() if isinstance(reply, bytes) else str(reply)


ACCEPTED, CANCELLED, CLAIMED = "accepted", "cancelled", "claimed"

# KEYS: the cancel flag, the claim, the output stream. ARGV: worker id, claim TTL, the encoded
# Accepted event, the stream's TTL. The stream entry is shaped as _append shapes it (field "m").
_ACCEPT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'cancelled' end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 'claimed' end
redis.call('XADD', KEYS[3], '*', 'm', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 'accepted'
"""


class BatchedStreamWriter:
    """Appends every running request's events to their streams, one pipeline per round trip.

    Why: an engine step hands the loop one output per running request, and a round trip per
    output was half the decode worker's CPU at 32 requests (py-spy, bench/README.md). Writes
    that arrive while a flush is in flight go into the next one, so a slow Redis means bigger
    batches, not more round trips. One flush runs at a time, in arrival order, so each stream
    keeps its order. ``write`` returns once its events are in Redis, which keeps backpressure.

    It does not touch the streams' TTL: Accepted set it, Finished sets it again, and the config
    makes it outlast the request (config.py, ``_streams_outlive_requests``).
    """

    def __init__(self, client):
        self._client = client  # a redis.asyncio.Redis bound to the engine's loop
        self._pending: list[tuple[str, Sequence[OutputEvent], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def write(self, request_id: str, events: Sequence[OutputEvent]) -> None:
        if events:
            await self.submit(request_id, events)

    def submit(self, request_id: str, events: Sequence[OutputEvent]) -> asyncio.Future:
        """Queues the events; the future is done once they are in Redis, or holds the failure.
        A request that awaits its previous future before submitting more keeps the backpressure
        ``write`` has, without waiting for each flush (see workers/decode.py)."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((keys.output_stream(request_id), events, done))
        if self._flusher is None or self._flusher.done():
            # Started, not awaited: it runs after every request woken by this step has queued.
            self._flusher = asyncio.create_task(self._flush())
        return done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            pipe = self._client.pipeline(transaction=False)
            for key, events, _ in batch:
                _append(pipe, key, events)
            try:
                await pipe.execute()
            except Exception as e:  # noqa: BLE001  each writer hears of it and fails its request
                for _, _, done in batch:
                    if not done.done():  # a writer that timed out has cancelled its future
                        done.set_exception(e)
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)


# A token a grammar rules out has a logprob of -inf, which JSON cannot carry (msgspec writes null);
# vLLM's server reports it as this floor.
MIN_LOGPROB = -9999.0


def _token_logprob(token_id: int, candidates: Any, num_top: int) -> TokenLogprob:
    """One position's logprob from vLLM's {token id: Logprob} (the chosen token and the top ones)."""
    chosen = candidates[token_id]
    ranked = sorted(candidates.values(), key=lambda lp: lp.rank)
    top = [TopLogprob(lp.decoded_token or "", max(lp.logprob, MIN_LOGPROB)) for lp in ranked[:num_top]]
    return TokenLogprob(token_id, chosen.decoded_token or "", max(chosen.logprob, MIN_LOGPROB), top)


def _logprobs(completion: Any, num_top: int) -> list[TokenLogprob]:
    return [_token_logprob(token_id, candidates, num_top)
            for token_id, candidates in zip(completion.token_ids, completion.logprobs)]


def _prompt_logprobs(output: Any, num_top: int) -> list[TokenLogprob]:
    # vLLM gives None for the first prompt token, which nothing precedes: left out on the wire.
    return [_token_logprob(token_id, candidates, num_top)
            for token_id, candidates in zip(output.prompt_token_ids, output.prompt_logprobs) if candidates]


class DeltaMaker:
    """Turns one request's vLLM RequestOutputs (DELTA output kind) into Deltas: one per choice
    that moved. vLLM hands the prompt logprobs over once, on the first output, while each choice's
    first Delta carries them, so a choice that starts later still gets them."""

    def __init__(self, spec: SamplingSpec):
        self._num_logprobs = spec.logprobs
        self._num_prompt_logprobs = spec.prompt_logprobs
        self._prompt: list[TokenLogprob] | None = None
        self._started: set[int] = set()

    def __call__(self, output: Any) -> list[Delta]:
        if self._num_prompt_logprobs is not None and self._prompt is None and output.prompt_logprobs is not None:
            self._prompt = _prompt_logprobs(output, self._num_prompt_logprobs)
        deltas = []
        for c in output.outputs:
            first = c.index not in self._started
            self._started.add(c.index)
            deltas.append(Delta(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                logprobs=_logprobs(c, self._num_logprobs) if self._num_logprobs is not None and c.logprobs else None,
                finish_reason=c.finish_reason,
                prompt_logprobs=self._prompt if first else None,
            ))
        return deltas


def reject_malformed(client, payload: object, reason: str, ttl_s: int) -> None:
    """A task whose message does not decode: tell its client, if it says who that is."""
    rid = payload.get("request_id") if isinstance(payload, dict) else None
    logger.error("[%s] malformed task: %s", rid, reason)
    if isinstance(rid, str):
        OutputWriter(client, rid, ttl_s).fail(400, "invalid_request_error", f"malformed task: {reason}")
