"""A streaming response's chunks, written to its client's socket by the stream reader thread.

Why: otherwise the reader (app/streams.py) hands each token's entries to the request's thread,
which wakes, formats the chunk and writes it: at 128 streams that was a wake and a GIL hand-off
among some 80 threads a token, most of the frontend's CPU (docs/benchmarks.md, "the wake-ups").

How: once gunicorn has sent a stream's headers and first chunk (app/routes.py, ``_stream``), the
request thread hands the stream's chunk iterator to a Sink and parks in ``park``. Each time the
reader puts entries on the request's queue it takes a step (``kick``): it drives the iterator
without waiting (Gateway.events yields Pause.WOULD_BLOCK once nothing is queued), encodes each
chunk, frames it as gunicorn frames a chunked body (``frame``) and sends it with MSG_DONTWAIT.

Invariants:

- One driver at a time: the iterator and the socket are used only under ``_lock``. The reader
  only tries the lock; when it is taken it sets ``_kicked``, which the holder reads after it lets
  go, so entries put meanwhile are still read, in order, by one of them.
- The reader never waits for a client, nor on Redis. A send that would block or sends part, a
  failed send, a step that may call Redis (Pause.NEEDS_THREAD), an error, and the stream's end
  hand the stream back to the request thread for good (``_handed_back``): it sends the framed
  bytes left over, raises the error, or drives the rest itself through gunicorn, waiting as it
  does without a sink.
- The request thread wakes when Gateway.events' periodic checks (deadlines, worker liveness,
  migration) are due (``Driving.next_check``) and takes a step itself, with the checks on.

Only plain-TCP HTTP/1.1 responses under gunicorn get a sink: gunicorn frames chunks only for
HTTP/1.1, and a TLS socket cannot take a partial non-blocking send to finish later. Others, and
/v1/responses streams, are written by their request threads. gunicorn's access log counts only
the bytes it wrote itself.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

from app import metrics
from app.gateway import Driving, Pause

logger = logging.getLogger(__name__)


def frame(data: bytes) -> bytes:
    """One chunk of a chunked body, exactly as gunicorn's util.write_chunk frames it."""
    return b"%X\r\n%s\r\n" % (len(data), data)


class Sink:
    def __init__(self, sock: socket.socket, chunks: Iterator[dict | Pause], encode: Callable[[dict], bytes],
                 driving: Driving):
        self._sock = sock
        self._chunks = chunks
        self._encode = encode
        self._driving = driving
        self._lock = threading.Lock()
        self._kicked = False
        self._handed_back = threading.Event()
        self._unsent = b""  # framed bytes the reader could not send: the request thread sends them first
        self._error: BaseException | None = None  # what the request thread raises once handed back

    @classmethod
    def start(cls, environ: dict, chunks: Iterator[dict | Pause], encode: Callable[[dict], bytes],
              driving: Driving) -> Sink | None:
        """From the request thread, once gunicorn has sent the headers: a sink that drives
        ``chunks`` from now on, or None when this response cannot have one."""
        sock = environ.get("gunicorn.socket")
        # A socket with a timeout would wait for room before a send, MSG_DONTWAIT or not.
        if (not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket) or sock.gettimeout()
                or environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or driving.replies is None):
            return None
        sink = cls(sock, chunks, encode, driving)
        driving.nonblocking = driving.by_reader = True
        driving.replies.on_put = sink.kick
        sink.kick()  # what was queued before on_put was set
        return sink

    def kick(self) -> None:
        """Entries arrived (on the reader thread): take a step, unless another driver holds the
        stream, which then takes it."""
        self._kicked = True
        self._drive(by_reader=True, wait=False)

    def park(self) -> None:
        """The request thread waits here until the stream is handed back, taking a step each
        time the periodic checks are due. Then it sends what the reader left unsent (an OSError
        if the client is gone) and raises the stream's error, if any; the iterator goes on from
        where it stopped, driven by that thread, waiting as it would without a sink."""
        while not self._handed_back.wait(max(0.0, self._driving.next_check - time.monotonic())):
            self._drive(by_reader=False, wait=True)
        self.close()
        unsent, self._unsent = self._unsent, b""
        if unsent:
            self._sock.sendall(unsent)
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """The request thread owns the stream from here; the reader takes no more steps."""
        with self._lock:  # a step in progress finishes first
            self._handed_back.set()
            if self._driving.replies is not None:
                self._driving.replies.on_put = None
            self._driving.nonblocking = self._driving.by_reader = False

    def _drive(self, by_reader: bool, wait: bool) -> None:
        took = self._lock.acquire(blocking=wait)
        while took:
            self._kicked = False
            try:
                if not self._handed_back.is_set():
                    self._step(by_reader)
            finally:
                self._lock.release()
            took = self._kicked and self._lock.acquire(blocking=False)

    def _step(self, by_reader: bool) -> None:
        """Under the lock: drives the iterator until it would block, and sends what it gave."""
        frames = []
        back = ""  # why the stream goes back to the request thread, if it does
        self._driving.by_reader = by_reader
        try:
            for chunk in self._chunks:
                if chunk is Pause.WOULD_BLOCK:
                    break
                if chunk is Pause.NEEDS_THREAD:
                    back = "needs_thread"
                    break
                assert not isinstance(chunk, Pause)
                frames.append(frame(self._encode(chunk)))
            else:
                back = "end"  # the request thread writes [DONE]
        except BaseException as e:  # noqa: BLE001  raised again on the request thread
            self._error, back = e, "error"
        finally:
            self._driving.by_reader = True
        if frames:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as e:  # the client is gone: that is the error to raise, not the stream's
                self._error, sent, back = e, len(data), "send_failed"
            if sent < len(data):
                self._unsent, back = data[sent:], "full_socket"
        if back:
            metrics.STREAM_HANDBACKS.labels(back).inc()
            self._handed_back.set()
