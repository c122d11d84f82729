"""Forwards this worker's vLLM KV cache events from the engine's ZMQ publisher into Redis.

vLLM publishes BlockStored / BlockRemoved / AllBlocksCleared batches on a ZMQ PUB socket from its
engine process. One thread here subscribes and appends each event to one Redis Stream shared by
all workers, which routers replay (router/events.py). At start the worker writes "cleared" first:
a restarted engine holds nothing, whatever the stream said about its previous life.

PUB/SUB drops what is published before a subscriber has joined, or while it falls behind. A lost
BlockStored hides its blocks, and every block chained after them, from the router until they are
stored again. So the batches' sequence numbers are checked, and anything missing is fetched from
the replay buffer vLLM keeps for exactly this (``replay_endpoint``), including whatever the engine
published before this thread subscribed. Only what that buffer no longer holds is lost, and that
is logged and counted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

import msgspec
import redis

from tasks import keys
from tasks.messages import KvEvent, encode_kv_event

logger = logging.getLogger(__name__)

TOPIC = "kv"
# A replay request is answered from the engine's memory at once; this only bounds a dead engine.
REPLAY_TIMEOUT_MS = 2000


def kv_events_endpoint(worker_id: str) -> str:
    # An ipc socket per worker process: no TCP port to allocate, and nothing collides.
    safe = "".join(c if c.isalnum() else "-" for c in worker_id)
    return f"ipc://{tempfile.gettempdir()}/llmq-kv-{safe}-{os.getpid()}.sock"


def replay_endpoint_for(endpoint: str) -> str:
    return endpoint.removesuffix(".sock") + "-replay.sock"


def kv_events_config(endpoint: str):
    from vllm.config import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                          replay_endpoint=replay_endpoint_for(endpoint), topic=TOPIC)


class Sequence:
    """The next batch sequence number to forward, and what a newly arrived one means."""

    def __init__(self):
        self.next = 0
        self.num_lost = 0

    def accept(self, seq: int) -> bool:
        """True to forward this batch (it is the next one, or the first after a loss)."""
        if seq < self.next:
            return False  # already forwarded, from the replay buffer
        if seq > self.next:
            lost = seq - self.next
            self.num_lost += lost
            logger.warning("%d KV event batch(es) lost before batch %d (older than vLLM's replay buffer); "
                           "the router's index misses those blocks until they are stored again", lost, seq)
        self.next = seq + 1
        return True


def to_wire(worker_id: str, event) -> KvEvent:
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    if isinstance(event, BlockStored):
        return KvEvent(worker_id, "stored", list(event.block_hashes), event.parent_block_hash,
                       list(event.token_ids), event.block_size)
    if isinstance(event, BlockRemoved):
        return KvEvent(worker_id, "removed", list(event.block_hashes))
    if isinstance(event, AllBlocksCleared):
        return KvEvent(worker_id, "cleared")
    raise TypeError(f"unknown KV event {type(event).__name__}")


class KvEventForwarder:
    def __init__(self, client: redis.Redis, worker_id: str, endpoint: str, maxlen: int):
        self._client = client
        self._worker_id = worker_id
        self._endpoint = endpoint
        self._maxlen = maxlen
        self.sequence = Sequence()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)

    def start(self) -> None:
        self._append([KvEvent(self._worker_id, "cleared")])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _append(self, events: list[KvEvent]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(keys.KV_EVENTS, {"e": encode_kv_event(event)}, maxlen=self._maxlen, approximate=True)
        pipe.execute()

    def _run(self) -> None:
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        context: zmq.Context[zmq.Socket] = zmq.Context.instance()
        sub = context.socket(zmq.SUB)
        sub.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
        sub.connect(self._endpoint)
        replay = context.socket(zmq.DEALER)
        replay.connect(replay_endpoint_for(self._endpoint))
        try:
            # What the engine published before this subscription took hold.
            self._replay(replay)
            while not self._stop.is_set():
                if not sub.poll(timeout=500):
                    continue
                _topic, seq_bytes, payload = sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if seq > self.sequence.next:
                    self._replay(replay)  # fills the gap from vLLM's buffer, this batch included
                if self.sequence.accept(seq):
                    self._forward(payload)
        finally:
            sub.close(linger=0)
            replay.close(linger=0)

    def _replay(self, replay) -> None:
        """Forwards every batch from the next expected one that vLLM's replay buffer holds."""
        from vllm.distributed.kv_events import ZmqEventPublisher

        replay.send_multipart((b"", self.sequence.next.to_bytes(8, "big")))
        while True:
            if not replay.poll(timeout=REPLAY_TIMEOUT_MS):
                logger.warning("vLLM's KV event replay did not answer within %d ms", REPLAY_TIMEOUT_MS)
                return
            _empty, _topic, seq_bytes, payload = replay.recv_multipart()
            if seq_bytes == ZmqEventPublisher.END_SEQ:
                return
            if self.sequence.accept(int.from_bytes(seq_bytes, "big")):
                self._forward(payload)

    def _forward(self, payload: bytes) -> None:
        batch = self._decoder.decode(payload)
        try:
            self._append([to_wire(self._worker_id, e) for e in batch.events])
        except redis.RedisError as e:
            # Lost events leave the router's index behind until the next store/clear;
            # routing stays correct, only less cache-aware, so log and carry on.
            logger.warning("could not forward %d KV events: %s", len(batch.events), e)
