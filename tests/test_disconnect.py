"""app/disconnect.py on real sockets: an open connection, one with bytes waiting, a closed one."""

from __future__ import annotations

import socket

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
