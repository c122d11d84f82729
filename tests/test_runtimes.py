"""One runtime class per engine role, each with only what its role has. Built, not started: no
broker, no engine."""

from __future__ import annotations

import pytest

from conftest import make_settings
from kvtransfer.transfer import PullTransfer, PushTransfer
from placement import PROGRESS_DELAY_ENV
from workers.decode import DecodeRuntime
from workers.prefill import PrefillRuntime
from workers.runtime import WorkerRuntime


@pytest.fixture
def keep_environ(monkeypatch):
    """Claiming a NIXL side channel sets variables for the engine's processes; put them back after."""
    for name in ("VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT", PROGRESS_DELAY_ENV):
        monkeypatch.setenv(name, "unset by the test")


def test_each_engine_role_gets_its_runtime():
    assert WorkerRuntime.for_role("decode") is DecodeRuntime and DecodeRuntime.role == "decode"
    assert WorkerRuntime.for_role("prefill") is PrefillRuntime and PrefillRuntime.role == "prefill"
    assert not hasattr(DecodeRuntime, "serve_prefill") and not hasattr(PrefillRuntime, "serve")
    for runtime in (DecodeRuntime, PrefillRuntime):
        assert hasattr(runtime, "reject_malformed")


def test_an_aggregated_decode_worker_has_no_remote_prefill(scratch_redis_url):
    runtime = DecodeRuntime(make_settings(scratch_redis_url), "decode0@h", ["decode"])
    assert runtime.remote_prefill is None and runtime.nixl is None and runtime.kv_events is None


@pytest.mark.parametrize("connector,strategy", [("push", PushTransfer), ("pull", PullTransfer)])
def test_with_disaggregation_both_roles_claim_a_side_channel_and_share_the_connector(
        scratch_redis_url, keep_environ, connector, strategy):
    settings = make_settings(scratch_redis_url, "disagg.yaml", **{"disagg.connector": connector})
    decode = DecodeRuntime(settings, "decode0@h", ["decode"])
    prefill = PrefillRuntime(settings, "prefill0@h", ["prefill"])
    assert type(decode.remote_prefill.transfer) is strategy and type(prefill.prefill_server.transfer) is strategy
    assert (decode.nixl.role, prefill.nixl.role) == ("decode", "prefill")
    assert decode.nixl.connector == prefill.nixl.connector == connector
    assert decode.nixl.engine_id != prefill.nixl.engine_id
