"""docker-compose.yml describes Redis, Flower, the frontend and the workers, and parses."""

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT


def test_compose_has_every_role():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"redis", "frontend", "decode", "flower"} <= set(services)
    assert "-Q" in services["decode"]["command"] and "decode" in services["decode"]["command"]
    assert services["frontend"]["environment"]["REDIS_URL"].startswith("redis://redis:")


def _compose_cli():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose CLI on this machine")
def test_compose_config_parses():
    proc = subprocess.run(_compose_cli() + ["-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
