"""gunicorn's gthread worker with a lane of its own for /health and /metrics, and the errors
gunicorn answers itself in OpenAI's shape.

A request line or header over gunicorn's limits (``limit_request_line``,
``limit_request_field_size``, ``limit_request_fields``), or one it cannot parse, never reaches
the app: gunicorn's worker writes an HTML page for it. This worker writes the same status as
{"error": {"message", "type", "param", "code"}} instead, like every other error of the API.

A gthread worker accepts connections in its main loop and queues each one, unread, on one FIFO
thread pool. In a burst of hundreds of connections, a /health probe then waits behind every
connection accepted before it (or, once the worker stops accepting, in the kernel's listen
backlog behind them). Admission control (app/admission.py) makes each of those quick, a 429, but
hundreds of quick answers on two busy cores still take seconds.

This worker peeks at a new connection's first bytes (MSG_PEEK: nothing is consumed, the request
is parsed as usual later) and hands ``GET /health`` and ``GET /metrics`` to a small pool of their
own, so they never queue behind generation requests or refusals. A connection whose first bytes
have not arrived yet waits for them in the main loop's selector, not in a thread, for up to
FIRST_BYTES_WAIT_S, and then takes the ordinary lane, where gunicorn's own handling of slow
clients applies.

A process whose generation slots are all taken (app/admission.py) leaves new connections to its
siblings for ACCEPT_DEFER_S before it takes them itself. Every process's selector is woken by a
new connection, and the kernel wakes them in the same order each time, so one process would
otherwise win most accepts, refuse with 429 past its own limit while its siblings sit idle, and
leave them idle. After the pause it takes whatever its siblings left, until the backlog is empty:
when every process is full, refusals and probes still leave the backlog within ACCEPT_DEFER_S.

A generation request that arrives while this process already knows it is over a limit (all its
generation slots taken, or the deployment refused a request in the last moments:
``Admission.refusing``) is answered with its 429 on the main loop as it is accepted, from the
bytes already in the socket, without a thread or a WSGI call: in a burst, the refusals then do
not queue behind the threads of the admitted requests. Anything else, or a request not yet
whole, takes the ordinary lane, where the WSGI middleware decides.

A connection is closed at once when the client left no unread bytes (``Conn.close``), instead of
gunicorn's lingering close on the main loop.

Kept-alive connections (``frontend.keepalive_s``) wait for their next request in the main loop's
selector; that request takes its lane by its first bytes too, so a monitor that reuses its
connection (Prometheus does) still gets the probe lane. Idle ones are closed, oldest first, when
the process reaches its connection limit, where gthread would stop accepting.

With the gate on (``frontend.gate``, app/gate.py), no process accepts: the gate owns the public
socket, refuses past the limits itself, and passes every other connection's descriptor to one
process over a Unix socket this worker opens to it at start. The worker registers that socket in
gthread's selector next to its (private, idle) listener, turns each descriptor it receives into a
connection, and serves it as if it had accepted it, the checks above included (the second line).
It tells the gate when a counted connection's first request is finished, and what admission
control learns that the gate cannot see (a deployment-wide refusal, a place given back, the
number of live decode workers); it says goodbye as it stops, and serves what the gate sent
before the acknowledgement.

It relies on gthread's internals (``enqueue_req``, ``method_queue``, ``finish_request``), so the
gunicorn version is pinned in requirements.txt; tests/test_admission.py exercises this lane.
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from gunicorn import util
from gunicorn.http import errors
from gunicorn.workers.gthread import TConn, ThreadWorker

from app.admission import accepted_at, count_refusal, generation_request, refusal_bytes

# Request lines that take the probe lane. Bytes, compared with the connection's first bytes.
PROBE_PREFIXES = (b"GET /health ", b"GET /health?", b"GET /metrics")
PEEK_BYTES = max(len(p) for p in PROBE_PREFIXES)
# Threads of the probe lane, per process: /health does a Redis ping and a lease scan, /metrics
# reads the processes' metric files; neither waits on generation.
PROBE_THREADS = 4
# How long a new connection may take to send the first bytes of its request line before it
# takes the ordinary lane anyway.
FIRST_BYTES_WAIT_S = 1.0
# How long a process with no generation slot free leaves a new connection to its siblings.
ACCEPT_DEFER_S = 0.05
# The gate's Unix socket (app/gate.py), set in the environment by app/gunicorn_conf.py when the
# gate is on.
GATE_SOCKET_ENV = "LLMQ_GATE_SOCKET"
# How long a stopping process waits for the gate to acknowledge its goodbye.
GATE_BYE_WAIT_S = 2.0
# A generation request refused at accept must have arrived whole within this many bytes (a
# request line, headers and a small JSON body); a bigger or slower one is refused by the WSGI
# middleware instead.
REFUSE_AT_ACCEPT_BYTES = 16384


def lane_of(first_bytes: bytes | None) -> str | None:
    """'probe' or 'ordinary' for a connection's first bytes; None while too few have arrived to
    tell (``None``: nothing yet). An empty read (the client closed) is ordinary."""
    if first_bytes is None:
        return None
    if any(first_bytes.startswith(p) for p in PROBE_PREFIXES):
        return "probe"
    if first_bytes and len(first_bytes) < PEEK_BYTES and any(p.startswith(first_bytes) for p in PROBE_PREFIXES):
        return None  # a prefix of a probe's request line: wait for more
    return "ordinary"


def _peek(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""  # the ordinary lane reports or ignores the error as gunicorn does


def _unread(sock: socket.socket) -> bool:
    """Whether the client sent bytes that nobody read (so a plain close would reset the connection)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return False


