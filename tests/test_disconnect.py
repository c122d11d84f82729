"""app/disconnect.py on real sockets: an open connection, one with bytes waiting, a closed one."""

from __future__ import annotations

import socket

import pytest

from app.disconnect import client_gone


def _pair():
    server, client = socket.socketpair()
    return {"gunicorn.socket": server}, server, client


def test_an_open_quiet_connection_is_not_gone():
    environ, server, client = _pair()
    with server, client:
        assert not client_gone(environ)


def test_bytes_sent_after_the_request_are_not_a_hang_up_and_stay_unread():
    environ, server, client = _pair()
    with server, client:
        client.sendall(b"GET")
        assert not client_gone(environ)
        assert server.recv(3) == b"GET"  # peeked, not consumed


def test_a_closed_connection_is_gone():
    environ, server, client = _pair()
    with server:
        client.close()
        assert client_gone(environ)


def test_no_gunicorn_socket_means_not_known_to_be_gone():
    assert not client_gone({})


# -- against a deployment: the engine stops work for a client that left -----------------------


def _outcomes(dep) -> dict[str, float]:
    """The decode worker's requests by outcome: "cancelled" counts those aborted because their
    client went away."""
    import re
    import urllib.request

    from conftest import live_status

    address = live_status(dep)[0].metrics_address
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'^llmq_decode_requests_total\{outcome="(\w+)"\} (\S+)', text, re.M)}


@pytest.mark.integration
def test_a_non_streaming_client_that_hangs_up_is_aborted_in_the_engine(deployment):
    import http.client
    import json
    import time

    from conftest import live_status, wait_for

    before = _outcomes(deployment)
    conn = http.client.HTTPConnection("127.0.0.1", deployment.settings.frontend.port, timeout=30)
    body = {"model": "tiny-llama", "prompt": "Go on and on.", "max_tokens": 1800, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    wait_for(lambda: any(w.num_running for w in live_status(deployment)), 30, "the request to run", 0.05)
    conn.close()  # hang up without reading the answer
    hung_up = time.monotonic()
    after = wait_for(lambda: (o := _outcomes(deployment)).get("cancelled", 0) > before.get("cancelled", 0) and o,
                     30, "the worker to abort the request", 0.1)
    assert after.get("finished", 0) == before.get("finished", 0), "the engine computed the answer anyway"
    wait_for(lambda: not any(w.num_running for w in live_status(deployment)), 10, "the engine to be idle")
    print(f"aborted {time.monotonic() - hung_up:.2f}s after the client hung up")
    assert "client closed the connection; cancelling" in deployment.log()
