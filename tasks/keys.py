"""Every Redis key name the project uses, for every role: this module is their only home."""

PREFIX = "llmq"


def output_stream(request_id: str) -> str:
    """Per-request stream of OutputEvents, written by the worker, read by the frontend."""
    return f"{PREFIX}:out:{request_id}"


def cancel_flag(request_id: str) -> str:
    """Set by the frontend when the client went away, so the worker aborts the request."""
    return f"{PREFIX}:cancel:{request_id}"


def claim(request_id: str) -> str:
    """Set once (SET NX) by the worker that accepts the request: a copy of its message that the
    broker redelivers, or that the frontend resent, finds it and is dropped unrun."""
    return f"{PREFIX}:claim:{request_id}"


def worker_lease(worker_id: str) -> str:
    """A live worker's status; it expires when the worker stops renewing it."""
    return f"{PREFIX}:worker:{worker_id}"


# The set of every lease key a worker has renewed: readers list the workers from it instead of
# scanning the keyspace. A lease that expired leaves its member behind until a reader drops it.
WORKER_LEASES = f"{PREFIX}:worker-leases"


def stored_response(response_id: str) -> str:
    """A hash for one stored /v1/responses response: its status, its body, and the conversation
    a next turn continues (app/response_store.py). Any frontend reads it."""
    return f"{PREFIX}:response:{response_id}"


# Sorted set of the generation requests every frontend admitted and has not finished, scored by
# each one's lease (app/admission.py).
ADMITTED = f"{PREFIX}:admitted"


KV_EVENTS = f"{PREFIX}:kv-events"  # every engine's KV cache events, replayed by routers
# The newest router index snapshot: a hash of "cursor" (a KV_EVENTS entry id) and "index".
KV_INDEX_SNAPSHOT = f"{PREFIX}:kv-index-snapshot"
ROUTER_OVERLAP_BLOCKS = f"{PREFIX}:router:overlap-blocks"  # running hit rate: overlap / prompt
ROUTER_PROMPT_BLOCKS = f"{PREFIX}:router:prompt-blocks"
ROUTER_ROUND_ROBIN = f"{PREFIX}:router:round-robin"


def prefill_done_channel(request_id: str) -> str:
    """Pub/sub channel on which a prefill worker tells the decode worker its prefill is done."""
    return f"{PREFIX}:prefill-done:{request_id}"


def prefill_claim(request_id: str) -> str:
    """Push: set once (SET NX), by the prefill worker that takes the prefill (its PrefillClaimed)
    or by the decode worker that stopped waiting for one (CLAIM_ABANDONED): the first decides."""
    return f"{PREFIX}:prefill-claim:{request_id}"


CLAIM_ABANDONED = b"abandoned"


def prefill_claimed_channel(request_id: str) -> str:
    """Push: pub/sub channel on which a prefill worker tells the decode worker it took the prefill."""
    return f"{PREFIX}:prefill-claimed:{request_id}"


def prefill_abandoned(request_id: str) -> str:
    """Set by a decode worker that stopped waiting, so a late prefill worker skips the work."""
    return f"{PREFIX}:prefill-abandoned:{request_id}"


def nixl_endpoint(engine_id: str) -> str:
    """An engine's NIXL side channel (kvtransfer/registry.py), leased like its worker."""
    return f"{PREFIX}:nixl:{engine_id}"


# Disaggregation thresholds that override the config while decode workers run
# (kvtransfer/policy.py): `redis-cli HSET llmq:disagg:thresholds max_local_prefill_length 256`.
DISAGG_THRESHOLDS = f"{PREFIX}:disagg:thresholds"


def frontend_wake(reader_id: str) -> str:
    """A frontend process's own stream; a new request writes to it to wake that process's
    blocked XREAD (app/streams.py)."""
    return f"{PREFIX}:frontend-wake:{reader_id}"