def _recv_fd(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """One message and the descriptor it carries, if any (socket.recv_fds ignores its flags
    before Python 3.13)."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(16, socket.CMSG_LEN(fds.itemsize), flags)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


class Conn(TConn):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.accepted_at = time.monotonic()
        # Called once when the first request is finished, for a connection the gate counted.
        self.on_first_done: Callable[[], None] | None = None

    def first_done(self) -> None:
        done, self.on_first_done = self.on_first_done, None
        if done is not None:
            done()

    def close(self, graceful: bool = False) -> None:
        self.first_done()
        # gunicorn's graceful close (util.close_graceful) half-closes, then reads until the client
        # closes too, for up to 2 s, so that unread request bytes cannot turn the close into a
        # reset that truncates the answer. It runs on the main loop, which then waits on each
        # client in turn: in a burst, one client's round trip per connection, with the GIL to win
        # back after each read. Without unread bytes a plain close sends the answer, then FIN.
        if graceful and not _unread(self.sock):
            graceful = False
        super().close(graceful)


def _readable(listener) -> bool:
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    return bool(poller.poll(0))


# (exception types, status, reason); the first match wins. Errors in the app's own response
# headers, gunicorn's configuration or TLS stay gunicorn's (they are not the client's).
_CLIENT_ERRORS: list[tuple[tuple[type[Exception], ...], int, str]] = [
    ((errors.InvalidResponseHeader, errors.InvalidResponseHeaderName), 0, ""),
    ((errors.LimitRequestHeaders,), 431, "Request Header Fields Too Large"),
    ((errors.LimitRequestLine,), 414, "URI Too Long"),
    ((errors.InvalidRequestLine, errors.InvalidRequestMethod, errors.InvalidHTTPVersion, errors.InvalidHeader,
      errors.InvalidHeaderName, errors.ObsoleteFolding, errors.InvalidChunkSize, errors.ChunkMissingTerminator,
      errors.InvalidChunkExtension, errors.InvalidSchemeHeaders, errors.InvalidProxyLine), 400, "Bad Request"),
]


def client_error(exc: BaseException) -> tuple[int, str] | None:
    """The status and reason for an error of the client's request, or None for any other."""
    for types, status, reason in _CLIENT_ERRORS:
        if isinstance(exc, types):
            return (status, reason) if status else None
    return None


def error_bytes(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class FrontendWorker(ThreadWorker):
    _defer_until = 0.0
    _draining = False  # the pause is over: take what the siblings left, until nothing is left

    # gthread's main loop accepts while nr_conns < worker_connections: 0 during a pause stops it.
    @property
    def worker_connections(self) -> int:
        return 0 if time.monotonic() < self._defer_until else self._worker_connections

    @worker_connections.setter
    def worker_connections(self, value: int) -> None:
        self._worker_connections = value

    def init_process(self) -> None:
        # The base class's init_process runs the worker's main loop and never returns.
        self.probe_pool = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="probe")
        self.awaiting_first_bytes: dict = {}  # connection -> monotonic deadline
        self.gate: socket.socket | None = None
        if os.environ.get(GATE_SOCKET_ENV):
            self.gate = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.gate.connect(os.environ[GATE_SOCKET_ENV])
            self.log.info("taking connections from the gate at %s", os.environ[GATE_SOCKET_ENV])
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        admission = getattr(self.wsgi, "extensions", {}).get("llmq.admission")
        if self.gate is not None and admission is not None:
            admission.on_full = lambda refused: self._tell_gate(b"f" + refused.message.encode())
            admission.on_place_given_back = lambda: self._tell_gate(b"p")
            admission.on_decode_workers = lambda n: self._tell_gate(b"w%d" % n)

    # -- the gate --------------------------------------------------------------------------------

    def _tell_gate(self, msg: bytes) -> None:
        # From the main loop and from request threads: each send is one whole message.
        gate = self.gate
        if gate is None:
            return
        try:
            gate.send(msg)
        except OSError as e:
            self.log.warning("could not tell the gate %r: %s", msg[:1], e)

    def set_accept_enabled(self, enabled: bool) -> None:
        # The gate's socket is taken from exactly when the listeners would be accepted from.
        if enabled != self._accepting and self.gate is not None:
            if enabled:
                self.poller.register(self.gate, selectors.EVENT_READ, self._from_gate)
            else:
                self.poller.unregister(self.gate)
        if not enabled and not self.alive and self.gate is not None:
            self._leave_gate()
        super().set_accept_enabled(enabled)

    def _from_gate(self, _sock=None, wait_s: float = 0.0) -> bool:
        """Takes the connections the gate sent; True once the gate acknowledged a goodbye (or is gone)."""
        gate = self.gate
        assert gate is not None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if wait_s:
                    gate.settimeout(max(0.01, deadline - time.monotonic()))
                msg, fds = _recv_fd(gate, 0 if wait_s else socket.MSG_DONTWAIT)
            except (BlockingIOError, TimeoutError):
                return False
            except OSError as e:
                self.log.error("lost the gate: %s", e)
                msg, fds = b"", []
            if not msg:
                if wait_s == 0:
                    # Nothing comes to this process any more: it stops, and gunicorn's master,
                    # whose gate is gone, does not start another for long.
                    self.log.error("the gate closed its socket; stopping")
                    self.poller.unregister(gate)
                    gate.close()
                    self.gate = None
                    self.alive = False
                return True
            if msg == b"a":
                return True
            for fd in fds:
                self._adopt(fd, counted=msg == b"g")
            if wait_s and time.monotonic() > deadline:
                return False

    def _adopt(self, fd: int, counted: bool) -> None:
        sock = socket.socket(fileno=fd)
        try:
            addr = sock.getpeername()
            server = sock.getsockname()
        except OSError:  # the client is gone already
            sock.close()
            if counted:
                self._tell_gate(b"d")
            return
        self.nr_conns += 1
        sock.setblocking(True)
        conn = Conn(self.cfg, sock, addr, server)
        if counted:
            conn.on_first_done = partial(self._tell_gate, b"d")
        self.enqueue_req(conn)
        self._make_room()

    def _leave_gate(self) -> None:
        # The gate hands nothing more after it reads the goodbye; what it sent before is served here.
        self._tell_gate(b"b")
        if not self._from_gate(wait_s=GATE_BYE_WAIT_S):
            self.log.warning("the gate did not acknowledge the goodbye within %.0fs", GATE_BYE_WAIT_S)
        assert self.gate is not None
        self.gate.close()
        self.gate = None

    def _generation_full(self) -> bool:
        admission = getattr(self.wsgi, "extensions", {}).get("llmq.admission")
        return admission is not None and admission.process.taken >= admission.process.limit

    def accept(self, listener) -> None:
        if not self._generation_full():
            self._draining = False
        elif not self._draining:
            self._defer_until = time.monotonic() + ACCEPT_DEFER_S
            self._draining = True
            threading.Timer(ACCEPT_DEFER_S, self.method_queue.defer, args=(self._pause_over,)).start()
            return
        self._accept_one(listener)
        if self._draining and not _readable(listener):
            self._draining = False

    def _accept_one(self, listener) -> None:
        # gthread's accept, with our Conn.
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        client_sock.setblocking(True)
        self.enqueue_req(Conn(self.cfg, client_sock, client_addr, listener.getsockname()))
        self._make_room()

    def finish_request(self, conn, fs) -> None:
        first_done = getattr(conn, "first_done", None)
        if first_done is not None:
            first_done()
        super().finish_request(conn, fs)
        self._make_room()

    def _make_room(self) -> None:
        """Closes idle kept-alive connections, oldest first, while this process is at its
        connection limit: gthread stops accepting there, and a new connection (a probe, or a
        client that would be served now) must not wait in the backlog behind idle ones."""
        while self.keepalived_conns and self.nr_conns >= self._worker_connections:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass  # already unregistered
            self.nr_conns -= 1
            conn.close()

    def _pause_over(self) -> None:
        # On the main loop. Nothing left in the backlog: the next connection pauses afresh.
        if not any(_readable(listener) for listener in self.sockets):
            self._draining = False

    def handle(self, conn):
        accepted_at.t = getattr(conn, "accepted_at", None)
        return super().handle(conn)

    def _refuse_at_accept(self, conn) -> bool:
        """On the main loop, for a new connection: answer a generation request with its 429 at once,
        without a thread, when this process already knows it is over a limit (Admission.refusing)
        and the whole request has arrived. In a burst, the refusals then never queue behind the
        admitted requests' threads. Returns whether it answered."""
        admission = getattr(self.wsgi, "extensions", {}).get("llmq.admission")
        if admission is None:
            return False
        refused = admission.refusing()
        if refused is None:
            return False
        try:
            request = generation_request(conn.sock.recv(REFUSE_AT_ACCEPT_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False  # the ordinary lane reports or ignores the error as gunicorn does
        if request is None:
            return False
        path, size = request
        try:
            conn.sock.recv(size, socket.MSG_DONTWAIT)  # consumed, so the close does not reset
            conn.sock.send(refusal_bytes(refused, admission.frontend.retry_after_s), socket.MSG_DONTWAIT)
            count_refusal(refused, path, "accept", conn.accepted_at)
        except OSError:
            pass  # the client is gone
        self.nr_conns -= 1
        conn.close()
        return True

    def enqueue_req(self, conn) -> None:
        if conn.initialized:  # a kept-alive connection coming back with its next request
            if conn.parser is not None and conn.parser.unreader.buf.getvalue():
                # Its next request was read ahead into the parser: not in the socket to peek at.
                return super().enqueue_req(conn)
        elif self._refuse_at_accept(conn):
            return
        lane = lane_of(_peek(conn.sock))
        if lane is None:
            self.awaiting_first_bytes[conn] = time.monotonic() + FIRST_BYTES_WAIT_S
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_first_bytes, conn))
        elif lane == "probe":
            fs = self.probe_pool.submit(self.handle, conn)
            fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))
        else:
            super().enqueue_req(conn)

    def _on_first_bytes(self, conn, _sock) -> None:
        self.poller.unregister(conn.sock)
        deadline = self.awaiting_first_bytes.pop(conn)
        if time.monotonic() < deadline and lane_of(_peek(conn.sock)) is None:
            # Still only part of a probe's request line: wait for the rest.
            self.awaiting_first_bytes[conn] = deadline
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_first_bytes, conn))
            return
        if lane_of(_peek(conn.sock)) is None:  # the deadline passed on part of a request line
            super().enqueue_req(conn)
        else:
            self.enqueue_req(conn)

    def murder_keepalived(self, force: bool = False) -> None:
        # Called on every turn of the main loop, stopping or not: the place to time out the
        # connections still waiting for their first bytes.
        super().murder_keepalived(force)
        now = time.monotonic()
        for conn, deadline in list(self.awaiting_first_bytes.items()):
            if deadline <= now or force or not self.alive:
                del self.awaiting_first_bytes[conn]
                self.poller.unregister(conn.sock)
                super().enqueue_req(conn)

    def handle_error(self, req, client, addr, exc):
        answer = client_error(exc)
        if answer is None:
            return super().handle_error(req, client, addr, exc)
        status, reason = answer
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        try:
            util.write_nonblock(client, error_bytes(status, reason, f"{reason}: {exc}"))
        except Exception:  # noqa: BLE001  the client may be gone; gunicorn's own writer does the same
            self.log.debug("Failed to send error message.")
        return None
