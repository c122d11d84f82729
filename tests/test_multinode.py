"""The two-node recipe of Dynamo's examples on one machine: node 2 is a network namespace with its own address.

Node 1 runs Redis, the frontend and a decode worker; node 2 runs only a prefill worker, started
with nothing shared but REDIS_URL. A long prompt is prefilled on node 2 and its KV crosses to
node 1 over NIXL, from node 2's address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import redis

from config import dump_settings
from conftest import ROOT, live_status, make_settings, start_deployment, wait_for
from kvtransfer import registry as kv_registry
from kvtransfer.connector import engine_id_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    n = os.getpid() % 250
    ns, host_if, ns_if = f"llmq-n2-{os.getpid()}", f"vh{os.getpid()}"[:15], f"vn{os.getpid()}"[:15]
    head_ip, node_ip = f"10.213.{n}.1", f"10.213.{n}.2"
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{head_ip}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_ip}/24", "dev", ns_if)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make a network namespace here: {e.stderr.decode().strip()}")
    try:
        yield ns, head_ip, node_ip
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


@pytest.fixture(scope="module")
def head_redis(two_hosts):
    _, head_ip, _ = two_hosts
    with socket.socket() as s:
        s.bind((head_ip, 0))
        port = s.getsockname()[1]
    # Reachable from node 2, so not in protected mode; it listens only on the test's own link.
    proc = subprocess.Popen(["redis-server", "--bind", head_ip, "--port", str(port), "--protected-mode", "no",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://{head_ip}:{port}/0"
    wait_for(lambda: _answers(url), 15, "the head node's Redis")
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def _answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError:
        return False


@pytest.mark.parametrize("connector", ["pull", "push"])
def test_prefill_worker_on_another_host(two_hosts, head_redis, model_path, tmp_path, connector):
    ns, head_ip, node_ip = two_hosts
    head_redis = head_redis.rsplit("/", 1)[0] + ("/0" if connector == "pull" else "/1")  # a clean db each
    overrides = {"workers.heartbeat_interval_s": 1, "workers.lease_s": 30, "disagg.connector": connector,
                 "disagg.prefill_timeout_s": 60, "disagg.push_registration_timeout_s": 60}
    head_settings = make_settings(head_redis, base="disagg.yaml", **overrides, **{"workers.advertise_host": head_ip})
    head = start_deployment(head_settings, tmp_path, roles="decode,frontend", ready_timeout_s=400)
    node_cfg = tmp_path / "node2.yaml"
    dump_settings(make_settings(head_redis, base="disagg.yaml", **overrides, **{"workers.advertise_host": node_ip}),
                  node_cfg)
    node2 = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "launcher", "serve", "-f", str(node_cfg),
         "--roles", "prefill"],
        cwd=ROOT, env=dict(os.environ, VLLM_HOST_IP=node_ip), stdout=(tmp_path / "node2.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        prefill = wait_for(lambda: next((w for w in live_status(head, role="prefill")
                                         if w.metrics_address.startswith(node_ip)), None), 400,
                           "node 2's prefill worker")
        endpoint = kv_registry.lookup(head.redis, engine_id_for(prefill.worker_id, prefill.pid))
        assert endpoint is not None and endpoint.host == node_ip
        # Its /metrics listens on the host it advertises, not on loopback: node 1 (Prometheus) reaches it.
        with urllib.request.urlopen(f"http://{prefill.metrics_address}/metrics", timeout=10) as page:
            assert b"llmq_prefill_" in page.read()

        before = wait_for(lambda: next(iter(live_status(head)), None), 60, "node 1's decode worker")
        served_before = prefill.num_prefills_served

        reference = head.client(timeout=60).completions.create(
            model=MODEL, prompt=[10 + (i * 37) % 1500 for i in range(100)], max_tokens=8,
            extra_body={"ignore_eos": True})
        assert reference.usage.completion_tokens == 8  # short: prefilled locally on node 1

        answer = head.client(timeout=60).completions.create(
            model=MODEL, prompt=[10 + (i * 37) % 1500 for i in range(900)], max_tokens=8,
            extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 8
        # Node 1's decode worker sent the prefill to the queue and node 2's worker computed it; the
        # KV crossed between the hosts over NIXL (pull: node 1 read it after node 2's answer on
        # Redis pub/sub; push: node 2 wrote it into the blocks node 1 registered after node 2's
        # claim): a remote prefill, not a fallback, with nothing shared but REDIS_URL.
        wait_for(lambda: next(w for w in live_status(head, role="prefill") if w.worker_id == prefill.worker_id)
                 .num_prefills_served > served_before, 30, "node 2's prefill count")
        after = wait_for(lambda: next((w for w in live_status(head)
                                       if w.num_remote_prefills > before.num_remote_prefills), None), 30,
                         "node 1's decode worker to count the remote prefill")
        assert after.num_local_fallbacks == before.num_local_fallbacks
        # The side that moves the KV counts it: node 1's decode worker reads it, node 2's prefill
        # worker writes it.
        mover = before if connector == "pull" else prefill
        moved_before = mover.kv_transfer_bytes
        wait_for(lambda: next(w for w in live_status(head, role=None) if w.worker_id == mover.worker_id)
                 .kv_transfer_bytes > moved_before, 30, f"{mover.worker_id}'s transfer statistics to show the KV")
    finally:
        if node2.poll() is None:
            os.killpg(node2.pid, signal.SIGINT)
            try:
                node2.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node2.pid, signal.SIGKILL)
        head.stop()
