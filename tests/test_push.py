"""The push connector's pure parts (kvtransfer/push.py), and the claim that decides between a
prefill worker taking a prefill and its decode worker giving up on it (kvtransfer/transfer.py,
workers/disagg.py), on a real Redis: no broker, no engine."""

from __future__ import annotations

import asyncio
import os
import queue
import time

import msgspec
import pytest
import redis
import redis.asyncio

from config import load_settings
from kvtransfer import push
from kvtransfer.connector import KV_HUGE_PAGES_ENV, BadTransferParams, transfer_config
from kvtransfer.registry import NixlEndpoint, register
from kvtransfer.stats import DisaggCounters
from kvtransfer.transfer import PushTransfer
from placement import PROGRESS_DELAY_ENV
from tasks import keys
from tasks.messages import PrefillClaimed, PrefillRequest, decode_prefill_claimed, encode_prefill_claimed
from workers.disagg import PrefillServer, RemotePrefill

SETTINGS = load_settings("configs/disagg.yaml", ["disagg.connector=push"], environ={})
P_ENDPOINT = NixlEndpoint("prefill0-7", "prefill0@h", "prefill", "10.0.0.2", 21000, "push")
# The decode engine's kv_transfer_params for request r1 once P_ENDPOINT's worker has claimed it.
PUSHED_TO_P_ENDPOINT = {"do_remote_prefill": True, "remote_engine_id": "prefill0-7", "remote_host": "10.0.0.2",
                        "remote_port": 21000, "tp_size": 1, "remote_request_id": "r1"}


def test_expired_scans_every_deadline_not_just_a_prefix():
    # A request that ended while waiting keeps its older deadline behind newer ones.
    assert push.expired({"late": 5.0, "early": 1.0, "now": 3.0}, now=3.0) == ["early", "now"]
    assert push.expired({}, now=1.0) == []


def test_prefill_may_write_only_in_the_first_half_of_the_decode_wait():
    registration = {push.WRITE_BY_KEY: push.write_by(registered_unix=100.0, registration_timeout_s=10.0)}
    assert push.may_write(registration, 105.0)
    assert not push.may_write(registration, 105.1)
    assert push.may_write({}, 1e12)  # a registration from vLLM's own connector has no limit


def test_a_failed_receive_is_also_listed_as_finished_and_counts_as_recomputed():
    assert push.outcomes({"a", "b"}, {"b"}) == {"a": push.RECEIVED, "b": push.RECOMPUTED}
    assert push.outcomes(None, {"c"}) == {"c": push.RECOMPUTED}
    assert push.outcomes(None, None) == {}


@pytest.mark.parametrize("params,outcome", [
    ({push.OUTCOME_KEY: push.RECEIVED}, push.RECEIVED),
    ({push.OUTCOME_KEY: push.RECOMPUTED}, push.RECOMPUTED),
    ({push.OUTCOME_KEY: "other"}, None),
    ({}, None),
    (None, None),
])
def test_outcome_of_a_decode_request(params, outcome):
    assert push.outcome_of(params) == outcome


def test_the_engine_loop_skips_one_nap_after_a_receive():
    import time
    import types

    core = types.ModuleType("engine_core_stand_in")
    core.time = time
    clock = push.engine_loop_clock(core)
    assert core.time is clock and push.engine_loop_clock(core) is clock  # put in place once
    assert push.engine_loop_clock(None) is None
    assert clock.monotonic is time.monotonic  # the rest is time's
    clock.skip_next_nap = True
    began = time.perf_counter()
    clock.sleep(0.2)
    assert time.perf_counter() - began < 0.1 and not clock.skip_next_nap
    began = time.perf_counter()
    clock.sleep(0.02)  # only the one nap
    assert time.perf_counter() - began >= 0.02


