"""Disaggregated prefill, both sides, following Dynamo's sequence.

Decode side (``RemotePrefill``): decide per request; for a remote prefill, subscribe to the reply
channel, put a PrefillRequest on the ``prefill`` queue, and wait on Redis pub/sub while the engine
keeps decoding other requests. Anything short of a usable answer in time (no prefill worker, a
dead one, a deadline, bad params) ends in a local prefill: the client gets its normal answer
either way.

Prefill side (``PrefillServer``): skip work for a decode worker that is gone or stopped waiting,
run the prompt with max_tokens=1 so the engine keeps the KV for a decoder, and tell the decoder.

The two connectors (``disagg.connector``) differ in who moves the KV and when decode allocates:

- pull: the prefill worker answers with PrefillDone once it has computed the KV; the decode
  engine then allocates its blocks and reads the KV. A prefill worker that dies can never strand
  decode blocks, and a read that fails is recomputed locally (kv_load_failure_policy="recompute").
- push (the seed's order): the prefill worker claims the task (PrefillClaimed, with its NIXL
  address) before it computes. The decode engine then allocates, registers its blocks with the
  prefill engine, and the prefill engine WRITEs the KV into them. No claim in time: local
  prefill, and no block was allocated. A claim and then a dead prefill worker: the decode
  engine's registration times out and it recomputes the prompt (kvtransfer/nixl_agents.py), so
  the blocks come back. The outcome is counted when the request ends (``settle_push``).

Either way the prefill worker publishes PrefillDone on the reply channel when its engine has
finished the prefill. With pull that is the go-ahead for the decode engine. With push the decode
engine needs no go-ahead: NIXL's own notification of the WRITE schedules its decoding, as in the
seed. The decode worker still listens, and logs and counts who prefilled, how long it took and
whether it failed (``_report_push_done``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from config import Settings
from kvtransfer import push, registry
from kvtransfer.connector import BadTransferParams, decode_leg_params, prefill_leg_params
from kvtransfer.policy import ThresholdSource, should_prefill_remotely
from kvtransfer.registry import NixlEndpoint
from tasks import keys, queues
from tasks.messages import (
    GenerateRequest, PrefillClaimed, PrefillDone, PrefillRequest, SamplingSpec, decode_prefill_claimed,
    decode_prefill_done, encode_prefill_claimed, encode_prefill_done,
)
from tasks.registry import alive_workers, is_alive

logger = logging.getLogger(__name__)

PREFILL_LIVENESS_CACHE_S = 1.0


def flag_ttl_s(wait_s: float) -> int:
    """How long the abandoned flag and the claim key live: past any worker that still checks them."""
    return max(60, int(wait_s) * 2)


@dataclass
class DisaggCounters:
    num_remote_prefills: int = 0
    num_local_fallbacks: int = 0
    num_prefills_served: int = 0
    num_prefills_dropped: int = 0
    num_prefill_done_notices: int = 0


class RemotePrefill:
    def __init__(self, settings: Settings, worker_id: str, send_prefill: Callable[[PrefillRequest], None],
                 counters: DisaggCounters):
        self.config = settings.disagg
        self.worker_id = worker_id
        self.pushes = settings.disagg.connector == "push"
        self._send = send_prefill
        self._counters = counters
        self._thresholds = ThresholdSource(settings.disagg)
        self._prefill_alive = False
        self._prefill_checked_at = float("-inf")
        self._reports: set[asyncio.Task] = set()

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
        channels = [keys.prefill_done_channel(rid)] + ([keys.prefill_claimed_channel(rid)] if self.pushes else [])
        await pubsub.subscribe(*channels)
        reporting = False
        try:
            preq = PrefillRequest(rid, req.prompt_token_ids, self.worker_id, deadline_unix=time.time() + wait_s)
            await asyncio.get_running_loop().run_in_executor(None, self._send, preq)
            logger.info("[%s] remote prefill of %d tokens requested (queue %d, %s)", rid, len(req.prompt_token_ids),
                        queue_len, self.config.connector)
            if self.pushes:
                params, prefill_worker = await self._await_claim(aredis, pubsub, rid, wait_s)
                task = asyncio.create_task(self._report_push_done(pubsub, rid))
                self._reports.add(task)  # held, or the loop could collect it mid-wait
                task.add_done_callback(self._reports.discard)
                reporting = True
            else:
                params, prefill_worker = await self._await_done(aredis, pubsub, rid, wait_s)
        except (TimeoutError, BadTransferParams) as e:
            reason = "no answer within %.1fs" % wait_s if isinstance(e, TimeoutError) else str(e)
            await aredis.set(keys.prefill_abandoned(rid), 1, ex=flag_ttl_s(wait_s))
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] remote prefill failed (%s); prefilling locally", rid, reason)
            return None
        finally:
            if not reporting:
                await _close(pubsub)
        if self.pushes:
            # Counted when the request ends: only then is it known whether the KV came.
            logger.info("[%s] prefill claimed by %s; registering blocks for its push", rid, prefill_worker)
        else:
            self._counters.num_remote_prefills += 1
            logger.info("[%s] remote prefill done by %s; pulling KV", rid, prefill_worker)
        return params

    def settle_push(self, rid: str, final_kv_transfer_params: dict | None) -> None:
        """Push: counts how a remote prefill ended, from the decode request's final params."""
        outcome = push.outcome_of(final_kv_transfer_params)
        if outcome == push.RECEIVED:
            self._counters.num_remote_prefills += 1
            logger.info("[%s] prompt KV pushed by the prefill engine", rid)
        elif outcome == push.RECOMPUTED:
            self._counters.num_local_fallbacks += 1
            logger.warning("[%s] the push never came; the decode engine recomputed the prompt locally", rid)
        else:
            logger.warning("[%s] no push outcome reported (params %s)", rid, final_kv_transfer_params)

    async def _report_push_done(self, pubsub, rid: str) -> None:
        """Push: the prefill worker's PrefillDone, read while the decode engine already waits for
        the WRITE. It changes nothing in the engine; a failure it reports ends in the engine's
        recompute when the registration expires."""
        try:
            raw = await self._next_message(pubsub, keys.prefill_done_channel(rid),
                                           self.config.prefill_timeout_s + self.config.push_registration_timeout_s)
        except TimeoutError:
            logger.warning("[%s] no PrefillDone from the prefill worker; the decode engine's registration "
                           "decides", rid)
            return
        finally:
            await _close(pubsub)
        done = decode_prefill_done(raw)
        self._counters.num_prefill_done_notices += 1
        if done.error is not None:
            logger.warning("[%s] prefill failed on %s (%s); the decode engine recomputes when its registration "
                           "expires", rid, done.prefill_worker_id, done.error)
        else:
            logger.info("[%s] PrefillDone from %s: prefilled in %.3fs and pushed", rid, done.prefill_worker_id,
                        done.prefill_s)

    async def _await_done(self, aredis, pubsub, rid: str, wait_s: float) -> tuple[dict, str]:
        done = decode_prefill_done(await self._next_message(pubsub, keys.prefill_done_channel(rid), wait_s))
        self._counters.num_prefill_done_notices += 1
        if done.error is not None:
            raise BadTransferParams(done.error)
        params = decode_leg_params(done.kv_transfer_params)
        await self._require_registered(aredis, params["remote_engine_id"])
        return params, done.prefill_worker_id

    async def _await_claim(self, aredis, pubsub, rid: str, wait_s: float) -> tuple[dict, str]:
        try:
            raw = await self._next_message(pubsub, keys.prefill_claimed_channel(rid), wait_s)
        except TimeoutError:
            # The claim key decides between giving up and a prefill worker claiming this very
            # moment: one that claimed first is computing for us, so its push is still taken;
            # one that comes later finds the key taken and drops the task.
            if await aredis.set(keys.prefill_claim(rid), keys.CLAIM_ABANDONED, nx=True, ex=flag_ttl_s(wait_s)):
                raise
            raw = await aredis.get(keys.prefill_claim(rid))
        try:
            claim = decode_prefill_claimed(raw)
        except (msgspec.DecodeError, TypeError) as e:
            raise BadTransferParams(f"unreadable claim {raw!r}: {e}") from None
        await self._require_registered(aredis, claim.engine_id)
        return push.decode_leg_params(rid, claim.engine_id, claim.host, claim.port), claim.prefill_worker_id

    @staticmethod
    async def _require_registered(aredis, engine_id: str) -> None:
        # Pulling from, or registering with, a dead engine would only wait out a time-out.
        if await registry.alookup(aredis, engine_id) is None:
            raise BadTransferParams(f"prefill engine {engine_id} is no longer registered")

    async def _prefill_workers_alive(self, aredis) -> bool:
        # Cached briefly: a burst of long prompts costs one lease scan, not one each.
        if time.monotonic() - self._prefill_checked_at > PREFILL_LIVENESS_CACHE_S:
            self._prefill_alive = bool(await alive_workers(aredis, role="prefill"))
            self._prefill_checked_at = time.monotonic()
        return self._prefill_alive

    @staticmethod
    async def _next_message(pubsub, channel: str, wait_s: float) -> bytes:
        async with asyncio.timeout(wait_s):
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
                if msg is not None and msg["type"] == "message" and msg["channel"].decode() == channel:
                    return msg["data"]


