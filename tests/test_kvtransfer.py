"""Pure parts of kvtransfer: the disaggregation decision, run-time thresholds, transfer stats,
and the check on kv_transfer_params before they reach an engine."""

import asyncio
import os

import pytest

from config import DisaggConfig
from kvtransfer.connector import KV_HUGE_PAGES_ENV, BadTransferParams, engine_id_for, side_channel, transfer_config
from kvtransfer.policy import Thresholds, ThresholdSource, should_prefill_remotely
from kvtransfer.stats import TransferStats
from kvtransfer.transfer import PullTransfer
from placement import PROGRESS_DELAY_ENV

T = Thresholds(max_local_prefill_length=512, max_prefill_queue_size=2)


@pytest.mark.parametrize("prompt,hit,queue,remote", [
    (1000, 0, 0, True),      # long, nothing cached, queue empty
    (1000, 600, 0, False),   # mostly cached: the rest is short, so local
    (513, 0, 1, True),       # just past the threshold
    (512, 0, 0, False),      # at the threshold stays local
    (1000, 0, 2, False),     # prefill queue full: local
])
def test_decision(prompt, hit, queue, remote):
    assert should_prefill_remotely(prompt, hit, queue, T) is remote


class FakeAsyncRedis:
    def __init__(self, mapping):
        self.mapping = mapping
        self.reads = 0

    async def hgetall(self, key):
        self.reads += 1
        return self.mapping


def test_thresholds_from_redis_override_config_field_by_field():
    source = ThresholdSource(DisaggConfig(max_local_prefill_length=512, max_prefill_queue_size=4))
    client = FakeAsyncRedis({b"max_local_prefill_length": b"64"})
    t = asyncio.run(source.current(client))
    assert t == Thresholds(64, 4)
    asyncio.run(source.current(client))
    assert client.reads == 1  # cached for a second


def test_bad_threshold_override_is_ignored():
    source = ThresholdSource(DisaggConfig(max_local_prefill_length=512, max_prefill_queue_size=4))
    assert source.parse({b"max_prefill_queue_size": b"lots"}) == Thresholds(512, 4)


def test_transfer_stats_fold_nested_reports():
    stats = TransferStats()
    stats.add({"NixlConnector": {"bytes_transferred": [1000, 3000], "transfer_duration": [0.001, 0.003],
                                 "num_failed_transfers": []}})
    stats.add(None)
    stats.add({"bytes_transferred": [4000], "transfer_duration": [0.004], "num_failed_handshakes": [1]})
    assert (stats.num_transfers, stats.bytes_transferred, stats.num_failed) == (3, 8000, 1)
    assert stats.gbytes_per_s == pytest.approx(8000 / 0.008 / 1e9)


def test_decode_params_are_checked_before_the_engine_sees_them():
    good = {"remote_engine_id": "p", "remote_host": "h", "remote_port": 1, "remote_block_ids": [[1]],
            "remote_request_id": "r", "do_remote_prefill": True}
    assert PullTransfer.decode_params_from_done(good) == good
    with pytest.raises(BadTransferParams, match="remote_request_id"):
        PullTransfer.decode_params_from_done({k: v for k, v in good.items() if k != "remote_request_id"})
    with pytest.raises(BadTransferParams):
        PullTransfer.decode_params_from_done(None)


def test_engine_ids_are_safe_and_differ_per_incarnation():
    assert engine_id_for("decode0@host.example", pid=42) == "decode0-host.example-42"
    assert engine_id_for("decode0@host", pid=1) != engine_id_for("decode0@host", pid=2)


def test_transfer_config_loads_our_connectors_unless_delay_is_off(monkeypatch):
    import vllm.config  # noqa: F401  importing vLLM and torch sets variables of their own

    monkeypatch.delenv(PROGRESS_DELAY_ENV, raising=False)
    before = dict(os.environ)
    tamed = transfer_config("decode", "e-1", "pull", progress_delay_us=250)
    assert tamed.config.kv_connector == "NixlConnector"
    assert tamed.config.kv_connector_module_path == "kvtransfer.nixl_agents"
    assert tamed.config.kv_role == "kv_consumer" and tamed.config.kv_buffer_device == "cpu"
    # The delay is for the engine's processes: returned for the worker to apply, not set here.
    assert tamed.env == {PROGRESS_DELAY_ENV: "250", **KV_HUGE_PAGES_ENV}
    assert transfer_config("decode", "e-1", "pull", progress_delay_us=250, huge_pages=False).env == {
        PROGRESS_DELAY_ENV: "250"}
    stock = transfer_config("prefill", "e-2", "pull", progress_delay_us=0)
    assert stock.config.kv_role == "kv_producer" and stock.config.kv_connector_module_path is None
    assert dict(os.environ) == before


def test_side_channel_is_returned_with_its_environment_and_not_set(monkeypatch):
    monkeypatch.delenv("VLLM_NIXL_SIDE_CHANNEL_HOST", raising=False)
    monkeypatch.delenv("VLLM_NIXL_SIDE_CHANNEL_PORT", raising=False)
    before = dict(os.environ)
    channel = side_channel("127.0.0.1")
    host, port = channel
    assert host == "127.0.0.1" and port > 0
    assert channel.env == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port)}
    assert dict(os.environ) == before


def test_side_channel_ports_avoid_the_ephemeral_range():
    import random
    import socket

    from kvtransfer.connector import SIDE_CHANNEL_PORTS, free_port

    first = free_port("127.0.0.1", random.Random(7))
    assert first in SIDE_CHANNEL_PORTS and first < 32768
    # The same draw again, with that port taken: it is skipped, not returned.
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        again = free_port("127.0.0.1", random.Random(7))
    assert again != first and again in SIDE_CHANNEL_PORTS
