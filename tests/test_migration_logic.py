"""Migration without engines: the resumed request (app/migration.py), the worker's atomic claim
(workers/outputs.py), and the gateway moving a request when a lease goes, on a real Redis with
events written as a worker writes them. The deployments' tests are in test_migration.py."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from app.migration import Attempts, CannotMigrate, attempt_id, is_lost, resumed, unresumable
from conftest import wait_for
from tasks import keys
from tasks.messages import Delta, Finished, GenerateRequest, SamplingSpec, StructuredSpec, request_from_task_arg
from tasks.registry import WorkerStatus, renew_lease
from workers.detok import ResumableDecodeStream
from workers.outputs import ACCEPTED, CANCELLED, CLAIMED, OutputWriter


def status(worker_id: str, pid: int = 1, role: str = "decode") -> WorkerStatus:
    return WorkerStatus(worker_id, role, [], "h", pid, 0.0, 0.0)


def request(**sampling) -> GenerateRequest:
    spec = SamplingSpec(**{"max_tokens": 10, "temperature": 0.0, **sampling})
    return GenerateRequest("r1", [1, 2, 3], spec, deadline_unix=123.0, prefix_hit_tokens=64)


def delta(*tokens: int, finish: str | None = None, index: int = 0) -> Delta:
    return Delta(index=index, text="".join(f"<{t}>" for t in tokens), token_ids=list(tokens), finish_reason=finish)


# -- the resumed request --------------------------------------------------------------------------


def test_a_resumed_request_continues_after_the_tokens_received():
    first = request(min_tokens=6, ignore_eos=True, logprobs=2)
    again = resumed(first, [7, 8, 9, 10], "r1-m1", ["decode0@h"])
    assert again.prompt_token_ids == [1, 2, 3, 7, 8, 9, 10]
    assert again.sampling.max_tokens == 6 and again.sampling.min_tokens == 2
    assert again.sampling.ignore_eos and again.sampling.logprobs == 2  # the rest is kept
    assert (again.request_id, again.exclude_workers, again.deadline_unix) == ("r1-m1", ["decode0@h"], 123.0)
    assert again.prefix_hit_tokens == 0  # the router sets it for the new prompt
    assert resumed(first, [7] * 8, "r1-m2", []).sampling.min_tokens == 0


def test_attempts_count_tokens_and_build_each_attempt():
    attempts = Attempts(request(), max_migrations=3)
    attempts.record(delta(7, 8))
    attempts.record(delta(9))
    attempts.lose("decode0@h", 100)
    live = {"decode1@h": status("decode1@h")}
    msg = attempts.next_attempt(live)
    assert msg.request_id == "r1-m1" and attempts.request is msg
    assert msg.prompt_token_ids == [1, 2, 3, 7, 8, 9] and msg.sampling.max_tokens == 7
    assert msg.exclude_workers == ["decode0@h"]
    # Tokens of the second attempt add to the first's.
    attempts.record(delta(11))
    attempts.lose("decode1@h", 1)
    msg = attempts.next_attempt({})
    assert msg.request_id == "r1-m2" and msg.prompt_token_ids == [1, 2, 3, 7, 8, 9, 11]
    assert msg.sampling.max_tokens == 6 and msg.exclude_workers == ["decode0@h", "decode1@h"]
    assert attempts.migrations == 2


def test_a_replacement_under_the_same_name_is_not_excluded():
    attempts = Attempts(request(), max_migrations=3)
    attempts.lose("decode0@h", 100)
    # Gone, or its own lease still up (a dead engine's worker, before it drops it): excluded.
    assert attempts.exclusions({}) == ["decode0@h"]
    assert attempts.exclusions({"decode0@h": status("decode0@h", pid=100)}) == ["decode0@h"]
    assert not attempts.has_candidate({"decode0@h": status("decode0@h", pid=100)})
    # The launcher's replacement, a new process under the same name, may take it.
    replaced = {"decode0@h": status("decode0@h", pid=200)}
    assert attempts.exclusions(replaced) == [] and attempts.has_candidate(replaced)
    # A router is no candidate for generation.
    assert not attempts.has_candidate({"router0@h": status("router0@h", role="router")})


def test_is_lost_compares_the_process():
    live = {"w@h": status("w@h", pid=5)}
    assert not is_lost("w@h", 5, live) and not is_lost("w@h", None, live)
    assert is_lost("w@h", 6, live) and is_lost("x@h", 5, live)


def test_with_no_token_received_a_request_goes_again_whole():
    first = request(n=3, seed=7, temperature=1.0, presence_penalty=1.0, stop=["x"])
    attempts = Attempts(first, max_migrations=1)
    attempts.lose("decode0@h", 1)  # nothing refused: nothing was generated yet
    again = attempts.next_attempt({})
    assert again.prompt_token_ids == first.prompt_token_ids and again.sampling == first.sampling


@pytest.mark.parametrize("sampling,why", [
    ({"n": 2}, "n=2 choices"),
    ({"seed": 7, "temperature": 0.8}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"stop": ["\n\n"]}, "stop strings"),
    ({"structured": StructuredSpec(choice=["yes", "no"])}, "constrained"),
])
def test_what_cannot_resume_exactly_is_refused_once_tokens_came(sampling, why):
    attempts = Attempts(request(**sampling), max_migrations=3)
    attempts.record(delta(7))
    with pytest.raises(CannotMigrate) as refused:
        attempts.lose("decode0@h", 1)
    assert refused.value.reason == "unresumable"
    assert "could not be resumed on another attempt" in refused.value.message and why in refused.value.message
    assert "decode0@h" in refused.value.message and "after 1 token" in refused.value.message


@pytest.mark.parametrize("sampling", [
    {"seed": 7},  # at temperature 0 the seed changes nothing
    {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.2, "stop_token_ids": [2]},
])
def test_what_resumes_exactly_is_not_refused(sampling):
    assert unresumable(request(**sampling).sampling, 5) is None


def test_past_the_limit_a_request_does_not_move():
    attempts = Attempts(request(), max_migrations=1)
    attempts.lose("decode0@h", 1)
    attempts.next_attempt({})
    with pytest.raises(CannotMigrate, match="already moved 1 time") as refused:
        attempts.lose("decode1@h", 1)
    assert refused.value.reason == "limit"
    with pytest.raises(CannotMigrate):
        Attempts(request(), max_migrations=0).lose("decode0@h", 1)


def test_a_request_whose_every_choice_ended_is_complete():
    attempts = Attempts(request(max_tokens=3), max_migrations=3)
    attempts.record(delta(7, 8))
    assert not attempts.complete
    attempts.record(delta(9, finish="length"))
    assert attempts.complete
    several = Attempts(request(n=2), max_migrations=3)
    several.record(delta(7, finish="stop", index=0))
    assert not several.complete
    several.record(delta(8, finish="stop", index=1))
    assert several.complete


def test_attempt_ids():
    assert attempt_id("abc-0", 0) == "abc-0" and attempt_id("abc-0", 2) == "abc-0-m2"


# -- the worker's claim (real Redis) --------------------------------------------------------------


@pytest.fixture
def client(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    yield client
    for pattern in ("llmq:claim:mig-*", "llmq:cancel:mig-*", "llmq:out:mig-*", "llmq:worker:mig*"):
        for key in client.scan_iter(match=pattern):
            client.delete(key)


def test_a_request_is_accepted_once_and_never_after_a_cancel(client):
    first = OutputWriter(client, "mig-claim", ttl_s=60)
    assert first.accept("decode0@h", claim_ttl_s=30) == ACCEPTED
    # A second copy of the message (resent, or redelivered) finds the claim and writes nothing.
    assert OutputWriter(client, "mig-claim", ttl_s=60).accept("decode1@h", claim_ttl_s=30) == CLAIMED
    entries = client.xrange(keys.output_stream("mig-claim"))
    assert len(entries) == 1 and 0 < client.ttl(keys.output_stream("mig-claim")) <= 60
    assert 0 < client.ttl(keys.claim("mig-claim")) <= 30
    client.set(keys.cancel_flag("mig-gone"), 1)
    assert OutputWriter(client, "mig-gone", ttl_s=60).accept("decode0@h", claim_ttl_s=30) == CANCELLED
    assert client.xlen(keys.output_stream("mig-gone")) == 0 and not client.exists(keys.claim("mig-gone"))


# -- the gateway moving a request (real Redis, events written as a worker writes them) -----------


class Sent:
    """Stands in for Celery's send_task: records the messages the gateway sends."""

    def __init__(self):
        self.messages: list[GenerateRequest] = []
        self.arrived = threading.Condition()

    def send_task(self, name, args, **_options):
        with self.arrived:
            self.messages.append(request_from_task_arg(args[0]))
            self.arrived.notify_all()

    def wait(self, count: int, timeout_s: float = 5) -> GenerateRequest:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout=timeout_s), self.messages
            return self.messages[count - 1]


