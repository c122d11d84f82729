"""Whether the client of the request being served has hung up.

A streaming response learns it when a write fails; a non-streaming one writes nothing until the
answer is whole, so the engine would compute an answer for nobody. While it waits, the gateway
asks here once a poll interval: the client's socket turns readable at its end of file, and a
peek (which consumes nothing) tells an EOF from bytes the client sent after its request.
"""

from __future__ import annotations

import select
import socket
import ssl


def client_gone(environ: dict) -> bool:
    """True once the client closed its connection. False when unsure: gunicorn's socket is not
    in the environ (another server), or it is TLS, whose records cannot be peeked at."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        # Reset by the peer, or already closed: nobody is there to answer.
        return True
