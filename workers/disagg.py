"""Disaggregated prefill, both sides, following Dynamo's sequence.

Decode side (``RemotePrefill``): decide per request; for a remote prefill, subscribe to the reply
channels, put a PrefillRequest on the ``prefill`` queue, and wait on Redis pub/sub while the engine
keeps decoding other requests. Anything short of a usable answer in time (no prefill worker, a
dead one, a deadline, bad params) ends in a local prefill: the client gets its normal answer
either way.

Prefill side (``PrefillServer``): skip work for a decode worker that is gone or stopped waiting,
run the prompt with max_tokens=1 so the engine keeps the KV for a decoder, and tell the decoder
(push: with the first token, sampled with the request's own sampling where
``first_token_from_prefill`` allows, which the decode worker streams before its engine starts).

What differs between the connectors (the leg params, the wait, the claim, the settle step) is
the worker's KvTransfer strategy: kvtransfer/transfer.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from config import Settings
from kvtransfer import push
from kvtransfer.connector import BadTransferParams
from kvtransfer.policy import ThresholdSource, should_prefill_remotely
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from kvtransfer.transfer import PushTransfer, close, flag_ttl_s, transfer_for
from tasks import keys, queues
from tasks.messages import Delta, GenerateRequest, PrefillDone, PrefillRequest, SamplingSpec, encode_prefill_done
from tasks.registry import alive_workers, is_alive
from workers.outputs import DeltaMaker

logger = logging.getLogger(__name__)

PREFILL_LIVENESS_CACHE_S = 1.0

@dataclass(frozen=True)
class DecodeLeg:
    """What the decode engine runs for a request whose prompt was prefilled remotely."""

    kv_transfer_params: dict
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    # The first token, sampled by the prefill engine: streamed before any of the decode engine's.
    first: Delta | None = None
    # The first token ended the request: the decode engine's request only takes the pushed KV,
    # so that the prefill engine gives its blocks back; its tokens are nobody's.
    release_only: bool = False


def first_token_from_prefill(sampling: SamplingSpec) -> bool:
    """Whether the prefill engine may sample the request's first token and the decode engine
    continue from it (prompt + [t1]), with the same outcome as sampling t1 on the decode engine.
    Not for:
    - n > 1: the choices share one prefill, one token each is not what it samples;
    - structured output: the grammar's state would have to start after t1;
    - stop strings: a stop string can span t1's text and the next tokens', and the decode engine
      looks for it only in its own output;
    - presence and frequency penalties: they count output tokens, and t1 is the decode engine's
      prompt (the repetition penalty counts prompt and output alike, so it stays exact);
    - a seed with temperature > 0: the decode engine's generator would start afresh and draw t2
      as the first draw, not the second;
    - prompt logprobs: those prefill locally anyway (RemotePrefill.decode_leg)."""
    return (sampling.n == 1 and sampling.structured is None and not sampling.stop
            and sampling.presence_penalty == 0 and sampling.frequency_penalty == 0
            and (sampling.seed is None or sampling.temperature == 0) and sampling.prompt_logprobs is None
            and sampling.max_tokens >= 1)


def prefill_sampling(sampling: SamplingSpec) -> SamplingSpec:
    """The prefill engine's sampling for a request whose first token it samples: the request's
    own, for one token (min_tokens 1 keeps it from stopping there, as it would locally)."""
    return msgspec.structs.replace(sampling, max_tokens=1, min_tokens=min(sampling.min_tokens, 1))


# The decode engine's request when the first token ended the request: one token, discarded.
RELEASE_SAMPLING = SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True)


def leg_from_first(req: GenerateRequest, params: dict, first: Delta) -> DecodeLeg:
    """The decode engine's request after the prefill engine sampled ``first`` (one token):
    prompt + [t1], for the tokens left. A stop on t1 (EOS, a stop token id) or max_tokens 1
    ends the request with t1; the client's Delta says why only then."""
    if len(first.token_ids) != 1:
        raise BadTransferParams(f"the prefill engine sampled {len(first.token_ids)} tokens, not 1")
    spec = req.sampling
    prompt = [*req.prompt_token_ids, *first.token_ids]
    if first.finish_reason == "stop" or spec.max_tokens == 1:
        reason = first.finish_reason if first.finish_reason == "stop" else "length"
        return DecodeLeg(params, prompt, RELEASE_SAMPLING, msgspec.structs.replace(first, finish_reason=reason),
                         release_only=True)
    rest = msgspec.structs.replace(spec, max_tokens=spec.max_tokens - 1, min_tokens=max(0, spec.min_tokens - 1))
    return DecodeLeg(params, prompt, rest, msgspec.structs.replace(first, finish_reason=None))