def _gateway(client, url: str, sent: Sent, **frontend):
    from app.gateway import Gateway
    from conftest import make_settings

    # Published through Celery's send_task, which Sent stands in for; the direct path's message is
    # Celery's own (tests/test_publish.py) and the deployments' tests run it.
    frontend = {"publish": "celery", **frontend}
    return Gateway(make_settings(url, **{f"frontend.{k}": v for k, v in frontend.items()}), celery=sent,
                   client=client)


def _lease(client, worker_id: str, pid: int) -> None:
    renew_lease(client, status(worker_id, pid=pid), lease_s=60)


def test_a_request_whose_worker_is_lost_continues_on_another(client, scratch_redis_url):
    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    _lease(client, "mig0@h", 10)
    _lease(client, "mig1@h", 11)
    [sub] = gateway.submit("mig-move", [[1, 2, 3]], SamplingSpec(max_tokens=5, temperature=0.0))
    got: list[Delta] = []
    reader = threading.Thread(target=lambda: got.extend(d for _, d in gateway.events([sub])))
    reader.start()
    first = sent.wait(1)
    out = OutputWriter(client, first.request_id, ttl_s=60)
    assert out.accept("mig0@h", 60) == ACCEPTED
    out.write([delta(7, 8)])
    killed = time.monotonic()
    client.delete(keys.worker_lease("mig0@h"))  # as the launcher does when its child dies
    second = sent.wait(2)
    noticed = time.monotonic() - killed
    out.write([delta(99)])  # a late token of the abandoned attempt: never read
    assert second.request_id == "mig-move-m1" and second.prompt_token_ids == [1, 2, 3, 7, 8]
    assert second.sampling.max_tokens == 3 and second.exclude_workers == ["mig0@h"]
    assert client.exists(keys.cancel_flag("mig-move"))  # the abandoned attempt's copy is dropped
    out2 = OutputWriter(client, second.request_id, ttl_s=60)
    assert out2.accept("mig1@h", 60) == ACCEPTED
    out2.write([delta(9), delta(10, 11, finish="length"), Finished(num_prompt_tokens=5, num_cached_tokens=5)])
    reader.join(timeout=10)
    assert [t for d in got for t in d.token_ids] == [7, 8, 9, 10, 11]
    assert sub.migrations == 1 and sub.worker_id == "mig1@h"
    assert sub.finished.num_cached_tokens == 3  # of the client's prompt, not of the tokens resent
    assert noticed < 2


