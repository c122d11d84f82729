"""The gate (app/gate.py) on real sockets, in this process: what it refuses itself, what it hands to
a worker process's channel, and the worker's messages that move its limits. The deployed gate, in
front of gunicorn, is exercised by tests/test_admission.py's burst."""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from app.gate import Gate, request_kind
from conftest import ROOT, wait_for


def test_request_kind_is_read_from_the_request_line():
    assert request_kind(b"POST /v1/completions HTTP/1.1\r\n") == "generation"
    assert request_kind(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n") == "generation"
    assert request_kind(b"POST /v1/responses HTTP/1.1\r\nHost: h\r\n") == "generation"
    assert request_kind(b"GET /v1/completions HTTP/1.1\r\n") == "other"
    assert request_kind(b"GET /health HTTP/1.1\r\n") == "other"
    assert request_kind(b"POST /tokenize HTTP/1.1\r\n") == "other"
    assert request_kind(b"POST /v1/compl") is None  # wait for the rest of the line
    assert request_kind(b"x" * 20000) == "other"  # no request line within the head's bound


def _post(body: bytes = b'{"model": "m", "prompt": "hi"}') -> bytes:
    return b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Running:
    def __init__(self, gate: Gate, port: int, channel_path: str):
        self.gate = gate
        self.port = port
        self.channel_path = channel_path

    def worker(self) -> socket.socket:
        """A worker process's end of the channel, registered with the gate."""
        before = len(self.gate.workers)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.channel_path)
        sock.settimeout(5)
        wait_for(lambda: len(self.gate.workers) > before, timeout_s=5, what="the gate to take the worker",
                 interval_s=0.01)
        return sock

    def send(self, request: bytes) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        client.sendall(request)
        return client


@pytest.fixture
def running(tmp_path) -> Iterator[Running]:
    listener = socket.create_server(("127.0.0.1", 0))
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = str(tmp_path / "gate.sock")
    channel.bind(path)
    channel.listen(8)
    port = listener.getsockname()[1]
    gate = Gate(listener, channel, process_limit=1, per_decode_worker=3, retry_after_s=2)
    thread = threading.Thread(target=gate.serve, daemon=True)
    thread.start()
    yield Running(gate, port, path)
    gate.stopping = True
    thread.join(timeout=5)
    assert not thread.is_alive()


def _handed(worker: socket.socket) -> tuple[bytes, socket.socket]:
    msg, fds, _flags, _addr = socket.recv_fds(worker, 16, 1)
    assert len(fds) == 1
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(5)
    return msg, conn


def _answer(client: socket.socket) -> tuple[str, dict[str, str], dict]:
    raw = b""
    while chunk := client.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, json.loads(body)


def test_a_connection_is_handed_over_unread_and_a_generation_request_past_the_limit_is_refused(running):
    worker = running.worker()
    first = running.send(_post())
    msg, conn = _handed(worker)
    assert msg == b"g"
    assert conn.recv(65536) == _post()  # the gate only peeked
    # Small writes go out at once (a stream's chunks), as on gunicorn's own listener.
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    # The worker's one generation place is taken: the next generation request gets the gate's 429.
    refused = running.send(_post())
    status, headers, body = _answer(refused)
    assert status == "HTTP/1.1 429 Too Many Requests"
    assert headers["retry-after"] == "2"
    assert body["error"]["type"] == "rate_limit_exceeded" and "frontend.threads" in body["error"]["message"]
    wait_for(lambda: running.gate.refused == 1, timeout_s=5, what="the refusal counted", interval_s=0.01)

    # Anything else still goes through.
    health = running.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    msg, probe = _handed(worker)
    assert msg == b"o" and probe.recv(100).startswith(b"GET /health ")

    # The first request finished: the place is free again.
    worker.send(b"d")
    wait_for(lambda: running.gate.refusal() is None, timeout_s=5, what="the place to be free", interval_s=0.01)
    again = running.send(_post())
    assert _handed(worker)[0] == b"g"
    for sock in (first, conn, health, probe, again, worker):
        sock.close()


def test_the_least_loaded_worker_takes_the_next_generation_request(running):
    a, b = running.worker(), running.worker()
    clients = [running.send(_post()) for _ in range(2)]
    # Each has a limit of 1, so the two went to different workers.
    got = [_handed(a), _handed(b)]
    assert [msg for msg, _ in got] == [b"g", b"g"]
    wait_for(lambda: {w.generation for w in running.gate.workers.values()} == {1}, timeout_s=5,
             what="both counted", interval_s=0.01)
    for sock in [a, b, *clients, *(conn for _, conn in got)]:
        sock.close()