def test_push_always_loads_our_connector_with_its_timeouts(monkeypatch):
    import vllm.config  # noqa: F401  importing vLLM and torch sets variables of their own

    monkeypatch.delenv(PROGRESS_DELAY_ENV, raising=False)
    before = dict(os.environ)
    transfer = transfer_config("decode", "d-1", "push", progress_delay_us=0, push_registration_timeout_s=7,
                               kv_lease_s=12)
    cfg = transfer.config
    assert cfg.kv_connector == "NixlPushConnector" and cfg.kv_connector_module_path == "kvtransfer.nixl_agents"
    assert cfg.kv_load_failure_policy == "recompute"
    assert cfg.kv_connector_extra_config == {"push_registration_timeout": 7, "kv_lease_duration": 12}
    assert transfer.env == {PROGRESS_DELAY_ENV: "0", **KV_HUGE_PAGES_ENV}
    assert dict(os.environ) == before


def test_push_config_keys_are_typed_and_checked():
    s = load_settings("configs/disagg.yaml", ["disagg.connector=push", "disagg.push_registration_timeout_s=3",
                                              "disagg.kv_lease_s=12"], environ={})
    assert (s.disagg.connector, s.disagg.push_registration_timeout_s, s.disagg.kv_lease_s) == ("push", 3.0, 12)
    from config import ConfigError
    with pytest.raises(ConfigError, match=r"disagg\.connector"):
        load_settings("configs/disagg.yaml", ["disagg.connector=shove"], environ={})
    with pytest.raises(ConfigError, match=r"disagg\.kv_lease_s"):
        load_settings("configs/disagg.yaml", ["disagg.kv_lease_s=2"], environ={})


def test_claim_round_trips():
    claim = PrefillClaimed("r1", "prefill0@h", "prefill0-7", "10.0.0.2", 21000)
    assert decode_prefill_claimed(encode_prefill_claimed(claim)) == claim
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"request_id": "r1", "prefill_worker_id": "p", "engine_id": "e", "host": "h", '
                            b'"port": 1, "extra": 1}', type=PrefillClaimed)


# -- the claim, on a real Redis -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(scratch_redis_url) -> str:
    return scratch_redis_url


