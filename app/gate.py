"""The gate (``frontend.gate``): one process that owns the frontend's public socket, answers the
generation requests past the limits with their 429 itself, and hands every other connection to a
gunicorn worker process.

Why a process of its own: a gunicorn process accepts on its main loop, which shares the GIL with
the threads of the requests it admitted; in a burst, each accept waits for the GIL behind their
JSON, tokenizing and publishing, and the refusals wait in the kernel's listen backlog for it
(docs/benchmarks.md, "Admission control"). The gate shares its GIL with nobody: a single-threaded
epoll loop with no HTTP library, which peeks at a connection's first bytes (MSG_PEEK: nothing is
consumed) and then either

- writes a pre-built 429 in OpenAI's shape, with Retry-After, to a generation request (a POST to
  ``admission.GENERATION_PATHS``) that would be refused: every worker process has its
  ``threads - reserved_threads`` generation requests, or the generation requests it handed out
  reach the deployment's limit (``max_requests_per_decode_worker`` x live decode workers, the
  count of which a worker reports), or a worker was refused by the deployment-wide check in
  Redis within ``admission.FULL_MEMORY_S`` (another frontend's requests fill it) and no place was
  given back since; or
- passes the connection's file descriptor (SCM_RIGHTS) to the worker process with the fewest
  generation requests, over a Unix socket each worker opens to the gate. The worker serves it as
  if it had accepted it (app/gunicorn_worker.py), with its own admission check as a second line:
  a kept-alive connection's later requests, and limits the gate cannot see, are its business.

/health, /metrics and anything else always go through. A generation connection counts against
its worker from its hand-over until the worker reports its first request finished.

The channel, one SOCK_SEQPACKET connection per worker process, one message per event:

- gate to worker: ``g`` + a descriptor (a generation request, counted), ``o`` + a descriptor
  (anything else), ``a`` (acknowledges the worker's ``b``: nothing follows);
- worker to gate: ``d`` (a counted connection's first request is finished), ``f`` + message (the
  deployment-wide check refused), ``p`` (a place was given back), ``w`` + number (live decode
  workers), ``b`` (the worker stops: hand it nothing more).

gunicorn's master starts the gate (app/gunicorn_conf.py) with the bound public socket and the
channel's listening socket, in a session of its own at ``frontend.gate_nice``, and stops it on
exit; the gate also exits when its parent is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

import placement
from app import metrics
from app.admission import FULL_MEMORY_S, GENERATION_PATHS, Refused, refusal_bytes, request_size
from config import load_settings

logger = logging.getLogger("llmq.gate")

# A generation request the gate refuses must be whole within this many bytes (a request line,
# headers and a small JSON body); a bigger one, or a chunked one, goes to a worker, which refuses it.
HEAD_BYTES = 16384
# How long a connection may take to send its request line (or, refused, its whole request)
# before it goes to a worker anyway, where gunicorn's handling of slow clients applies.
FIRST_BYTES_WAIT_S = 1.0
# Connections accepted per turn of the loop, so the workers' messages are read between them.
ACCEPTS_PER_TURN = 64
# The loop's longest sleep: how soon it sees a lapsed wait, or that its parent is gone.
TICK_S = 0.1


@dataclass
class Worker:
    sock: socket.socket
    pid: int
    generation: int = 0  # counted connections handed over whose first request is not finished


@dataclass
class Pending:
    sock: socket.socket
    accepted_at: float
    deadline: float


def request_kind(data: bytes) -> str | None:
    """'generation' or 'other' for a connection's first bytes; None while its request line is
    still incomplete."""
    line_end = data.find(b"\r\n")
    if line_end < 0:
        return None if len(data) < HEAD_BYTES else "other"
    method, _, rest = data[:line_end].partition(b" ")
    path = rest.partition(b" ")[0].partition(b"?")[0]
    return "generation" if method == b"POST" and path.decode("latin-1") in GENERATION_PATHS else "other"


class Gate:
    def __init__(self, listener: socket.socket, channel: socket.socket, process_limit: int, per_decode_worker: int,
                 retry_after_s: int):
        self.listener = listener
        self.channel = channel
        self.process_limit = process_limit
        self.per_decode_worker = per_decode_worker
        self.retry_after_s = retry_after_s
        self.full_memory_s = FULL_MEMORY_S
        self.epoll = select.epoll()
        self.workers: dict[int, Worker] = {}  # by channel fd
        self.pending: dict[int, Pending] = {}  # by connection fd
        self.decode_workers = 0  # as last reported; 0: unknown, no deployment bound here
        self.full: Refused | None = None  # the deployment-wide check's last refusal, until full_until
        self.full_until = 0.0
        self.listening = False
        self.stopping = False
        self.ppid = os.getppid()
        self._answers: dict[str, bytes] = {}
        self._turn = 0
        self.refused = 0
        for sock in (listener, channel):
            sock.setblocking(False)
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            # Accepted connections inherit it, as from gunicorn's own listener: without it, Nagle
            # holds a stream's first chunk, written right after its headers, until the client's
            # delayed ACK (40 ms), and every later chunk behind an unacknowledged one.
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.epoll.register(channel.fileno(), select.EPOLLIN)

    # -- the loop ------------------------------------------------------------------------------

    def serve(self) -> None:
        logger.info("gate: listening on %s, handing connections to the workers over %s", _name(self.listener),
                    self.channel.getsockname())
        while not self.stopping and os.getppid() == self.ppid:
            try:
                events = self.epoll.poll(TICK_S)
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self.listener.fileno():
                    self._accept()
                elif fd == self.channel.fileno():
                    self._add_worker()
                elif fd in self.workers:
                    self._from_worker(self.workers[fd])
                elif fd in self.pending:
                    self._on_bytes(fd)
            self._expire()
        logger.info("gate: stopping (%s); %d refused", "asked to" if self.stopping else "parent gone", self.refused)
        self.close()

    def close(self) -> None:
        for fd in list(self.pending):
            self._drop(fd)
        for worker in list(self.workers.values()):
            self._remove_worker(worker)
        self.epoll.close()
        self.listener.close()
        self.channel.close()

    def _set_listening(self) -> None:
        # Connections wait in the kernel's backlog while no worker is there to take them.
        want = bool(self.workers)
        if want != self.listening:
            if want:
                self.epoll.register(self.listener.fileno(), select.EPOLLIN)
            else:
                self.epoll.unregister(self.listener.fileno())
            self.listening = want

    # -- workers -------------------------------------------------------------------------------

    def _add_worker(self) -> None:
        try:
            sock, _ = self.channel.accept()
        except BlockingIOError:
            return
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        sock.setblocking(False)
        self.workers[sock.fileno()] = Worker(sock, pid)
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self._set_listening()
        logger.info("gate: worker %d connected (%d workers)", pid, len(self.workers))

    def _remove_worker(self, worker: Worker) -> None:
        if self.workers.pop(worker.sock.fileno(), None) is None:
            return
        self.epoll.unregister(worker.sock.fileno())
        worker.sock.close()
        self._set_listening()
        logger.info("gate: worker %d left (%d workers)", worker.pid, len(self.workers))

    def _from_worker(self, worker: Worker) -> None:
        while True:
            try:
                msg = worker.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                self._remove_worker(worker)
                return
            kind, rest = msg[:1], msg[1:]
            if kind == b"d":
                worker.generation = max(0, worker.generation - 1)
            elif kind == b"f":
                self.full = Refused("deployment", rest.decode())
                self.full_until = time.monotonic() + self.full_memory_s
            elif kind == b"p":
                self.full_until = 0.0
            elif kind == b"w":
                self.decode_workers = int(rest)
            elif kind == b"b":
                try:
                    worker.sock.send(b"a")
                except OSError:
                    pass
                self._remove_worker(worker)
                return

    # -- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # ECONNABORTED, EMFILE: the next turn tries again
                logger.warning("gate: accept failed: %s", e)
                return
            now = time.monotonic()
            sock.setblocking(False)
            self.pending[sock.fileno()] = Pending(sock, now, now + FIRST_BYTES_WAIT_S)
            # Edge-triggered: peeked bytes stay in the socket, so only new bytes wake it again.
            self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLET)
            self._on_bytes(sock.fileno())  # a client that sent at connect is answered now

    def _on_bytes(self, fd: int) -> None:
        p = self.pending[fd]
        try:
            data = p.sock.recv(HEAD_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client left
            self._drop(fd)
            return
        kind = request_kind(data)
        if kind is None:
            return  # wait for the rest of the request line
        if kind == "other":
            self._hand(fd, counted=False)
            return
        refused = self.refusal()
        if refused is None:
            self._hand(fd, counted=True)
            return
        size = request_size(data)
        if size is None and data.find(b"\r\n\r\n") < 0 and len(data) < HEAD_BYTES:
            return  # wait for the rest of the head
        if size is None or size > HEAD_BYTES:
            self._hand(fd, counted=False)  # chunked, malformed or big: the worker refuses or rejects it
        elif len(data) >= size:
            self._refuse(fd, refused, data)
        elif b"100-continue" in data[:data.find(b"\r\n\r\n")].lower():
            self._hand(fd, counted=False)  # its body waits for an answer: the worker gives it one
        # else: wait for the rest of the body

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, p in list(self.pending.items()):
            if p.deadline <= now:
                self._hand(fd, counted=False)  # slow, or no worker: gunicorn's own handling applies

    def refusal(self) -> Refused | None:
        """The 429 a generation request gets now, or None: hand it over."""
        if self.full is not None and time.monotonic() < self.full_until:
            return self.full
        handed = sum(w.generation for w in self.workers.values())
        limit = self.per_decode_worker * self.decode_workers
        if self.decode_workers and handed >= limit:
            return Refused("deployment", f"the deployment has {handed} requests queued or running, its limit of "
                                         f"{self.per_decode_worker} per live decode worker x {self.decode_workers} "
                                         f"(frontend.max_requests_per_decode_worker); retry shortly")
        if self.workers and all(w.generation >= self.process_limit for w in self.workers.values()):
            return Refused("process", f"every frontend process is serving {self.process_limit} generation requests, "
                                      f"its limit (frontend.threads - frontend.reserved_threads); retry shortly")
        return None

    def _refuse(self, fd: int, refused: Refused, data: bytes) -> None:
        p = self._forget(fd)
        answer = self._answers.get(refused.message)
        if answer is None:
            answer = self._answers[refused.message] = refusal_bytes(refused, self.retry_after_s)
            if len(self._answers) > 64:
                self._answers.clear()
        path = data[:data.find(b"\r\n")].split(b" ")[1].partition(b"?")[0].decode("latin-1")
        try:
            p.sock.recv(request_size(data) or 0)  # consumed, so that the close is a FIN, not a reset
            p.sock.send(answer)
        except OSError:
            pass  # the client is gone
        p.sock.close()
        self.refused += 1
        metrics.REFUSED.labels(refused.reason).inc()
        metrics.REQUESTS.labels(path, "429").inc()
        metrics.REFUSAL_SECONDS.labels("gate").observe(time.monotonic() - p.accepted_at)

    def _hand(self, fd: int, counted: bool) -> None:
        """Passes the connection to the worker with the fewest generation requests (among those
        under their limit, for a counted one); without one, it keeps waiting until its deadline,
        and is then closed."""
        workers = list(self.workers.values())
        self._turn += 1
        start = self._turn % len(workers) if workers else 0
        order = sorted(workers[start:] + workers[:start], key=lambda w: w.generation)
        for worker in order:
            if counted and worker.generation >= self.process_limit:
                continue
            try:
                socket.send_fds(worker.sock, [b"g" if counted else b"o"], [fd])
            except BlockingIOError:
                continue  # its queue is full: try the next
            except OSError:
                self._remove_worker(worker)
                continue
            worker.generation += counted
            self._forget(fd).sock.close()  # the worker holds its own descriptor now
            return
        if counted:
            self._hand(fd, counted=False)  # every worker is full: the worker's own check refuses it
        elif self.pending[fd].deadline <= time.monotonic():
            logger.warning("gate: no worker took a connection; closing it")
            self._drop(fd)

    def _forget(self, fd: int) -> Pending:
        p = self.pending.pop(fd)
        self.epoll.unregister(fd)
        return p

    def _drop(self, fd: int) -> None:
        self._forget(fd).sock.close()


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.gate")
    parser.add_argument("--listen-fd", type=int, required=True, help="the bound, listening public socket")
    parser.add_argument("--channel-fd", type=int, required=True, help="the workers' listening Unix socket")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, stream=sys.stdout,
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
    frontend = settings.frontend
    try:
        logger.info("gate: runs at %s (frontend.gate_nice)", placement.set_niceness(frontend.gate_nice))
    except OSError as e:
        logger.warning("gate: could not take niceness %d (frontend.gate_nice; below 0 needs CAP_SYS_NICE): %s; "
                       "it runs at niceness %d, in a session of its own", frontend.gate_nice, e,
                       os.getpriority(os.PRIO_PROCESS, 0))
    gate = Gate(socket.socket(fileno=args.listen_fd), socket.socket(fileno=args.channel_fd),
                frontend.threads - frontend.reserved_threads, frontend.max_requests_per_decode_worker,
                frontend.retry_after_s)

    def stop(_signum: int, _frame: object) -> None:
        gate.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gate.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
