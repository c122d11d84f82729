"""Flower, started as the launcher starts it, shows the deployment's workers, queues and tasks,
to those who give its password only, and from loopback only."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest

from config import dump_settings
from conftest import ROOT, free_port, wait_for
from launcher.__main__ import flower_child

pytestmark = pytest.mark.integration

CREDENTIALS = "admin:hunter2"


def _status(url: str, credentials: str | None = CREDENTIALS) -> tuple[int, str]:
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def _get(url: str) -> str:
    return _status(url)[1]


@pytest.fixture
def flower(deployment, tmp_path):
    settings = deployment.settings.model_copy(update={"flower": deployment.settings.flower.model_copy(
        update={"enabled": True, "port": free_port(), "basic_auth": CREDENTIALS})})
    assert settings.flower_refusal() is None
    cfg = tmp_path / "config.yaml"
    dump_settings(settings, cfg)
    child = flower_child(settings)
    proc = subprocess.Popen(child.argv, cwd=ROOT, env=dict(os.environ, LLMQ_CONFIG=str(cfg), **child.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{settings.flower.port}"
    try:
        wait_for(lambda: _get(f"{base}/healthcheck") == "OK", 60, "flower to answer")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_flower_asks_for_its_password_and_listens_on_loopback(flower):
    assert _status(f"{flower}/workers", credentials=None)[0] == 401
    assert _status(f"{flower}/api/workers", credentials=None)[0] == 401
    assert _status(f"{flower}/workers", credentials="admin:wrong")[0] == 401
    assert _status(f"{flower}/workers")[0] == 200
    port = int(flower.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"]


def test_flower_shows_workers_queues_and_tasks(deployment, flower):
    def ask():
        out = deployment.client().chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Seen in Flower?"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1

    ask()

    wait_for(lambda: "decode0@" in _get(f"{flower}/workers"), 60, "the decode worker on Flower's workers page")
    assert "decode" in _get(f"{flower}/broker")

    query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 50, "search[value]": "",
                                    "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "name"})

    def generate_tasks():
        body = _get(f"{flower}/tasks/datatable?{query}")
        rows = json.loads(body)["data"] if body else []
        found = [r for r in rows if r.get("name") == "tasks.generate"]
        if not found:
            # This deployment started without a Flower (flower.enabled false), so its workers send
            # task events only once this Flower has turned them on (its enable_events broadcast,
            # at start and every 5 s): a task that ran before then stays unseen, so ask again.
            ask()
        return found

    rows = wait_for(generate_tasks, 60, "the generation task in Flower's task list", interval_s=1.0)
    assert any(r.get("worker", "").startswith("decode0@") for r in rows)
    # Its arguments read as a summary, not as every prompt token id (tasks/messages.py task_argsrepr).
    assert any("prompt tokens, max_tokens=3" in str(r.get("args")) for r in rows), rows