class RemotePrefill:
    def __init__(self, settings: Settings, worker_id: str, send_prefill: Callable[[PrefillRequest], None],
                 counters: DisaggCounters):
        self.config = settings.disagg
        self.worker_id = worker_id
        self.transfer = transfer_for(settings.disagg, counters)
        self._send = send_prefill
        self._counters = counters
        self._thresholds = ThresholdSource(settings.disagg)
        self._prefill_alive = False
        self._prefill_checked_at = float("-inf")
        # This worker's remote prefills not yet answered (decode_leg's wait). A prefill worker
        # takes queued prefills as soon as it has task threads for them, many more than its engine
        # computes at once, so the queue alone stays near empty however far behind it is.
        self.outstanding = 0

    async def decode_leg(self, aredis, req: GenerateRequest) -> DecodeLeg | None:
        """The decode engine's request for a remote prefill, or None to prefill locally.

        Push, for a request ``first_token_from_prefill`` allows: the prefill engine samples t1
        with the request's sampling and PrefillDone carries it; the decode engine registers its
        blocks only then, for prompt + [t1] (the prefill engine keeps its finished request's
        blocks for a registration that comes late). Otherwise the decode engine registers right
        after the claim, for the prompt, and samples t1 itself."""
        if req.sampling.prompt_logprobs is not None:
            return None  # the prompt's logprobs come from its logits, which only a local prefill has
        thresholds = await self._thresholds.current(aredis)
        backlog = max(await aredis.llen(queues.PREFILL), self.outstanding)
        prompt_len, hit = len(req.prompt_token_ids), req.prefix_hit_tokens
        if not should_prefill_remotely(prompt_len, hit, backlog, thresholds):
            if should_prefill_remotely(prompt_len, hit, 0, thresholds):  # long enough: kept by the backlog
                self._counters.num_local_by_backlog += 1
                logger.info("[%s] prefilling %d tokens locally: %d remote prefills waiting "
                            "(disagg.max_prefill_queue_size %d)", req.request_id, prompt_len - hit, backlog,
                            thresholds.max_prefill_queue_size)
            return None
        # Counted before the next await: requests deciding meanwhile on this loop see it.
        self.outstanding += 1
        try:
            return await self._remote_leg(aredis, req, backlog)
        finally:
            self.outstanding -= 1

    async def _remote_leg(self, aredis, req: GenerateRequest, backlog: int) -> DecodeLeg | None:
        rid = req.request_id
        if not await self._prefill_workers_alive(aredis):
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] no live prefill worker; prefilling locally", rid)
            return None
        first_token = isinstance(self.transfer, PushTransfer) and first_token_from_prefill(req.sampling)
        wait_s = min(self.config.prefill_timeout_s, req.deadline_unix - time.time())
        pubsub = aredis.pubsub()
        await pubsub.subscribe(*self.transfer.reply_channels(rid))
        owned = True  # this method closes the subscription, unless the transfer takes it
        waiting_for = "answer"
        try:
            preq = PrefillRequest(rid, req.prompt_token_ids, self.worker_id, deadline_unix=time.time() + wait_s,
                                  sampling=req.sampling if first_token else None)
            await asyncio.get_running_loop().run_in_executor(None, self._send, preq)
            logger.info("[%s] remote prefill of %d tokens requested (backlog %d, %s%s)", rid,
                        len(req.prompt_token_ids), backlog, self.transfer.connector,
                        ", first token from the prefill engine" if first_token else "")
            params, prefill_worker = await self.transfer.wait(aredis, pubsub, rid, wait_s)
            if first_token:
                assert isinstance(self.transfer, PushTransfer)
                waiting_for = "PrefillDone"
                wait_s = min(self.config.push_registration_timeout_s, req.deadline_unix - time.time())
                first = await self.transfer.wait_first(pubsub, rid, wait_s)
                return leg_from_first(req, {**params, push.PREFILLED_KEY: len(req.prompt_token_ids)}, first)
            owned = False
        except (TimeoutError, BadTransferParams) as e:
            reason = f"no {waiting_for} within {wait_s:.1f}s" if isinstance(e, TimeoutError) else str(e)
            await aredis.set(keys.prefill_abandoned(rid), 1, ex=flag_ttl_s(wait_s))
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] remote prefill failed (%s); prefilling locally", rid, reason)
            return None
        finally:
            if owned:
                await close(pubsub)
        await self.transfer.taken(pubsub, rid, prefill_worker)  # the subscription is the transfer's now
        return DecodeLeg(params, req.prompt_token_ids, req.sampling)

    def settle(self, rid: str, final_kv_transfer_params: dict | None) -> None:
        """When a request that took a remote prefill ends, with its final kv_transfer_params."""
        self.transfer.settle(rid, final_kv_transfer_params)

    async def _prefill_workers_alive(self, aredis) -> bool:
        # Cached briefly: a burst of long prompts costs one lease scan, not one each.
        if time.monotonic() - self._prefill_checked_at > PREFILL_LIVENESS_CACHE_S:
            self._prefill_alive = bool(await alive_workers(aredis, role="prefill"))
            self._prefill_checked_at = time.monotonic()
        return self._prefill_alive


