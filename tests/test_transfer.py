"""The KV transfer strategies (kvtransfer/transfer.py): which one each connector gets, their leg
params, what each waits for and how each settles. Pure parts, and the pull wait on a real Redis:
no broker, no engine."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from config import DisaggConfig
from kvtransfer import push
from kvtransfer.connector import BadTransferParams
from kvtransfer.registry import NixlEndpoint, register
from kvtransfer.stats import DisaggCounters
from kvtransfer.transfer import KvTransfer, PullTransfer, PushTransfer, transfer_for
from tasks import keys
from tasks.messages import PrefillClaimed, PrefillDone, PrefillRequest, encode_prefill_done

P_ENDPOINT = NixlEndpoint("prefill0-7", "prefill0@h", "prefill", "10.0.0.2", 21000, "pull")
PULLED = {"do_remote_prefill": True, "remote_engine_id": "prefill0-7", "remote_host": "10.0.0.2", "remote_port": 21000,
          "remote_block_ids": [[1, 2]], "remote_request_id": "r1"}


def strategy(connector: str) -> KvTransfer:
    return transfer_for(DisaggConfig(connector=connector), DisaggCounters())


def test_each_connector_gets_its_strategy():
    assert type(strategy("pull")) is PullTransfer and strategy("pull").connector == "pull"
    assert type(strategy("push")) is PushTransfer and strategy("push").connector == "push"


def test_the_prefill_leg_is_the_same_for_both_connectors():
    assert strategy("pull").prefill_leg_params() == strategy("push").prefill_leg_params() == {"do_remote_decode": True}


def test_push_registers_with_the_engine_that_claimed_the_prefill():
    claim = PrefillClaimed("r1", "prefill0@h", "prefill0-7", "10.0.0.2", 21000)
    assert PushTransfer.decode_params_from_claim("r1", claim) == {
        "do_remote_prefill": True, "remote_engine_id": "prefill0-7", "remote_host": "10.0.0.2", "remote_port": 21000,
        "tp_size": 1, "remote_request_id": "r1"}


def test_only_push_listens_for_a_claim():
    assert strategy("pull").reply_channels("r1") == [keys.prefill_done_channel("r1")]
    assert strategy("push").reply_channels("r1") == [keys.prefill_done_channel("r1"),
                                                     keys.prefill_claimed_channel("r1")]


def test_pull_claims_nothing_before_computing():
    # No Redis: pull's prefill side has nothing to claim.
    assert strategy("pull").claim(None, PrefillRequest("r1", [1], "decode0@h", deadline_unix=0.0), "p", None)


def test_pull_counts_nothing_when_the_request_ends():
    pull = strategy("pull")
    pull.settle("r1", {push.OUTCOME_KEY: push.RECOMPUTED})
    pull.settle("r2", None)
    assert pull.counters == DisaggCounters()


def test_push_counts_its_outcome_when_the_request_ends():
    transfer = strategy("push")
    transfer.settle("a", {push.OUTCOME_KEY: push.RECEIVED})
    transfer.settle("b", {push.OUTCOME_KEY: push.RECOMPUTED})
    transfer.settle("c", None)
    assert (transfer.counters.num_remote_prefills, transfer.counters.num_local_fallbacks) == (1, 1)


# -- the pull wait, on a real Redis -------------------------------------------------------------


@pytest.fixture
def client(scratch_redis_url) -> redis.Redis:
    client = redis.Redis.from_url(scratch_redis_url)
    client.flushdb()
    return client


def pull_wait(redis_url: str, done: PrefillDone | None, wait_s: float = 5.0):
    """The decode side's pull wait, with ``done`` published once its subscription stands; then
    ``taken``. Returns (params, prefill worker, counters, subscribers left on the done channel)."""
    transfer = strategy("pull")

    async def run():
        aredis = redis.asyncio.Redis.from_url(redis_url)
        pubsub = aredis.pubsub()
        await pubsub.subscribe(*transfer.reply_channels("r1"))
        try:
            if done is not None:
                await aredis.publish(keys.prefill_done_channel("r1"), encode_prefill_done(done))
            params, worker = await transfer.wait(aredis, pubsub, "r1", wait_s)
            await transfer.taken(pubsub, "r1", worker)
            left = (await aredis.pubsub_numsub(keys.prefill_done_channel("r1")))[0][1]
            return params, worker, left
        finally:
            await pubsub.aclose()
            await aredis.aclose()

    params, worker, left = asyncio.run(run())
    return params, worker, transfer.counters, left


def test_pull_takes_the_prefill_engines_params_and_lets_go_of_the_channel(client, scratch_redis_url):
    register(client, P_ENDPOINT, lease_s=30)
    params, worker, counters, left = pull_wait(scratch_redis_url, PrefillDone("r1", "prefill0@h", PULLED))
    assert (params, worker) == (PULLED, "prefill0@h")
    assert (counters.num_prefill_done_notices, counters.num_remote_prefills) == (1, 1)
    assert left == 0, "pull needs no message after PrefillDone"


@pytest.mark.parametrize("done,match", [
    (PrefillDone("r1", "prefill0@h", error="RuntimeError: boom"), "boom"),
    (PrefillDone("r1", "prefill0@h", {"do_remote_prefill": True}), "lack"),
    (PrefillDone("r1", "prefill0@h", PULLED), "no longer registered"),  # the engine's lease lapsed
])
def test_pull_refuses_an_answer_it_cannot_use(client, scratch_redis_url, done, match):
    with pytest.raises(BadTransferParams, match=match):
        pull_wait(scratch_redis_url, done)


def test_pull_gives_up_at_its_wait(client, scratch_redis_url):
    with pytest.raises(TimeoutError):
        pull_wait(scratch_redis_url, None, wait_s=0.05)
