"""Disaggregated prefill, both sides, following Dynamo's sequence.

Decode side (``RemotePrefill``): decide per request; for a remote prefill, subscribe to the reply
channels, put a PrefillRequest on the ``prefill`` queue, and wait on Redis pub/sub while the engine
keeps decoding other requests. Anything short of a usable answer in time (no prefill worker, a
dead one, a deadline, bad params) ends in a local prefill: the client gets its normal answer
either way.

Prefill side (``PrefillServer``): skip work for a decode worker that is gone or stopped waiting,
run the prompt with max_tokens=1 so the engine keeps the KV for a decoder, and tell the decoder.

What differs between the connectors (the leg params, the wait, the claim, the settle step) is
the worker's KvTransfer strategy: kvtransfer/transfer.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from config import Settings
from kvtransfer.connector import BadTransferParams
from kvtransfer.policy import ThresholdSource, should_prefill_remotely
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from kvtransfer.transfer import close, flag_ttl_s, transfer_for
from tasks import keys, queues
from tasks.messages import GenerateRequest, PrefillDone, PrefillRequest, SamplingSpec, encode_prefill_done
from tasks.registry import alive_workers, is_alive

logger = logging.getLogger(__name__)

PREFILL_LIVENESS_CACHE_S = 1.0

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

    async def kv_transfer_params(self, aredis, req: GenerateRequest) -> dict | None:
        """Params that make the decode engine take a remote prefill, or None to prefill locally."""
        rid = req.request_id
        if req.sampling.prompt_logprobs is not None:
            return None  # the prompt's logprobs come from its logits, which only a local prefill has
        thresholds = await self._thresholds.current(aredis)
        queue_len = await aredis.llen(queues.PREFILL)
        if not should_prefill_remotely(len(req.prompt_token_ids), req.prefix_hit_tokens, queue_len, thresholds):
            return None
        if not await self._prefill_workers_alive(aredis):
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] no live prefill worker; prefilling locally", rid)
            return None
        wait_s = min(self.config.prefill_timeout_s, req.deadline_unix - time.time())
        pubsub = aredis.pubsub()
        await pubsub.subscribe(*self.transfer.reply_channels(rid))
        answered = False
        try:
            preq = PrefillRequest(rid, req.prompt_token_ids, self.worker_id, deadline_unix=time.time() + wait_s)
            await asyncio.get_running_loop().run_in_executor(None, self._send, preq)
            logger.info("[%s] remote prefill of %d tokens requested (queue %d, %s)", rid, len(req.prompt_token_ids),
                        queue_len, self.transfer.connector)
            params, prefill_worker = await self.transfer.wait(aredis, pubsub, rid, wait_s)
            answered = True
        except (TimeoutError, BadTransferParams) as e:
            reason = "no answer within %.1fs" % wait_s if isinstance(e, TimeoutError) else str(e)
            await aredis.set(keys.prefill_abandoned(rid), 1, ex=flag_ttl_s(wait_s))
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] remote prefill failed (%s); prefilling locally", rid, reason)
            return None
        finally:
            if not answered:
                await close(pubsub)
        await self.transfer.taken(pubsub, rid, prefill_worker)  # the subscription is the transfer's now
        return params

    def settle(self, rid: str, final_kv_transfer_params: dict | None) -> None:
        """When a request that took a remote prefill ends, with its final kv_transfer_params."""
        self.transfer.settle(rid, final_kv_transfer_params)

    async def _prefill_workers_alive(self, aredis) -> bool:
        # Cached briefly: a burst of long prompts costs one lease scan, not one each.
        if time.monotonic() - self._prefill_checked_at > PREFILL_LIVENESS_CACHE_S:
            self._prefill_alive = bool(await alive_workers(aredis, role="prefill"))
            self._prefill_checked_at = time.monotonic()
        return self._prefill_alive


PREFILL_SAMPLING = SamplingSpec(max_tokens=1, temperature=0.0)


async def prefill_kv(engine, preq: PrefillRequest, leg_params: dict) -> dict:
    """Runs the prompt on the prefill engine; returns the connector's kv_transfer_params."""
    last = None
    async for output in engine.generate(preq.request_id, preq.prompt_token_ids, PREFILL_SAMPLING,
                                        kv_transfer_params=leg_params):
        last = output
    if last is None or not last.kv_transfer_params:
        raise RuntimeError("the prefill engine returned no kv_transfer_params (is the NIXL connector on?)")
    return last.kv_transfer_params


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
            kv = self._engine.run(prefill_kv(self._engine, preq, self.transfer.prefill_leg_params())).result()
            outcome = {"kv_transfer_params": kv}
            self._counters.num_prefills_served += 1
        except Exception as e:  # noqa: BLE001  the decode worker must hear about any failure
            # Push: the decode engine has registered, or will, for a WRITE that now never comes;
            # its registration times out and it recomputes the prompt.
            logger.exception("[%s] prefill failed", rid)
            outcome = {"error": f"{type(e).__name__}: {e}"}
        done = PrefillDone(rid, self.worker_id, prefill_s=time.monotonic() - started, **outcome)
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