# A prefill whose token nobody streams: the decode engine samples the first token.
PREFILL_SAMPLING = SamplingSpec(max_tokens=1, temperature=0.0)


def merged(deltas: list[Delta]) -> Delta | None:
    """One choice's Deltas as one."""
    if not deltas:
        return None
    logprobs = [lp for d in deltas for lp in d.logprobs or ()]
    return Delta(index=deltas[0].index, text="".join(d.text for d in deltas),
                 token_ids=[t for d in deltas for t in d.token_ids],
                 logprobs=logprobs if any(d.logprobs is not None for d in deltas) else None,
                 finish_reason=deltas[-1].finish_reason)


async def prefill_kv(engine, preq: PrefillRequest, leg_params: dict) -> tuple[dict, Delta | None]:
    """Runs the prompt on the prefill engine; returns the connector's kv_transfer_params and,
    when the request carries its sampling, the token sampled with it."""
    sampling = PREFILL_SAMPLING if preq.sampling is None else prefill_sampling(preq.sampling)
    deltas_from = DeltaMaker(sampling)
    last, deltas = None, []
    async for output in engine.generate(preq.request_id, preq.prompt_token_ids, sampling,
                                        kv_transfer_params=leg_params):
        deltas.extend(deltas_from(output))
        last = output
    if last is None or not last.kv_transfer_params:
        raise RuntimeError("the prefill engine returned no kv_transfer_params (is the NIXL connector on?)")
    return last.kv_transfer_params, merged(deltas) if preq.sampling is not None else None


class PrefillServer:
    """A prefill worker's side: runs a decode worker's prefill on this worker's engine."""

    def __init__(self, settings: Settings, worker_id: str, engine, redis_client, nixl: NixlEndpoint | None,
                 counters: DisaggCounters):
        self.worker_id = worker_id
        self.transfer = transfer_for(settings.disagg, counters)
        self._engine = engine
        self._redis = redis_client
        self._nixl = nixl
        self._counters = counters

    def serve(self, preq: PrefillRequest) -> None:
        rid = preq.request_id
        reason = self._skip_reason(preq)
        if reason is None and not self.transfer.claim(self._redis, preq, self.worker_id, self._nixl):
            reason = "the decode worker stopped waiting before this worker claimed it"
        if reason:
            self._counters.num_prefills_dropped += 1
            logger.warning("[%s] prefill dropped: %s", rid, reason)
            return
        started = time.monotonic()
        try:
            kv, first = self._engine.run(prefill_kv(self._engine, preq, self.transfer.prefill_leg_params())).result()
            done = PrefillDone(rid, self.worker_id, kv_transfer_params=kv, first=first,
                               prefill_s=time.monotonic() - started)
            self._counters.num_prefills_served += 1
        except Exception as e:  # noqa: BLE001  the decode worker must hear about any failure
            # Push: the decode engine has registered, or will, for a WRITE that now never comes;
            # its registration times out and it recomputes the prompt. With the first token from
            # here it has not registered: it prefills locally.
            logger.exception("[%s] prefill failed", rid)
            done = PrefillDone(rid, self.worker_id, error=f"{type(e).__name__}: {e}",
                               prefill_s=time.monotonic() - started)
        listeners = self._redis.publish(keys.prefill_done_channel(rid), encode_prefill_done(done))
        logger.info("[%s] prefill of %d tokens for %s in %.3fs%s (%d listener)", rid, len(preq.prompt_token_ids),
                    preq.decode_worker_id, done.prefill_s, self.transfer.served_note, listeners)

    def _skip_reason(self, preq: PrefillRequest) -> str | None:
        if time.time() >= preq.deadline_unix:
            return "its deadline passed while queued"
        if self._redis.exists(keys.prefill_abandoned(preq.request_id)):
            return "the decode worker stopped waiting"
        if not is_alive(self._redis, preq.decode_worker_id):
            return f"decode worker {preq.decode_worker_id} is gone; no transfer to a dead peer"
        return None
