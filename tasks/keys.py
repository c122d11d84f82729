"""Redis key names shared by the frontend and the workers."""

PREFIX = "llmq"


def output_stream(request_id: str) -> str:
    """Per-request stream of OutputEvents, written by the worker, read by the frontend."""
    return f"{PREFIX}:out:{request_id}"


def cancel_flag(request_id: str) -> str:
    """Set by the frontend when the client went away, so the worker aborts the request."""
    return f"{PREFIX}:cancel:{request_id}"


def worker_lease(worker_id: str) -> str:
    """A live worker's status; it expires when the worker stops renewing it."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_LEASE_PATTERN = f"{PREFIX}:worker:*"


KV_EVENTS = f"{PREFIX}:kv-events"  # every engine's KV cache events, replayed by routers
ROUTER_OVERLAP_BLOCKS = f"{PREFIX}:router:overlap-blocks"  # running hit rate: overlap / prompt
ROUTER_PROMPT_BLOCKS = f"{PREFIX}:router:prompt-blocks"
ROUTER_ROUND_ROBIN = f"{PREFIX}:router:round-robin"