def test_a_worker_replaced_under_its_name_counts_as_lost(client, scratch_redis_url):
    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    _lease(client, "mig0@h", 10)
    [sub] = gateway.submit("mig-same", [[1, 2]], SamplingSpec(max_tokens=4, temperature=0.0))
    reader = threading.Thread(target=lambda: list(gateway.events([sub])))
    reader.start()
    out = OutputWriter(client, sent.wait(1).request_id, ttl_s=60)
    out.accept("mig0@h", 60)
    out.write([delta(7)])
    _lease(client, "mig0@h", 20)  # its replacement: same name, another process
    second = sent.wait(2)
    # ...which may take the rest: it is not the process that was lost.
    assert second.prompt_token_ids == [1, 2, 7] and second.exclude_workers == []
    out2 = OutputWriter(client, second.request_id, ttl_s=60)
    out2.accept("mig0@h", 60)
    out2.write([delta(8, 9, 10, finish="length"), Finished(3)])
    reader.join(timeout=10)
    assert not reader.is_alive()


def test_with_no_worker_left_the_request_fails_clearly_not_hangs(client, scratch_redis_url, caplog):
    from app.errors import APIError

    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent, first_token_timeout_s=1.5)
    _lease(client, "mig0@h", 10)
    with caplog.at_level("INFO", logger="app.gateway"):
        [sub] = gateway.submit("mig-none", [[1]], SamplingSpec(max_tokens=4, temperature=0.0), api_key_name="alice")
    assert "[mig-none] enqueued 1 task(s), 1 prompt tokens, API key alice" in caplog.text
    out = OutputWriter(client, sent.wait(1).request_id, ttl_s=60)
    out.accept("mig0@h", 60)
    out.write([delta(7)])
    client.delete(keys.worker_lease("mig0@h"))
    started = time.monotonic()
    with pytest.raises(APIError) as failed:
        list(gateway.events([sub]))
    assert failed.value.status == 503 and failed.value.type == "service_unavailable"
    assert "mig0@h" in failed.value.message and "was lost" in failed.value.message
    assert time.monotonic() - started < 1.5 + 2
    assert len(sent.messages) == 1  # nowhere to send it


