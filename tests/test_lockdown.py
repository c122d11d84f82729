"""Locked down by default: what listens where, Flower's password, and several named API keys.
Pure logic and one real /metrics socket; no broker. The deployments that use them are in
tests/test_flower.py and tests/test_bad_input.py."""

from __future__ import annotations

import os
import stat

import psutil
import pytest

from app.auth import APIKeys
from config import ConfigError, Settings, dump_settings, load_settings
from launcher.__main__ import flower_child, main
from workers.metrics import WorkerMetrics


def settings(*overrides: str, environ: dict[str, str] | None = None) -> Settings:
    return load_settings("configs/agg.yaml", list(overrides), environ=environ or {})


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        settings(*overrides)
    return str(e.value)


# -- API keys ---------------------------------------------------------------------------------


def test_api_key_is_the_default_key_and_api_keys_name_more():
    assert settings().frontend.named_api_keys == {}
    assert settings("frontend.api_key=k-0").frontend.named_api_keys == {"default": "k-0"}
    both = settings("frontend.api_key=k-0", "frontend.api_keys.alice=k-1", "frontend.api_keys.bob=k-2")
    assert both.frontend.named_api_keys == {"default": "k-0", "alice": "k-1", "bob": "k-2"}


def test_keys_come_from_the_environment_as_written():
    # YAML would read these as a number, a boolean and null.
    s = settings(environ={"LLMQ__FRONTEND__API_KEYS__ALICE": "123", "LLMQ__FRONTEND__API_KEYS__BOB": "yes",
                          "LLMQ__FRONTEND__API_KEY": "null", "LLMQ__FLOWER__BASIC_AUTH": "admin:0123"})
    assert s.frontend.named_api_keys == {"default": "null", "alice": "123", "bob": "yes"}
    assert s.flower.basic_auth == "admin:0123"


@pytest.mark.parametrize("overrides, named", [
    (["frontend.api_keys.alice=secret-one", "frontend.api_keys.bob=secret-one"], "two names share one key"),
    (["frontend.api_key=secret-one", "frontend.api_keys.default=secret-two"], "frontend.api_key is the key named"),
    (["frontend.api_keys.al ice=secret-one"], "frontend.api_keys.al ice: a key's name"),
    (["frontend.api_keys.alice=secret one"], "frontend.api_keys.alice: a key is printable ASCII"),
    (["frontend.api_key="], "frontend.api_key: a key is printable ASCII without spaces, and not empty"),
])
def test_bad_keys_are_named_and_never_shown(overrides, named):
    message = refused(*overrides)
    assert named in message
    assert "secret" not in message


def test_keys_match_by_name_and_nothing_else():
    keys = APIKeys({"default": "k-0", "alice": "k-1"})
    assert keys.required and not APIKeys({}).required
    assert keys.name_for("Bearer k-1") == "alice"
    assert keys.name_for("Bearer k-0") == "default"
    for wrong in ["", "Bearer", "Bearer ", "k-1", "bearer k-1", "Bearer k-1 ", "Bearer k-", "Basic k-1",
                  "Bearer \u00ff\udcff"]:
        assert keys.name_for(wrong) is None, wrong


def test_resolved_config_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "resolved.yaml"
    path.write_text("")
    path.chmod(0o644)
    dump_settings(settings("frontend.api_keys.alice=k-1"), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_settings(path, environ={}).frontend.named_api_keys == {"alice": "k-1"}


# -- where things listen ----------------------------------------------------------------------


def test_listen_addresses_are_loopback_unless_a_setting_says_otherwise():
    s = settings()
    assert (s.workers.metrics_listen_host, s.flower_address) == ("127.0.0.1", "127.0.0.1")
    s = settings("workers.advertise_host=10.0.0.2")
    assert (s.workers.metrics_listen_host, s.flower_address) == ("10.0.0.2", "10.0.0.2")
    s = settings("workers.advertise_host=10.0.0.2", "workers.metrics_host=0.0.0.0", "flower.address=0.0.0.0")
    assert (s.workers.metrics_listen_host, s.flower_address) == ("0.0.0.0", "0.0.0.0")


def test_worker_metrics_listen_on_loopback_by_default():
    address = WorkerMetrics("decode", dict, set()).serve(settings().workers)
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    [listening] = [c for c in psutil.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port) and c.pid == os.getpid()]
    assert listening.laddr.ip == "127.0.0.1"


def test_metrics_on_an_address_this_host_lacks_fail_by_name():
    # 192.0.2.0/24 is TEST-NET-1: never an address of this host.
    with pytest.raises(RuntimeError, match=r"cannot listen on 192\.0\.2\.7.*workers\.advertise_host"):
        WorkerMetrics("decode", dict, set()).serve(settings("workers.advertise_host=192.0.2.7").workers)


# -- Flower -----------------------------------------------------------------------------------


def test_flower_needs_a_password_with_an_api_key_or_beyond_loopback():
    assert settings().flower_refusal() is None
    assert "frontend.api_key" in settings("frontend.api_keys.alice=k-1").flower_refusal()
    assert "10.0.0.2 (workers.advertise_host)" in settings("workers.advertise_host=10.0.0.2").flower_refusal()
    assert "0.0.0.0 (flower.address)" in settings("flower.address=0.0.0.0").flower_refusal()
    assert "flower.basic_auth" in settings("flower.address=flower.example").flower_refusal()
    assert settings("flower.address=0.0.0.0", "frontend.api_key=k-0",
                    "flower.basic_auth=admin:pw").flower_refusal() is None


@pytest.mark.parametrize("credentials", ["admin", "admin:", ":hunter2", "admin:hunter2,", "admin:hünter2"])
def test_flower_credentials_are_user_password_pairs(credentials):
    message = refused(f"flower.basic_auth={credentials}")
    assert "flower.basic_auth" in message and "nter2" not in message


def test_flower_gets_its_address_on_the_command_line_and_its_password_in_the_environment():
    child = flower_child(settings("flower.basic_auth=admin:pw,ops:pw2"))
    assert "--address=127.0.0.1" in child.argv
    assert child.env == {"FLOWER_BASIC_AUTH": "admin:pw,ops:pw2"}
    assert not any("pw" in arg for arg in child.argv)
    assert flower_child(settings()).env == {}


def test_launcher_refuses_flower_without_a_password_before_starting_anything(capsys):
    code = main(["serve", "--roles", "flower", "--set", "flower.address=0.0.0.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not starting" in err and "flower.basic_auth" in err and "LLMQ__FLOWER__BASIC_AUTH" in err
