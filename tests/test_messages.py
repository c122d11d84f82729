"""Wire messages round-trip, and a peer on another wire version is refused before decoding."""

import pytest

from tasks.messages import (
    WIRE_VERSION,
    Accepted,
    Delta,
    Failed,
    Finished,
    GenerateRequest,
    PrefillRequest,
    SamplingSpec,
    TokenLogprob,
    TopLogprob,
    WireVersionError,
    decode_event,
    encode_event,
    request_from_task_arg,
    request_to_task_arg,
    task_argsrepr,
)


def test_request_round_trip_through_task_args():
    req = GenerateRequest("r1", [1, 2, 3], SamplingSpec(max_tokens=4, stop=["x"], logprobs=2), 123.5)
    payload = request_to_task_arg(req)
    assert payload["version"] == WIRE_VERSION
    assert request_from_task_arg(payload) == req


def test_task_args_show_as_a_summary():
    req = GenerateRequest("r1", list(range(100)), SamplingSpec(max_tokens=4), 1.0)
    assert task_argsrepr(req) == "r1: 100 prompt tokens, max_tokens=4"
    assert task_argsrepr(PrefillRequest("r2", [1, 2], "decode0@h", 1.0)) == "r2: 2 prompt tokens, for decode0@h"


@pytest.mark.parametrize("version", [None, WIRE_VERSION + 1, "1"])
def test_other_wire_versions_are_refused(version):
    payload = request_to_task_arg(GenerateRequest("r1", [1], SamplingSpec(max_tokens=1), 1.0))
    payload["version"] = version
    with pytest.raises(WireVersionError):
        request_from_task_arg(payload)


def test_unknown_fields_are_refused():
    payload = request_to_task_arg(GenerateRequest("r1", [1], SamplingSpec(max_tokens=1), 1.0))
    payload["sampling"]["temprature"] = 0.5
    with pytest.raises(ValueError):
        request_from_task_arg(payload)


@pytest.mark.parametrize("event", [
    Accepted("w1"),
    Delta(0, "hi", [5, 6], [TokenLogprob(5, "h", -0.1, [TopLogprob("h", -0.1)])], "stop"),
    Finished(10, 4),
    Failed(503, "server_error", "boom"),
])
def test_events_round_trip(event):
    assert decode_event(encode_event(event)) == event
