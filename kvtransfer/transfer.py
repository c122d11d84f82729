"""How a prompt's KV gets from the prefill engine to the decode engine: one strategy per
connector (``disagg.connector``), used by both sides of a remote prefill (workers/disagg.py).

The two connectors differ in who moves the KV and when decode allocates:

- pull (``PullTransfer``): the prefill worker answers with PrefillDone once it has computed the
  KV; the decode engine then allocates its blocks and reads the KV. A prefill worker that dies
  can never strand decode blocks, and a read that fails is recomputed locally
  (kv_load_failure_policy="recompute").
- push (``PushTransfer``, the order of Dynamo's LLM deployment examples): the prefill worker
  claims the task (PrefillClaimed, with its NIXL address) before it computes. The decode engine
  then allocates, registers its blocks with the prefill engine, and the prefill engine WRITEs the
  KV into them. No claim in time: local prefill, and no block was allocated. A claim and then a
  dead prefill worker: the decode engine's registration times out and it recomputes the prompt
  (kvtransfer/nixl_agents.py), so the blocks come back. The outcome is counted when the request
  ends (``settle``).

Either way the prefill worker publishes PrefillDone on the reply channel when its engine has
finished the prefill. With pull that is the go-ahead for the decode engine. With push the decode
engine needs no go-ahead: NIXL's own notification of the WRITE schedules its decoding. The decode
worker still listens, and logs and counts who prefilled, how long it took and whether it failed.

Each strategy owns its leg parameters (the kv_transfer_params of the prefill and the decode
engine's requests), the decode side's wait for the prefill worker, the prefill side's claim, and
the settle step when the decode request ends. No vllm here: only engine code loads it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis

from config import DisaggConfig
from kvtransfer import push, registry
from kvtransfer.connector import REQUIRED_PULL_PARAMS, BadTransferParams
from kvtransfer.registry import NixlEndpoint
from kvtransfer.stats import DisaggCounters
from tasks import keys
from tasks.messages import (
    Delta,
    PrefillClaimed,
    PrefillRequest,
    decode_prefill_claimed,
    decode_prefill_done,
    encode_prefill_claimed,
)

logger = logging.getLogger(__name__)

# Our engines run without tensor parallelism (EngineConfig has no such setting).
TP_SIZE = 1


def flag_ttl_s(wait_s: float) -> int:
    """How long the abandoned flag and the claim key live: past any worker that still checks them."""
    return max(60, int(wait_s) * 2)


class KvTransfer:
    """What both connectors share. Decode side: ``reply_channels``, then ``wait``, then
    ``taken`` (which owns the subscription from then on), and ``settle`` when the request ends.
    Prefill side: ``claim`` before computing with ``prefill_leg_params``."""

    connector: str
    # Appended to the prefill worker's log line about a prefill it served.
    served_note = ""

    def __init__(self, config: DisaggConfig, counters: DisaggCounters):
        self.config = config
        self.counters = counters

    @staticmethod
    def prefill_leg_params() -> dict:
        """kv_transfer_params for the prefill engine's request: compute, keep the KV for a decoder."""
        return {"do_remote_decode": True}

    def reply_channels(self, rid: str) -> list[str]:
        """What the decode worker subscribes to before it asks: pub/sub keeps nothing for late listeners."""
        return [keys.prefill_done_channel(rid)]

    async def wait(self, aredis, pubsub, rid: str, wait_s: float) -> tuple[dict, str]:
        """The decode engine's kv_transfer_params and the prefill worker's id, once the prefill
        worker has answered. Raises TimeoutError or BadTransferParams."""
        raise NotImplementedError

    async def taken(self, pubsub, rid: str, prefill_worker: str) -> None:
        """The decode engine takes the remote prefill; closes ``pubsub`` when done with it."""
        raise NotImplementedError

    def settle(self, rid: str, final_kv_transfer_params: dict | None) -> None:
        """Called when a decode request that took a remote prefill ends."""

    def claim(self, client: redis.Redis, preq: PrefillRequest, worker_id: str, nixl: NixlEndpoint | None) -> bool:
        """Prefill side, before computing: False if the decode worker is no longer to be served."""
        return True


