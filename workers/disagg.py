"""Disaggregated prefill, both sides, following Dynamo's sequence.

Decode side (``RemotePrefill``): decide per request; for a remote prefill, subscribe to the reply
channel, put a PrefillRequest on the ``prefill`` queue, and wait for PrefillDone on Redis pub/sub
while the engine keeps decoding other requests. The KV then moves over NIXL into this engine's
blocks. Anything short of a usable answer in time (no prefill worker, a dead one, a deadline, bad
params) ends in a local prefill: the client gets its normal answer either way.

Prefill side (``prefill_kv``): run the prompt with max_tokens=1 so the engine keeps the KV for a
decoder, and return the connector's kv_transfer_params.

With the pull connector the decode engine allocates its blocks only once the prefill has
answered, so a prefill worker that dies can never strand decode blocks; a transfer that fails
after that is recomputed locally (kv_load_failure_policy="recompute").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from config import Settings
from kvtransfer import registry
from kvtransfer.connector import BadTransferParams, decode_leg_params, prefill_leg_params
from kvtransfer.policy import ThresholdSource, should_prefill_remotely
from tasks import keys, queues
from tasks.registry import alive_workers
from tasks.messages import GenerateRequest, PrefillDone, PrefillRequest, SamplingSpec, decode_prefill_done

logger = logging.getLogger(__name__)

PREFILL_LIVENESS_CACHE_S = 1.0


@dataclass
class DisaggCounters:
    num_remote_prefills: int = 0
    num_local_fallbacks: int = 0
    num_prefills_served: int = 0
    num_prefills_dropped: int = 0


class RemotePrefill:
    def __init__(self, settings: Settings, worker_id: str, send_prefill: Callable[[PrefillRequest], None],
                 counters: DisaggCounters):
        self.config = settings.disagg
        self.worker_id = worker_id
        self._send = send_prefill
        self._counters = counters
        self._thresholds = ThresholdSource(settings.disagg)
        self._prefill_alive = False
        self._prefill_checked_at = float("-inf")

    async def kv_transfer_params(self, aredis, req: GenerateRequest) -> dict | None:
        """Params that make the decode engine take a remote prefill, or None to prefill locally."""
        rid = req.request_id
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
        # Subscribe before asking: pub/sub keeps nothing for late listeners.
        await pubsub.subscribe(keys.prefill_done_channel(rid))
        try:
            preq = PrefillRequest(rid, req.prompt_token_ids, self.worker_id, deadline_unix=time.time() + wait_s)
            await asyncio.get_running_loop().run_in_executor(None, self._send, preq)
            logger.info("[%s] remote prefill of %d tokens requested (queue %d)", rid, len(req.prompt_token_ids),
                        queue_len)
            done = await self._wait(pubsub, wait_s)
            params = decode_leg_params(done.kv_transfer_params) if done.error is None else None
            if params is None:
                raise BadTransferParams(done.error)
            if await registry.alookup(aredis, params["remote_engine_id"]) is None:
                raise BadTransferParams(f"prefill engine {params['remote_engine_id']} is no longer registered")
        except (TimeoutError, BadTransferParams) as e:
            reason = "no answer within %.1fs" % wait_s if isinstance(e, TimeoutError) else str(e)
            await aredis.set(keys.prefill_abandoned(rid), 1, ex=max(60, int(wait_s) * 2))
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] remote prefill failed (%s); prefilling locally", rid, reason)
            return None
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()
        self._counters.num_remote_prefills += 1
        logger.info("[%s] remote prefill done by %s; pulling KV", rid, done.prefill_worker_id)
        return params

    async def _prefill_workers_alive(self, aredis) -> bool:
        # Cached briefly: a burst of long prompts costs one lease scan, not one each.
        if time.monotonic() - self._prefill_checked_at > PREFILL_LIVENESS_CACHE_S:
            self._prefill_alive = bool(await alive_workers(aredis, role="prefill"))
            self._prefill_checked_at = time.monotonic()
        return self._prefill_alive

    @staticmethod
    async def _wait(pubsub, wait_s: float) -> PrefillDone:
        async with asyncio.timeout(wait_s):
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
                if msg is not None and msg["type"] == "message":
                    return decode_prefill_done(msg["data"])


PREFILL_SAMPLING = SamplingSpec(max_tokens=1, temperature=0.0)


async def prefill_kv(engine, preq: PrefillRequest) -> dict:
    """Runs the prompt on the prefill engine; returns the connector's kv_transfer_params."""
    last = None
    async for output in engine.generate(preq.request_id, preq.prompt_token_ids, PREFILL_SAMPLING,
                                        kv_transfer_params=prefill_leg_params()):
        last = output
    if last is None or not last.kv_transfer_params:
        raise RuntimeError("the prefill engine returned no kv_transfer_params (is the NIXL connector on?)")
    return last.kv_transfer_params
