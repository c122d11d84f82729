"""`celery -A tasks flower`, run by hand, shows the deployment's workers, queues and tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from config import dump_settings
from conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()
    except OSError:
        return ""


@pytest.fixture
def flower(deployment, tmp_path):
    cfg = tmp_path / "config.yaml"
    dump_settings(deployment.settings, cfg)
    port = free_port()
    env = dict(os.environ, LLMQ_CONFIG=str(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}",
                             "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/healthcheck") == "OK", 60, "flower to answer")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_flower_shows_workers_queues_and_tasks(deployment, flower):
    out = deployment.client().chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Seen in Flower?"}], max_tokens=3)
    assert out.usage.completion_tokens >= 1

    wait_for(lambda: "decode0@" in _get(f"{flower}/workers"), 60, "the decode worker on Flower's workers page")
    assert "decode" in _get(f"{flower}/broker")

    query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 50, "search[value]": "",
                                    "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "name"})

    def generate_tasks():
        body = _get(f"{flower}/tasks/datatable?{query}")
        rows = json.loads(body)["data"] if body else []
        return [r for r in rows if r.get("name") == "tasks.generate"]

    rows = wait_for(generate_tasks, 60, "the generation task in Flower's task list")
    assert any(r.get("worker", "").startswith("decode0@") for r in rows)
    # Its arguments read as a summary, not as every prompt token id (tasks/messages.py task_argsrepr).
    assert any("prompt tokens, max_tokens=3" in str(r.get("args")) for r in rows), rows