class PullTransfer(KvTransfer):
    connector = "pull"

    @staticmethod
    def decode_params_from_done(from_prefill: dict | None) -> dict:
        """The decode engine's kv_transfer_params: the prefill engine's, checked."""
        if not isinstance(from_prefill, dict):
            raise BadTransferParams("the prefill worker returned no kv_transfer_params")
        missing = [k for k in REQUIRED_PULL_PARAMS if k not in from_prefill]
        if missing:
            raise BadTransferParams(f"kv_transfer_params lack {missing}")
        return dict(from_prefill)

    async def wait(self, aredis, pubsub, rid: str, wait_s: float) -> tuple[dict, str]:
        done = decode_prefill_done(await next_message(pubsub, keys.prefill_done_channel(rid), wait_s))
        self.counters.num_prefill_done_notices += 1
        if done.error is not None:
            raise BadTransferParams(done.error)
        params = self.decode_params_from_done(done.kv_transfer_params)
        await require_registered(aredis, params["remote_engine_id"])
        return params, done.prefill_worker_id

    async def taken(self, pubsub, rid: str, prefill_worker: str) -> None:
        await close(pubsub)
        self.counters.num_remote_prefills += 1
        logger.info("[%s] remote prefill done by %s; pulling KV", rid, prefill_worker)