async def _close(pubsub) -> None:
    await pubsub.unsubscribe()
    await pubsub.aclose()


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


class PrefillServer:
    """A prefill worker's side: runs a decode worker's prefill on this worker's engine."""

    def __init__(self, settings: Settings, worker_id: str, engine, redis_client, nixl: NixlEndpoint,
                 counters: DisaggCounters):
        self.worker_id = worker_id
        self.pushes = settings.disagg.connector == "push"
        self._engine = engine
        self._redis = redis_client
        self._nixl = nixl
        self._counters = counters

    def serve(self, preq: PrefillRequest) -> None:
        rid = preq.request_id
        reason = self._skip_reason(preq)
        if reason is None and self.pushes and not self._claim(preq):
            reason = "the decode worker stopped waiting before this worker claimed it"
        if reason:
            self._counters.num_prefills_dropped += 1
            logger.warning("[%s] prefill dropped: %s", rid, reason)
            return
        started = time.monotonic()
        try:
            outcome = {"kv_transfer_params": self._engine.run(prefill_kv(self._engine, preq)).result()}
            self._counters.num_prefills_served += 1
        except Exception as e:  # noqa: BLE001  the decode worker must hear about any failure
            # Push: the decode engine has registered, or will, for a WRITE that now never comes;
            # its registration times out and it recomputes the prompt.
            logger.exception("[%s] prefill failed", rid)
            outcome = {"error": f"{type(e).__name__}: {e}"}
        done = PrefillDone(rid, self.worker_id, prefill_s=time.monotonic() - started, **outcome)
        listeners = self._redis.publish(keys.prefill_done_channel(rid), encode_prefill_done(done))
        logger.info("[%s] prefill of %d tokens for %s in %.3fs%s (%d listener)", rid, len(preq.prompt_token_ids),
                    preq.decode_worker_id, done.prefill_s, "; the KV is pushed to its registered blocks"
                    if self.pushes else "", listeners)

    def _claim(self, preq: PrefillRequest) -> bool:
        """Push: takes the prefill, unless the decode worker gave up first, and tells it where
        this engine's side channel is."""
        rid = preq.request_id
        claim = PrefillClaimed(rid, self.worker_id, self._nixl.engine_id, self._nixl.host, self._nixl.port)
        raw = encode_prefill_claimed(claim)
        if not self._redis.set(keys.prefill_claim(rid), raw, nx=True,
                               ex=flag_ttl_s(preq.deadline_unix - time.time())):
            return False
        listeners = self._redis.publish(keys.prefill_claimed_channel(rid), raw)
        logger.info("[%s] prefill claimed for %s (%d listener)", rid, preq.decode_worker_id, listeners)
        return True

    def _skip_reason(self, preq: PrefillRequest) -> str | None:
        if time.time() >= preq.deadline_unix:
            return "its deadline passed while queued"
        if self._redis.exists(keys.prefill_abandoned(preq.request_id)):
            return "the decode worker stopped waiting"
        if not is_alive(self._redis, preq.decode_worker_id):
            return f"decode worker {preq.decode_worker_id} is gone; no transfer to a dead peer"
        return None