def test_an_unaccepted_request_is_resent_when_a_worker_that_may_hold_it_dies(client, scratch_redis_url):
    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    _lease(client, "mig0@h", 10)
    _lease(client, "mig1@h", 11)
    [sub] = gateway.submit("mig-queued", [[1]], SamplingSpec(max_tokens=2, temperature=0.0))
    reader = threading.Thread(target=lambda: list(gateway.events([sub])))
    reader.start()
    sent.wait(1)
    client.delete(keys.worker_lease("mig0@h"))  # it may have prefetched the message
    again = sent.wait(2)
    assert again.request_id == "mig-queued" and sub.migrations == 0  # the same attempt, sent again
    out = OutputWriter(client, "mig-queued", ttl_s=60)
    assert out.accept("mig1@h", 60) == ACCEPTED
    assert OutputWriter(client, "mig-queued", ttl_s=60).accept("mig1@h", 60) == CLAIMED  # the other copy
    out.write([delta(5, 6, finish="length"), Finished(1)])
    reader.join(timeout=10)
    assert not reader.is_alive() and sub.finished is not None


def test_a_dead_engine_moves_the_request_but_not_back_to_that_process(client, scratch_redis_url):
    from tasks.messages import Failed

    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    _lease(client, "mig0@h", 10)  # the dying worker's lease is still up when it reports
    [sub] = gateway.submit("mig-engine", [[1, 2]], SamplingSpec(max_tokens=3, temperature=0.0))
    reader = threading.Thread(target=lambda: list(gateway.events([sub])))
    reader.start()
    out = OutputWriter(client, sent.wait(1).request_id, ttl_s=60)
    out.accept("mig0@h", 60)
    out.write([delta(7), Failed(503, "engine_unavailable", "the worker's engine died; retry the request")])
    time.sleep(1.0)  # two poll intervals: it must not go back to the same process meanwhile
    assert len(sent.messages) == 1 and sub.migrations == 1 and sub.waiting
    _lease(client, "mig0@h", 20)  # the launcher's replacement
    again = sent.wait(2)
    assert again.prompt_token_ids == [1, 2, 7] and again.sampling.max_tokens == 2
    out2 = OutputWriter(client, again.request_id, ttl_s=60)
    out2.accept("mig0@h", 60)
    out2.write([delta(8, 9, finish="length"), Finished(3)])
    reader.join(timeout=10)
    assert not reader.is_alive() and sub.finished is not None