class PushTransfer(KvTransfer):
    connector = "push"
    served_note = "; the KV is pushed to its registered blocks"

    def __init__(self, config: DisaggConfig, counters: DisaggCounters):
        super().__init__(config, counters)
        self._reports: set[asyncio.Task] = set()

    @staticmethod
    def decode_params_from_claim(rid: str, claim: PrefillClaimed) -> dict:
        """The decode engine's kv_transfer_params once a prefill worker has claimed the prefill:
        allocate, register with its engine at its side channel, and wait for the WRITE.
        ``remote_request_id`` also makes the decode engine heartbeat the prefill engine, which
        keeps its hold on the prefilled blocks alive while the decode engine waits."""
        return {"do_remote_prefill": True, "remote_engine_id": claim.engine_id, "remote_host": claim.host,
                "remote_port": claim.port, "tp_size": TP_SIZE, "remote_request_id": rid}

    def reply_channels(self, rid: str) -> list[str]:
        return [keys.prefill_done_channel(rid), keys.prefill_claimed_channel(rid)]

    async def wait(self, aredis, pubsub, rid: str, wait_s: float) -> tuple[dict, str]:
        try:
            raw = await next_message(pubsub, keys.prefill_claimed_channel(rid), wait_s)
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
        await require_registered(aredis, claim.engine_id)
        return self.decode_params_from_claim(rid, claim), claim.prefill_worker_id

    async def taken(self, pubsub, rid: str, prefill_worker: str) -> None:
        task = asyncio.create_task(self._report_done(pubsub, rid))
        self._reports.add(task)  # held, or the loop could collect it mid-wait
        task.add_done_callback(self._reports.discard)
        # Counted when the request ends (settle): only then is it known whether the KV came.
        logger.info("[%s] prefill claimed by %s; registering blocks for its push", rid, prefill_worker)

    async def _report_done(self, pubsub, rid: str) -> None:
        """The prefill worker's PrefillDone, read while the decode engine already waits for the
        WRITE. It changes nothing in the engine; a failure it reports ends in the engine's
        recompute when the registration expires."""
        try:
            raw = await next_message(pubsub, keys.prefill_done_channel(rid),
                                     self.config.prefill_timeout_s + self.config.push_registration_timeout_s)
        except TimeoutError:
            logger.warning("[%s] no PrefillDone from the prefill worker; the decode engine's registration "
                           "decides", rid)
            return
        finally:
            await close(pubsub)
        done = decode_prefill_done(raw)
        self.counters.num_prefill_done_notices += 1
        if done.error is not None:
            logger.warning("[%s] prefill failed on %s (%s); the decode engine recomputes when its registration "
                           "expires", rid, done.prefill_worker_id, done.error)
        else:
            logger.info("[%s] PrefillDone from %s: prefilled in %.3fs and pushed", rid, done.prefill_worker_id,
                        done.prefill_s)

    async def wait_first(self, pubsub, rid: str, wait_s: float) -> Delta:
        """After the claim, for a prefill that samples the request's first token: the prefill
        worker's PrefillDone, and the token in it. The decode engine registers only after it (for
        prompt + [t1]); the prefill engine holds its finished request's blocks for that late
        registration (vLLM's push writer matches a registration to finished blocks whichever
        comes first), up to the lease. Raises TimeoutError or BadTransferParams."""
        done = decode_prefill_done(await next_message(pubsub, keys.prefill_done_channel(rid), wait_s))
        self.counters.num_prefill_done_notices += 1
        if done.error is not None:
            raise BadTransferParams(f"the prefill failed on {done.prefill_worker_id}: {done.error}")
        if done.first is None:
            raise BadTransferParams(f"PrefillDone from {done.prefill_worker_id} carries no first token")
        logger.info("[%s] PrefillDone from %s: prefilled in %.3fs, first token %s; registering blocks for its push",
                    rid, done.prefill_worker_id, done.prefill_s, done.first.token_ids)
        return done.first

    def settle(self, rid: str, final_kv_transfer_params: dict | None) -> None:
        """Counts how the remote prefill ended, from the decode request's final params."""
        outcome = push.outcome_of(final_kv_transfer_params)
        if outcome == push.RECEIVED:
            self.counters.num_remote_prefills += 1
            logger.info("[%s] prompt KV pushed by the prefill engine", rid)
        elif outcome == push.RECOMPUTED:
            self.counters.num_local_fallbacks += 1
            logger.warning("[%s] the push never came; the decode engine recomputed the prompt locally", rid)
        else:
            logger.warning("[%s] no push outcome reported (params %s)", rid, final_kv_transfer_params)

    def claim(self, client: redis.Redis, preq: PrefillRequest, worker_id: str, nixl: NixlEndpoint | None) -> bool:
        """Takes the prefill, unless the decode worker gave up first, and tells it where this
        engine's side channel is."""
        assert nixl is not None, "a push needs this worker's NIXL side channel"
        rid = preq.request_id
        raw = encode_prefill_claimed(PrefillClaimed(rid, worker_id, nixl.engine_id, nixl.host, nixl.port))
        if not client.set(keys.prefill_claim(rid), raw, nx=True, ex=flag_ttl_s(preq.deadline_unix - time.time())):
            return False
        listeners = client.publish(keys.prefill_claimed_channel(rid), raw)
        logger.info("[%s] prefill claimed for %s (%d listener)", rid, preq.decode_worker_id, listeners)
        return True


TRANSFERS: dict[str, type[KvTransfer]] = {"pull": PullTransfer, "push": PushTransfer}


def transfer_for(config: DisaggConfig, counters: DisaggCounters) -> KvTransfer:
    """The strategy of the configured connector, counting into ``counters``."""
    return TRANSFERS[config.connector](config, counters)


async def next_message(pubsub, channel: str, wait_s: float) -> bytes:
    async with asyncio.timeout(wait_s):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
            if msg is not None and msg["type"] == "message" and msg["channel"].decode() == channel:
                return msg["data"]


async def close(pubsub) -> None:
    await pubsub.unsubscribe()
    await pubsub.aclose()


async def require_registered(aredis, engine_id: str) -> None:
    # Pulling from, or registering with, a dead engine would only wait out a time-out.
    if await registry.alookup(aredis, engine_id) is None:
        raise BadTransferParams(f"prefill engine {engine_id} is no longer registered")