@pytest.fixture
def client(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


class UnusedEngine:
    def run(self, coro):
        coro.close()
        raise AssertionError("a dropped prefill must not reach the engine")


def prefill_server(client: redis.Redis, counters: DisaggCounters) -> PrefillServer:
    return PrefillServer(SETTINGS, "prefill0@h", UnusedEngine(), client, P_ENDPOINT, counters)


def await_claim(redis_url: str, rid: str, wait_s: float, publish: bytes | None = None):
    """The decode side's wait for a claim, with its own asyncio client and subscription; the
    claim message, if given, is published once the subscription stands."""

    async def run():
        aredis = redis.asyncio.Redis.from_url(redis_url)
        pubsub = aredis.pubsub()
        await pubsub.subscribe(keys.prefill_claimed_channel(rid))
        try:
            if publish is not None:
                await aredis.publish(keys.prefill_claimed_channel(rid), publish)
            return await PushTransfer(SETTINGS.disagg, DisaggCounters()).wait(aredis, pubsub, rid, wait_s=wait_s)
        finally:
            await pubsub.aclose()
            await aredis.aclose()

    return asyncio.run(run())


def listen(client: redis.Redis, rid: str):
    """A subscription to the claim channel that stands (its confirmation read) on return."""
    pubsub = client.pubsub()
    pubsub.subscribe(keys.prefill_claimed_channel(rid))
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


def claim(client: redis.Redis, preq: PrefillRequest) -> bool:
    """The prefill side's claim, as PrefillServer.serve makes it."""
    return PushTransfer(SETTINGS.disagg, DisaggCounters()).claim(client, preq, "prefill0@h", P_ENDPOINT)


def prefill_request(rid="r1", deadline_in_s=30.0) -> PrefillRequest:
    import time

    return PrefillRequest(rid, [1, 2, 3], "decode0@h", deadline_unix=time.time() + deadline_in_s)


def test_a_claim_that_beat_the_give_up_is_still_taken(client, redis_url):
    register(client, P_ENDPOINT, lease_s=30)
    assert claim(client, prefill_request())
    # The claim's message went out before the decode side listened; the key still says who took it.
    params, worker = await_claim(redis_url, "r1", wait_s=0.05)
    assert worker == "prefill0@h"
    assert params == PUSHED_TO_P_ENDPOINT
    assert params["do_remote_prefill"] and params["remote_request_id"] == "r1"


def test_a_prefill_worker_that_comes_after_the_give_up_drops_the_task(client, redis_url):
    with pytest.raises(TimeoutError):
        await_claim(redis_url, "r1", wait_s=0.05)
    assert client.ttl(keys.prefill_claim("r1")) > 0, "the give-up must expire"
    client.set(keys.worker_lease("decode0@h"), b"{}", ex=30)  # the decode worker is alive
    counters, claims = DisaggCounters(), listen(client, "r1")
    prefill_server(client, counters).serve(prefill_request())
    assert (counters.num_prefills_dropped, counters.num_prefills_served) == (1, 0)
    assert claims.get_message(timeout=0.2) is None


def test_a_prefill_for_a_gone_decode_worker_is_dropped_without_a_claim(client):
    counters, claims = DisaggCounters(), listen(client, "r1")
    prefill_server(client, counters).serve(prefill_request())
    assert counters.num_prefills_dropped == 1
    assert not client.exists(keys.prefill_claim("r1"))
    assert claims.get_message(timeout=0.2) is None


def test_the_published_claim_names_the_engine_to_register_with(client, redis_url):
    register(client, P_ENDPOINT, lease_s=30)
    claims = listen(client, "r1")
    assert claim(client, prefill_request())
    message = claims.get_message(timeout=5)
    assert message is not None and message["channel"] == keys.prefill_claimed_channel("r1").encode()
    client.delete(keys.prefill_claim("r1"))  # so the decode side takes the message, not the key
    params, _ = await_claim(redis_url, "r1", wait_s=5, publish=message["data"])
    assert (params["remote_engine_id"], params["remote_host"], params["remote_port"]) == (
        P_ENDPOINT.engine_id, P_ENDPOINT.host, P_ENDPOINT.port)


def test_a_claim_from_an_engine_no_longer_registered_is_refused(redis_url, client):
    # No registry entry: the prefill engine's lease has lapsed.
    raw = encode_prefill_claimed(PrefillClaimed("r1", "prefill0@h", "prefill0-7", "10.0.0.2", 21000))
    with pytest.raises(BadTransferParams, match="no longer registered"):
        await_claim(redis_url, "r1", wait_s=5, publish=raw)
    with pytest.raises(BadTransferParams, match="unreadable"):
        await_claim(redis_url, "r2", wait_s=5, publish=b"junk")


def test_push_outcomes_are_counted_when_the_request_ends():
    remote = RemotePrefill(SETTINGS, "decode0@h", send_prefill=lambda preq: None, counters=DisaggCounters())
    remote.settle("a", {push.OUTCOME_KEY: push.RECEIVED})
    remote.settle("b", {push.OUTCOME_KEY: push.RECOMPUTED})
    remote.settle("c", None)  # ended before its KV arrived: neither
    assert (remote._counters.num_remote_prefills, remote._counters.num_local_fallbacks) == (1, 1)


def prefill_worker_up(client: redis.Redis) -> None:
    """A stand-in prefill worker's lease and NIXL endpoint, as a live one keeps them."""
    from tasks.registry import WorkerStatus, renew_lease

    register(client, P_ENDPOINT, lease_s=30)
    renew_lease(client, WorkerStatus("prefill0@h", "prefill", ["prefill"], "h", 1, 0.0, 0.0), lease_s=30)


def decode_side(redis_url: str, client: redis.Redis, sampling, answer, counters: DisaggCounters,
                settings=SETTINGS):
    """RemotePrefill.decode_leg for request r1 against a stand-in prefill worker: ``answer(preq)``
    is what it publishes once it has the PrefillRequest, in PrefillServer.serve's order. Returns
    the leg and the PrefillRequest it sent."""
    from tasks.messages import GenerateRequest

    prefill_worker_up(client)
    sent: list[PrefillRequest] = []

    def prefill_worker(preq: PrefillRequest) -> None:
        sent.append(preq)
        for channel, raw in answer(preq):
            client.publish(channel, raw)

    async def run():
        aredis = redis.asyncio.Redis.from_url(redis_url)
        try:
            remote = RemotePrefill(settings, "decode0@h", send_prefill=prefill_worker, counters=counters)
            req = GenerateRequest("r1", list(range(settings.disagg.max_local_prefill_length + 1)), sampling,
                                  deadline_unix=time.time() + 30)
            leg = await remote.decode_leg(aredis, req)
            async with asyncio.timeout(10):
                while remote.transfer._reports:  # the PrefillDone report, which ends when the message comes
                    await asyncio.gather(*remote.transfer._reports)
            return leg
        finally:
            await aredis.aclose()

    return asyncio.run(run()), sent[0]


def claimed(preq: PrefillRequest) -> tuple[str, bytes]:
    claim = PrefillClaimed(preq.request_id, "prefill0@h", P_ENDPOINT.engine_id, P_ENDPOINT.host, P_ENDPOINT.port)
    return keys.prefill_claimed_channel(preq.request_id), encode_prefill_claimed(claim)


def done(preq: PrefillRequest, **fields) -> tuple[str, bytes]:
    from tasks.messages import PrefillDone, encode_prefill_done

    return keys.prefill_done_channel(preq.request_id), encode_prefill_done(
        PrefillDone(preq.request_id, "prefill0@h", prefill_s=0.25, **fields))


def test_a_push_hears_the_prefill_done_over_pub_sub_after_the_claim(client, redis_url):
    """The decode side's whole push handshake for a request whose first token the decode engine
    samples (a stop string): the claim gives it where to register, and the prefill worker's
    PrefillDone, published after it computed, arrives over pub/sub too."""
    from tasks.messages import SamplingSpec

    counters = DisaggCounters()
    spec = SamplingSpec(max_tokens=1, stop=["x"])
    leg, preq = decode_side(redis_url, client, spec, lambda preq: [claimed(preq), done(preq)], counters)
    assert preq.sampling is None, "the prefill engine's token is nobody's"
    assert leg is not None and leg.kv_transfer_params == PUSHED_TO_P_ENDPOINT and leg.first is None
    assert (leg.prompt_token_ids, leg.sampling) == (list(range(len(preq.prompt_token_ids))), spec)
    assert counters.num_prefill_done_notices == 1
    assert counters.num_local_fallbacks == 0
    assert client.pubsub_numsub(keys.prefill_done_channel("r1"))[0][1] == 0, "the subscription must be closed"


def test_the_first_token_comes_with_the_prefill_done_and_the_decode_engine_continues(client, redis_url):
    from tasks.messages import Delta, SamplingSpec

    counters = DisaggCounters()
    spec = SamplingSpec(max_tokens=8, temperature=0.7, min_tokens=3, logprobs=1)
    t1 = Delta(0, " the", [278], finish_reason="length")
    leg, preq = decode_side(redis_url, client, spec, lambda preq: [claimed(preq), done(preq, first=t1)], counters)
    # The prefill engine samples with the request's sampling, for one token.
    assert preq.sampling == spec
    assert leg is not None and leg.first == Delta(0, " the", [278]) and not leg.release_only
    assert leg.prompt_token_ids == [*preq.prompt_token_ids, 278]
    assert (leg.sampling.max_tokens, leg.sampling.min_tokens, leg.sampling.temperature) == (7, 2, 0.7)
    # The decode engine registers only now, for the tokens the prefill engine computed.
    assert leg.kv_transfer_params == {**PUSHED_TO_P_ENDPOINT, push.PREFILLED_KEY: len(preq.prompt_token_ids)}
    assert (counters.num_prefill_done_notices, counters.num_local_fallbacks) == (1, 0)
    assert client.pubsub_numsub(keys.prefill_done_channel("r1"))[0][1] == 0, "the subscription must be closed"


@pytest.mark.parametrize("answer", [
    lambda preq: [claimed(preq), done(preq, error="RuntimeError: boom")],
    lambda preq: [claimed(preq), done(preq, kv_transfer_params={"x": 1})],  # an answer without the token
    lambda preq: [claimed(preq)],  # claimed, and then nothing within push_registration_timeout_s
], ids=["failed", "no-token", "silent"])
def test_a_prefill_that_brings_no_first_token_ends_in_a_local_prefill(client, redis_url, answer):
    from tasks.messages import SamplingSpec

    counters = DisaggCounters()
    settings = load_settings("configs/disagg.yaml", ["disagg.connector=push", "disagg.push_registration_timeout_s=0.5"],
                             environ={})
    leg, preq = decode_side(redis_url, client, SamplingSpec(max_tokens=4), answer, counters, settings=settings)
    assert preq.sampling is not None and leg is None
    assert counters.num_local_fallbacks == 1
    assert client.pubsub_numsub(keys.prefill_done_channel("r1"))[0][1] == 0, "the subscription must be closed"


def test_a_long_prompt_prefills_locally_while_the_workers_own_remote_prefills_fill_the_backlog(client, redis_url):
    """A prefill worker takes queued prefills as soon as it has task threads, so the queue stays
    empty however far behind its engine is: the backlog also counts the decode worker's own remote
    prefills that wait for an answer. At max_prefill_queue_size 1, a second long prompt prefills
    locally while the first waits, and a third goes remote once the first has its answer."""
    from tasks.messages import GenerateRequest, SamplingSpec

    settings = load_settings("configs/disagg.yaml", ["disagg.connector=push", "disagg.max_prefill_queue_size=1"],
                             environ={})
    prefill_worker_up(client)
    sent: queue.SimpleQueue[PrefillRequest] = queue.SimpleQueue()  # put from the executor's thread
    counters = DisaggCounters()
    spec = SamplingSpec(max_tokens=4, stop=["x"])  # the decode engine samples t1: the claim answers

    def request(rid: str) -> GenerateRequest:
        return GenerateRequest(rid, list(range(settings.disagg.max_local_prefill_length + 1)), spec,
                               deadline_unix=time.time() + 30)

    async def answer(remote: RemotePrefill, preq: PrefillRequest, leg_task: asyncio.Task):
        for channel, raw in (claimed(preq), done(preq)):
            client.publish(channel, raw)
        async with asyncio.timeout(10):
            leg = await leg_task
            while remote.transfer._reports:  # the PrefillDone report
                await asyncio.gather(*remote.transfer._reports)
        return leg

    async def run():
        aredis = redis.asyncio.Redis.from_url(redis_url)
        try:
            remote = RemotePrefill(settings, "decode0@h", send_prefill=sent.put, counters=counters)
            first = asyncio.create_task(remote.decode_leg(aredis, request("r1")))
            preq1 = await asyncio.to_thread(sent.get, timeout=10)  # sent, and nobody answers yet
            assert await remote.decode_leg(aredis, request("r2")) is None, "the backlog is full: local"
            assert await answer(remote, preq1, first) is not None and remote.outstanding == 0
            third = asyncio.create_task(remote.decode_leg(aredis, request("r3")))
            preq3 = await asyncio.to_thread(sent.get, timeout=10)
            assert preq3.request_id == "r3" and await answer(remote, preq3, third) is not None
        finally:
            await aredis.aclose()

    asyncio.run(run())
    assert sent.empty(), "r2 was never sent"
    assert (counters.num_local_by_backlog, counters.num_local_fallbacks) == (1, 0)


# -- the first token from the prefill engine: pure parts -----------------------------------------


def _spec(**fields):
    from tasks.messages import SamplingSpec

    return SamplingSpec(max_tokens=16, **fields)


@pytest.mark.parametrize("fields, eligible", [
    ({}, True),
    ({"temperature": 0.0, "ignore_eos": True}, True),
    ({"top_p": 0.9, "top_k": 5, "min_tokens": 4, "logprobs": 2, "repetition_penalty": 1.2,
      "logit_bias": [(5, 2.0)], "stop_token_ids": [7]}, True),
    ({"seed": 3, "temperature": 0.0}, True),  # greedy: the seed draws nothing
    ({"seed": 3}, False),
    ({"n": 2}, False),
    ({"stop": ["\n"]}, False),
    ({"presence_penalty": 0.5}, False),
    ({"frequency_penalty": 0.5}, False),
    ({"prompt_logprobs": 0}, False),
    ({"structured": {"regex": "a+"}}, False),
])
def test_which_requests_take_their_first_token_from_the_prefill_engine(fields, eligible):
    from tasks.messages import StructuredSpec
    from workers.disagg import first_token_from_prefill

    if "structured" in fields:
        fields = {**fields, "structured": StructuredSpec(**fields["structured"])}
    assert first_token_from_prefill(_spec(**fields)) is eligible


def test_the_prefill_engine_samples_one_token_with_the_requests_sampling():
    from workers.disagg import prefill_sampling

    spec = _spec(temperature=0.3, min_tokens=5, logprobs=1, stop_token_ids=[9], logit_bias=[(4, 1.0)])
    one = prefill_sampling(spec)
    assert (one.max_tokens, one.min_tokens) == (1, 1)
    assert msgspec.structs.replace(one, max_tokens=16, min_tokens=5) == spec
    assert prefill_sampling(_spec()).min_tokens == 0


def test_the_decode_engine_continues_from_the_first_token():
    from tasks.messages import Delta, TokenLogprob
    from workers.disagg import leg_from_first

    req = _req(_spec(min_tokens=3, logprobs=0, ignore_eos=True))
    t1 = Delta(0, "é", [301], logprobs=[TokenLogprob(301, "é", -0.5, [])], finish_reason="length")
    leg = leg_from_first(req, {"p": 1}, t1)
    assert leg.prompt_token_ids == [5, 6, 7, 301] and req.prompt_token_ids == [5, 6, 7]
    assert leg.sampling == msgspec.structs.replace(req.sampling, max_tokens=15, min_tokens=2)
    # Streamed as the prefill engine made it, text and logprobs, but not finished.
    assert leg.first == msgspec.structs.replace(t1, finish_reason=None)
    assert (leg.kv_transfer_params, leg.release_only) == ({"p": 1}, False)
    assert leg_from_first(_req(_spec()), {}, t1).sampling.min_tokens == 0


@pytest.mark.parametrize("max_tokens, finish, streamed", [(16, "stop", "stop"), (1, "length", "length"),
                                                          (1, "stop", "stop")])
def test_a_first_token_that_ends_the_request_only_releases_the_prefill(max_tokens, finish, streamed):
    from tasks.messages import Delta
    from workers.disagg import RELEASE_SAMPLING, leg_from_first

    spec = msgspec.structs.replace(_spec(), max_tokens=max_tokens)
    leg = leg_from_first(_req(spec), {}, Delta(0, "", [2], finish_reason=finish))
    assert leg.release_only and leg.first is not None and leg.first.finish_reason == streamed
    assert (leg.prompt_token_ids, leg.sampling) == ([5, 6, 7, 2], RELEASE_SAMPLING)


def test_a_first_token_that_is_not_one_token_is_refused():
    from tasks.messages import Delta
    from workers.disagg import leg_from_first

    with pytest.raises(BadTransferParams, match="2 tokens"):
        leg_from_first(_req(_spec()), {}, Delta(0, "ab", [1, 2]))


def _req(spec):
    from tasks.messages import GenerateRequest

    return GenerateRequest("r1", [5, 6, 7], spec, deadline_unix=0.0)


@pytest.mark.parametrize("matched, local, prefilled, taken", [
    (2049, 0, 2048, 2048),    # prompt + [t1]: all but t1, which the decode engine computes
    (2049, 1024, 2048, 1024),  # a local prefix hit: only the tail is pushed
    (2048, 0, None, 2048),    # a prompt the prefill engine computed in full: as vLLM takes it
    (16, 16, 16, 0),
])
def test_the_decode_engine_takes_no_more_tokens_than_the_prefill_engine_computed(matched, local, prefilled, taken):
    assert push.pushed_tokens(matched, local, prefilled) == taken


def test_a_prefill_done_carries_the_first_token():
    from tasks.messages import Delta, PrefillDone, TokenLogprob, TopLogprob, decode_prefill_done, encode_prefill_done

    done = PrefillDone("r1", "prefill0@h", {"k": 1}, prefill_s=0.2,
                       first=Delta(0, " a", [9], [TokenLogprob(9, " a", -0.1, [TopLogprob(" a", -0.1)])], "length"))
    assert decode_prefill_done(encode_prefill_done(done)) == done
    assert decode_prefill_done(encode_prefill_done(PrefillDone("r1", "p"))).first is None


def test_the_prefill_engines_deltas_merge_into_one():
    from tasks.messages import Delta, TokenLogprob
    from workers.disagg import merged

    lp = TokenLogprob(9, "b", -0.1, [])
    assert merged([Delta(0, "", [9], [lp]), Delta(0, "b", [], [], "length")]) == Delta(0, "b", [9], [lp], "length")
    assert merged([Delta(0, "a", [3])]) == Delta(0, "a", [3])
    assert merged([]) is None


class _Engine:
    """A stand-in decode engine: two tokens, 41 and 42, then the push's outcome."""

    def __init__(self):
        self.asked: list = []

    def generate(self, rid, prompt, sampling, kv_transfer_params=None):
        from types import SimpleNamespace

        self.asked.append((prompt, sampling, kv_transfer_params))

        async def outputs():
            for token, finish in ((41, None), (42, "length")):
                yield SimpleNamespace(outputs=[SimpleNamespace(index=0, text=f"<{token}>", token_ids=[token],
                                                               logprobs=None, finish_reason=finish)],
                                      prompt_logprobs=None, kv_transfer_params={"llmq_push": "received"},
                                      num_cached_tokens=3)
        return outputs()


def _relay(req, leg):
    """DecodeRuntime._relay with the given leg, on a stand-in engine and stream writer: returns its
    result, the engine's requests, the Deltas written and the settled params, once any request
    that only takes the KV has ended too."""
    from types import SimpleNamespace

    from workers.decode import DecodeRuntime

    written, settled = [], []

    class Remote:
        async def decode_leg(self, aredis, r):
            return leg

        def settle(self, rid, params):
            settled.append(params)

    class Writer:
        def submit(self, rid, events):
            written.extend(events)
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        async def write(self, rid, events):
            await self.submit(rid, events)

    runtime = SimpleNamespace(engine=_Engine(), remote_prefill=Remote(), _releases=set())
    runtime._release = lambda rid, leg, remote: DecodeRuntime._release(runtime, rid, leg, remote)

    async def run():
        result = await DecodeRuntime._relay(runtime, req, None, Writer(), SimpleNamespace(cancelled=lambda rid: False))
        async with asyncio.timeout(5):
            while runtime._releases:
                await asyncio.gather(*runtime._releases)
        return result

    return asyncio.run(run()), runtime.engine.asked, written, settled


def test_the_decode_worker_streams_the_first_token_then_the_decode_engines():
    """t1 goes out first, the engine runs prompt + [t1] for the rest, and the counts are the
    client's: its prompt, max_tokens completion tokens."""
    from tasks.messages import Delta
    from workers.decode import Ended
    from workers.disagg import leg_from_first

    req = _req(msgspec.structs.replace(_spec(temperature=0.0), max_tokens=3))  # the prompt: [5, 6, 7]
    leg = leg_from_first(req, {"do_remote_prefill": True}, Delta(0, "a", [40], finish_reason="length"))
    (num_tokens, ended), asked, written, settled = _relay(req, leg)
    assert [(prompt, spec.max_tokens, params) for prompt, spec, params in asked] == \
        [([5, 6, 7, 40], 2, {"do_remote_prefill": True})]
    assert [d.token_ids for d in written] == [[40], [41], [42]] and written[0].text == "a"
    assert [d.finish_reason for d in written] == [None, None, "length"]
    assert num_tokens == req.sampling.max_tokens and ended == Ended(num_cached_tokens=3)
    assert settled == [{"llmq_push": "received"}]


def test_a_first_token_that_ends_the_request_is_all_the_client_gets():
    """max_tokens 1: the client's answer is t1 alone; the decode engine's request, which takes the
    KV so the prefill engine's blocks go back, runs after it and its tokens go nowhere."""
    from tasks.messages import Delta
    from workers.decode import Ended
    from workers.disagg import RELEASE_SAMPLING, leg_from_first

    req = _req(msgspec.structs.replace(_spec(), max_tokens=1))
    leg = leg_from_first(req, {"do_remote_prefill": True}, Delta(0, "a", [40], finish_reason="length"))
    (num_tokens, ended), asked, written, settled = _relay(req, leg)
    assert (num_tokens, ended) == (1, Ended(num_cached_tokens=0))
    assert written == [Delta(0, "a", [40], finish_reason="length")]
    assert asked == [([5, 6, 7, 40], RELEASE_SAMPLING, {"do_remote_prefill": True})]
    assert settled == [{"llmq_push": "received"}]
