"""The stream reader writing a stream's chunks to its client's socket (app/sink.py), against a real
Redis, the real StreamReader and Gateway.events, and real TCP sockets; no engine, no gunicorn.
Each request thread here does what app/routes.py's ``_stream`` does around its sink."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from app.errors import APIError, UpstreamTimeout
from app.gateway import Driving, Gateway, Pause, SubRequest
from app.sink import Sink, frame
from conftest import make_settings, wait_for
from tasks.messages import Delta, Failed, Finished
from workers.outputs import OutputWriter

READER_THREAD = "stream-reader"  # app/streams.py names it so
TERMINATOR = b"0\r\n\r\n"


@pytest.fixture(scope="module")
def redis_url(scratch_redis_url) -> str:
    return scratch_redis_url


def _gateway(redis_url: str, **overrides: str) -> Gateway:
    return Gateway(make_settings(redis_url, **overrides), celery=None, client=redis.Redis.from_url(redis_url))


def _tcp_pair(server_sndbuf: int = 0, client_rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    if server_sndbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


class Request:
    """One streaming request's thread: the first chunk written by itself (gunicorn's first write,
    with the headers), then a sink, then whatever the sink hands back, then the last chunk."""

    def __init__(self, gateway: Gateway, sock: socket.socket):
        self.id = uuid.uuid4().hex
        self.sock = sock
        self.driving = Driving()
        self.encoded_on: list[str] = []  # the thread that encoded each chunk
        self.error: BaseException | None = None
        events = gateway.events([SubRequest(self.id, [1], choice_offset=0)], driving=self.driving)
        self.thread = threading.Thread(target=self._run, args=(events,), name=f"request-{self.id[:6]}")
        self.thread.start()

    def _encode(self, body: dict) -> bytes:
        self.encoded_on.append(threading.current_thread().name)
        return json.dumps(body).encode()

    def _run(self, events: Iterator) -> None:
        def chunks() -> Iterator[dict | Pause]:
            for item in events:
                yield item if isinstance(item, Pause) else {"text": item[1].text}

        it = chunks()
        try:
            for chunk in it:
                if isinstance(chunk, Pause):
                    continue
                self.sock.sendall(frame(self._encode(chunk)))
                if len(self.encoded_on) == 1:
                    sink = Sink.start({"gunicorn.socket": self.sock, "SERVER_PROTOCOL": "HTTP/1.1"}, it,
                                      self._encode, self.driving)
                    assert sink is not None
                    try:
                        sink.park()
                    finally:
                        sink.close()
            self.sock.sendall(TERMINATOR)
        except BaseException as e:  # noqa: BLE001  the test reads it
            self.error = e
            self.sock.sendall(TERMINATOR)

    def join(self, timeout_s: float = 30) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive()


def _write(client: redis.Redis, request_id: str, events) -> None:
    OutputWriter(client, request_id, ttl_s=60).write(events)


def _delta(text: str) -> Delta:
    return Delta(index=0, text=text, token_ids=[1])


def _read_texts(sock: socket.socket, timeout_s: float = 30) -> list[str]:
    """The chunked body's chunks' texts, up to its terminator; checks the framing as it goes."""
    sock.settimeout(timeout_s)
    data = b""
    while not data.endswith(TERMINATOR):
        got = sock.recv(1 << 16)
        assert got, "the connection closed before the last chunk"
        data += got
    texts, at = [], 0
    while True:
        size_end = data.index(b"\r\n", at)
        size = int(data[at:size_end], 16)
        if size == 0:
            assert data[size_end:] == b"\r\n\r\n"
            return texts
        body = data[size_end + 2:size_end + 2 + size]
        assert data[size_end + 2 + size:size_end + 4 + size] == b"\r\n"
        texts.append(json.loads(body)["text"])
        at = size_end + 4 + size


def _taken_over(gateway, client, first: str):
    """A streaming request whose first chunk (``first``) is out and whose sink has taken over."""
    server, peer = _tcp_pair()
    req = Request(gateway, server)
    _write(client, req.id, [_delta(first)])
    wait_for(lambda: req.driving.by_reader, 10, "the sink to take over")
    return req, peer


def test_the_reader_writes_every_chunk_after_the_first_in_order(redis_url):
    gateway, client = _gateway(redis_url), redis.Redis.from_url(redis_url)
    req, peer = _taken_over(gateway, client, "t0")
    texts = [f"t{i}" for i in range(1, 41)]
    for text in texts:  # one XADD each: the reader takes one step per entry it delivers
        _write(client, req.id, [_delta(text)])
    _write(client, req.id, [Finished(num_prompt_tokens=1)])
    assert _read_texts(peer) == ["t0", *texts]
    req.join()
    assert req.error is None
    # The first chunk is the request thread's; every other one was encoded and sent by the reader.
    assert req.encoded_on[0] == req.thread.name
    assert req.encoded_on[1:] == [READER_THREAD] * len(texts)


def test_a_client_that_does_not_read_is_handed_back_and_stalls_no_other_stream(redis_url):
    gateway, client = _gateway(redis_url), redis.Redis.from_url(redis_url)
    slow_server, slow_peer = _tcp_pair(server_sndbuf=4096, client_rcvbuf=4096)
    fast_server, fast_peer = _tcp_pair()
    slow, fast = Request(gateway, slow_server), Request(gateway, fast_server)
    for req in (slow, fast):
        _write(client, req.id, [_delta("first")])
    wait_for(lambda: slow.driving.by_reader and fast.driving.by_reader, 10, "both sinks to take over")
    # Far more than the slow client's buffers hold, written to both streams alike.
    texts = [f"{i}:" + "x" * 2000 for i in range(200)]
    for text in texts:
        _write(client, slow.id, [_delta(text)])
        _write(client, fast.id, [_delta(text)])
    for req in (slow, fast):
        _write(client, req.id, [Finished(num_prompt_tokens=1)])
    # The fast client gets all of its stream while nobody reads the slow one.
    assert _read_texts(fast_peer) == ["first", *texts]
    fast.join()
    assert fast.error is None and set(fast.encoded_on[1:]) == {READER_THREAD}
    # The slow one was handed back to its thread, which writes the rest as it is read: all of it,
    # once each, in order.
    assert _read_texts(slow_peer) == ["first", *texts]
    slow.join()
    assert slow.error is None
    assert slow.encoded_on[-1] == slow.thread.name and READER_THREAD in slow.encoded_on


def test_a_failure_mid_stream_reaches_the_request_thread_after_the_chunks_before_it(redis_url):
    gateway, client = _gateway(redis_url), redis.Redis.from_url(redis_url)
    req, peer = _taken_over(gateway, client, "a")
    _write(client, req.id, [_delta("b"), _delta("c"), Failed(status=503, type="server_error", message="engine died")])
    assert _read_texts(peer) == ["a", "b", "c"]
    req.join()
    assert isinstance(req.error, APIError) and req.error.status == 503 and "engine died" in req.error.message


def test_the_request_thread_runs_the_periodic_checks_while_the_reader_writes(redis_url):
    # Its deadline passes while the sink has the stream: the check that raises it is the thread's.
    gateway, client = _gateway(redis_url, **{"frontend.request_timeout_s": "1"}), redis.Redis.from_url(redis_url)
    req, peer = _taken_over(gateway, client, "a")
    _write(client, req.id, [_delta("b")])
    assert _read_texts(peer) == ["a", "b"]
    req.join()
    assert isinstance(req.error, UpstreamTimeout)