def test_the_workers_reports_move_the_deployment_limit(running):
    gate = running.gate
    gate.process_limit = 10
    gate.full_memory_s = 60.0  # long enough for the test to see it on a loaded machine
    worker, other = running.worker(), running.worker()
    worker.send(b"w1")  # one live decode worker: 3 places in the deployment
    wait_for(lambda: gate.decode_workers == 1, timeout_s=5, what="the report", interval_s=0.01)
    clients = [running.send(_post()) for _ in range(3)]
    conns: list[socket.socket] = []
    deadline = time.monotonic() + 5
    while len(conns) < 3 and time.monotonic() < deadline:
        for sock in select.select([worker, other], [], [], 0.5)[0]:
            conns.append(_handed(sock)[1])
    assert len(conns) == 3
    refused = running.send(_post())
    assert _answer(refused)[2]["error"]["message"].startswith("the deployment has 3 requests queued or running")

    # Another frontend filled it: a worker's refusal stands at the gate until a place is given back.
    other.send(b"fthe deployment is full")
    wait_for(lambda: gate.full is not None, timeout_s=5, what="the refusal", interval_s=0.01)
    assert _answer(running.send(_post()))[2]["error"]["message"] == "the deployment is full"
    other.send(b"p")
    wait_for(lambda: gate.full_until == 0.0, timeout_s=5, what="the place given back", interval_s=0.01)

    # A worker that says goodbye gets its acknowledgement, and nothing more.
    other.send(b"b")
    assert other.recv(16) == b"a"
    wait_for(lambda: len(gate.workers) == 1, timeout_s=5, what="the worker to leave", interval_s=0.01)
    for sock in [worker, other, *clients, *conns, refused]:
        sock.close()


def test_a_whole_request_is_needed_to_refuse_and_the_gate_waits_for_it(running):
    worker = running.worker()
    held = running.send(_post())
    _msg, conn = _handed(worker)
    whole = _post()
    client = running.send(whole[:30])  # the request line only
    client.sendall(whole[30:])
    status, headers, _body = _answer(client)
    assert status.startswith("HTTP/1.1 429") and headers["connection"] == "close"
    for sock in (held, conn, client, worker):
        sock.close()


def test_the_gate_starts_and_serves_without_the_privilege_its_niceness_needs(tmp_path):
    # Root is made an unprivileged user here: CAP_SYS_NICE dropped, RLIMIT_NICE at 0. Any other
    # user lacks both already.
    prefix = ["prlimit", "--nice=0:0", "--"] if shutil.which("prlimit") else []
    if os.geteuid() == 0:
        if not prefix or not shutil.which("setpriv"):
            pytest.skip("needs setpriv and prlimit to run the gate as root without CAP_SYS_NICE")
        prefix += ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--"]
    listener = socket.create_server(("127.0.0.1", 0))
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = str(tmp_path / "gate.sock")
    channel.bind(path)
    channel.listen(8)
    env = {**os.environ, "LLMQ__FRONTEND__GATE_NICE": "-10"}
    gate = subprocess.Popen([*prefix, sys.executable, "-m", "app.gate", "--listen-fd", str(listener.fileno()),
                             "--channel-fd", str(channel.fileno())], pass_fds=(listener.fileno(), channel.fileno()),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    port = listener.getsockname()[1]
    listener.close()
    channel.close()
    lines: list[str] = []
    # Read on a thread: select() on the pipe misses lines already in the reader's buffer.
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [out.put(line.decode()) for line in gate.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("gate: listening" in line for line in lines) and time.monotonic() < deadline:
            try:
                lines.append(out.get(timeout=1))
            except queue.Empty:
                assert gate.poll() is None, "the gate exited:\n" + "".join(lines)
        assert any("could not take niceness -10" in line and "CAP_SYS_NICE" in line for line in lines), lines
        worker = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker.connect(path)
        worker.settimeout(10)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
        msg, conn = _handed(worker)
        assert msg == b"o" and conn.recv(100).startswith(b"GET /health ")
        for sock in (worker, client, conn):
            sock.close()
    finally:
        gate.terminate()
        gate.wait(timeout=10)