def test_with_sentinels_a_lost_stream_read_moves_the_request_to_any_worker_its_own_included(client, scratch_redis_url):
    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    gateway.failover_capable = True  # as a sentinel:// redis_url makes it
    _lease(client, "mig0@h", 10)
    [sub] = gateway.submit("mig-failover", [[1, 2]], SamplingSpec(max_tokens=4, temperature=0.0))
    got: list[Delta] = []
    reader = threading.Thread(target=lambda: got.extend(d for _, d in gateway.events([sub])))
    reader.start()
    out = OutputWriter(client, sent.wait(1).request_id, ttl_s=60)
    out.accept("mig0@h", 60)
    out.write([delta(7)])
    wait_for(lambda: sub.attempts.num_received == 1, 5, "the first token")
    # What the stream reader delivers when its connection to the (old) master breaks.
    gateway.streams._fail_all(redis.ConnectionError("Connection closed by server."))
    second = sent.wait(2)
    assert second.prompt_token_ids == [1, 2, 7] and second.exclude_workers == []
    assert client.exists(keys.cancel_flag("mig-failover"))
    out2 = OutputWriter(client, second.request_id, ttl_s=60)
    out2.accept("mig0@h", 60)
    out2.write([delta(8, 9, 10, finish="length"), Finished(3)])
    reader.join(timeout=10)
    assert [t for d in got for t in d.token_ids] == [7, 8, 9, 10] and sub.migrations == 1


def test_with_one_redis_a_lost_stream_read_is_a_503(client, scratch_redis_url):
    from app.errors import RedisUnavailable

    sent = Sent()
    gateway = _gateway(client, scratch_redis_url, sent)
    _lease(client, "mig0@h", 10)
    [sub] = gateway.submit("mig-outage", [[1, 2]], SamplingSpec(max_tokens=4, temperature=0.0))
    failed: list[Exception] = []

    def read() -> None:
        try:
            list(gateway.events([sub]))
        except RedisUnavailable as e:
            failed.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    sent.wait(1)
    wait_for(lambda: gateway.streams._streams, 5, "the stream to open")
    gateway.streams._fail_all(redis.ConnectionError("Connection closed by server."))
    reader.join(timeout=10)
    assert failed and len(sent.messages) == 1


# -- the resumed request's text -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(f"{model_path}/tokenizer.json")


def _text(tokenizer, prompt: list[int], outputs: list[int]) -> str:
    """What vLLM's detokenizer streams for outputs after prompt, with the stream it builds."""
    stream = ResumableDecodeStream(ids=prompt, skip_special_tokens=True)
    return "".join(stream.step(tokenizer, t) or "" for t in outputs)


def test_a_resumed_streams_text_goes_on_where_it_stopped_even_inside_a_character(tokenizer):
    import random

    prompt = tokenizer.encode("Tell me", add_special_tokens=False).ids
    # Characters of 3 and 4 bytes, one byte token each, and bytes that form no character at all
    # (a lone continuation byte, a lead byte with nothing after it).
    chars = tokenizer.encode(" 中🙂 ok", add_special_tokens=False).ids
    junk = tokenizer.encode(b"\x80 \xe4 x".decode("latin-1"), add_special_tokens=False).ids
    rng = random.Random(7)
    cases = [chars + junk + chars]
    cases += [[rng.randrange(3, tokenizer.get_vocab_size()) for _ in range(60)] for _ in range(20)]
    for outputs in cases:
        whole = _text(tokenizer, prompt, outputs)
        for k in range(1, len(outputs)):  # the move after k tokens: the new prompt holds them
            moved = _text(tokenizer, prompt, outputs[:k]) + _text(tokenizer, prompt + outputs[:k], outputs[k:])
            assert moved == whole, (outputs, k)
    assert "中🙂" in _text(tokenizer, prompt, chars)
