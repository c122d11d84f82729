"""Forwards this worker's vLLM KV cache events from the engine's ZMQ publisher into Redis.

vLLM publishes BlockStored / BlockRemoved / AllBlocksCleared batches on a ZMQ PUB socket from its
engine process. One thread here subscribes and appends each event to one Redis Stream shared by
all workers, which routers replay from the start. At start the worker writes "cleared" first: a
restarted engine holds nothing, whatever the stream said about its previous life.
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


def kv_events_endpoint(worker_id: str) -> str:
    # An ipc socket per worker process: no TCP port to allocate, and nothing collides.
    safe = "".join(c if c.isalnum() else "-" for c in worker_id)
    return f"ipc://{tempfile.gettempdir()}/llmq-kv-{safe}-{os.getpid()}.sock"


def kv_events_config(endpoint: str):
    from vllm.config import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic=TOPIC)


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

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt_string(zmq.SUBSCRIBE, TOPIC)
        sub.connect(self._endpoint)
        try:
            while not self._stop.is_set():
                if not sub.poll(timeout=500):
                    continue
                _topic, _seq, payload = sub.recv_multipart()
                batch = decoder.decode(payload)
                try:
                    self._append([to_wire(self._worker_id, e) for e in batch.events])
                except redis.RedisError as e:
                    # Lost events leave the router's index behind until the next store/clear;
                    # routing stays correct, only less cache-aware, so log and carry on.
                    logger.warning("could not forward %d KV events: %s", len(batch.events), e)
        finally:
            sub.close(linger=0)
