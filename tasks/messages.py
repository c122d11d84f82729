"""Wire messages between the frontend and the workers. This module is their only home.

A generation task carries a ``GenerateRequest`` (as plain JSON data, so Flower can show it).
The worker answers on a per-request Redis Stream with ``OutputEvent``s: ``Accepted`` once, then
``Delta``s, then exactly one ``Finished`` or ``Failed``. Finish and failure are explicit events,
never inferred from a timeout.
"""

from __future__ import annotations

import msgspec

# Bump when a field changes meaning or a required field is added; peers reject other versions
# before decoding the rest, so a mixed-version rollout fails loudly instead of mis-parsing.
WIRE_VERSION = 6  # 2: GenerateRequest.prefix_hit_tokens; 3: GenerateRequest.exclude_workers, SamplingSpec.logit_bias;
# 4: SamplingSpec.structured; 5: SamplingSpec.prompt_logprobs, Delta.prompt_logprobs;
# 6: PrefillRequest.sampling, PrefillDone.first


class StructuredSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on the output, as vLLM's StructuredOutputsParams takes it: exactly one field is
    set. The frontend has already compiled it (app/structured.py), so the engine does not refuse it.

    ``json`` is the schema as JSON text, not a dict: Celery's JSON and msgspec then carry any
    schema's keys ("$defs", "$ref") unchanged, and vLLM takes either form."""

    json: str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; None = no logprobs
    # (token id, bias added to its logit) pairs. Pairs, not a dict: Celery's JSON would turn
    # int keys into strings on the way.
    logit_bias: list[tuple[int, float]] = []
    # Only the decode engine applies it: a request with it never has its first token sampled
    # by a prefill engine (workers/disagg.py, ``first_token_from_prefill``).
    structured: StructuredSpec | None = None
    # Top alternatives for each prompt token (echo with logprobs); None = no prompt logprobs.
    # The worker then prefills locally: a remote prefill's KV comes without the prompt's logits.
    prompt_logprobs: int | None = None


class GenerateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    # Unix time after which nobody waits for the answer; a worker drops work past it.
    deadline_unix: float
    # Prompt tokens the router expects the chosen worker to have cached (KV routing only).
    prefix_hit_tokens: int = 0
    # Workers the router must not choose: the frontend resubmits a request whose worker died
    # (app/migration.py) and names that worker here while its lease, or the router's cached view
    # of it, may still say it lives.
    exclude_workers: list[str] = []
    version: int = WIRE_VERSION


class PrefillRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A decode worker asks the prefill queue to compute a prompt's KV for it."""

    request_id: str
    prompt_token_ids: list[int]
    decode_worker_id: str
    deadline_unix: float
    # The request's own sampling: the prefill engine samples the first token with it (one
    # token) and PrefillDone carries it to the decode worker, which streams it. None: the
    # prefill engine's token is nobody's (greedy) and the decode engine samples the first token.
    sampling: SamplingSpec | None = None
    version: int = WIRE_VERSION


class PrefillDone(msgspec.Struct, frozen=True):
    """Published on the decode worker's reply channel when a remote prefill ends, by either
    connector.

    ``kv_transfer_params`` is what vLLM's NIXL connector returned on the prefill side; with pull
    the decode engine takes it as is. ``error`` is set instead when the prefill failed.
    """

    request_id: str
    prefill_worker_id: str
    kv_transfer_params: dict | None = None
    error: str | None = None
    prefill_s: float = 0.0  # the prefill engine's time for it, for the decode worker's log
    # The first token the prefill engine sampled, as its Delta, when the request carried its
    # sampling: finish_reason "stop" if it ended the request, "length" since it was the prefill
    # engine's one token.
    first: Delta | None = None


class PrefillClaimed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Push: a prefill worker took a decode worker's prefill, and is computing it now.

    The decode engine then allocates the prompt's blocks and registers them with this NIXL
    engine (its side channel at ``host``:``port``), which WRITEs the KV into them.
    """

    request_id: str
    prefill_worker_id: str
    engine_id: str
    host: str
    port: int


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    token: str
    # None only for a prompt's first token, which nothing precedes; the wire never carries it.
    logprob: float | None
    top: list[TopLogprob]


class Routed(msgspec.Struct, frozen=True, tag_field="event", tag="routed"):
    """Where the router sent the request, and why. Written before the worker's Accepted."""

    worker_id: str
    mode: str
    overlap_blocks: int
    prompt_blocks: int


class Accepted(msgspec.Struct, frozen=True, tag_field="event", tag="accepted"):
    """A worker took the request. The frontend watches this worker's lease from now on."""

    worker_id: str


class Delta(msgspec.Struct, frozen=True, tag_field="event", tag="delta"):
    index: int  # which of the n choices
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort" on a choice's last delta
    # On each choice's first delta when the request asks for prompt logprobs: those of prompt
    # tokens 2..N (the first has none). A resumed attempt sends them again; the first wins.
    prompt_logprobs: list[TokenLogprob] | None = None


class Finished(msgspec.Struct, frozen=True, tag_field="event", tag="finished"):
    num_prompt_tokens: int
    num_cached_tokens: int = 0


class Failed(msgspec.Struct, frozen=True, tag_field="event", tag="failed"):
    # An HTTP status the frontend passes on (400 for a request the engine rejects, 503 for a
    # dead engine, 504 for a missed deadline) with an OpenAI error type and message.
    status: int
    type: str
    message: str





OutputEvent = Routed | Accepted | Delta | Finished | Failed

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(OutputEvent)


def encode_event(event: OutputEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(raw: bytes) -> OutputEvent:
    return _event_decoder.decode(raw)


class WireVersionError(ValueError):
    """A message from a peer speaking another wire version."""


def request_to_task_arg(req: GenerateRequest) -> dict:
    return msgspec.to_builtins(req)


def task_argsrepr(req: GenerateRequest | PrefillRequest) -> str:
    """What Celery's events and Flower show as the task's arguments.

    Not Celery's default, a ``saferepr`` of the payload: that shows every prompt token id in the
    dashboard, and costs the frontend a repr of the whole prompt on every request.
    """
    size = f"{len(req.prompt_token_ids)} prompt tokens"
    if isinstance(req, GenerateRequest):
        return f"{req.request_id}: {size}, max_tokens={req.sampling.max_tokens}"
    return f"{req.request_id}: {size}, for {req.decode_worker_id}"


def _from_task_arg(payload: dict, kind: type):
    version = payload.get("version") if isinstance(payload, dict) else None
    if version != WIRE_VERSION:
        raise WireVersionError(f"wire version {version!r}, this worker speaks {WIRE_VERSION}")
    return msgspec.convert(payload, kind)


def request_from_task_arg(payload: dict) -> GenerateRequest:
    return _from_task_arg(payload, GenerateRequest)


class KvEvent(msgspec.Struct, frozen=True, array_like=True):
    """One engine's KV cache change, as forwarded into the Redis Stream that routers replay.

    ``kind`` is "stored", "removed" or "cleared". Hashes are the engine's own (opaque bytes or
    ints); routers recompute content hashes from ``token_ids`` (one run of whole blocks, in
    order, after ``parent_hash``) so that their index matches prompts they have never seen.
    """

    worker_id: str
    kind: str
    block_hashes: list[bytes | int] = []
    parent_hash: bytes | int | None = None
    token_ids: list[int] = []
    block_size: int = 0


class KvIndexSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """A router's whole index as of one entry of the KV event stream (``cursor``).

    A router that starts loads the newest one and replays only the events after it, so the
    stream can be trimmed up to it and still rebuild the same index (router/snapshots.py).
    ``nodes`` and ``held`` are ``RadixIndex.state()``.
    """

    cursor: str
    block_size: int
    nodes: list[tuple[int, int, bytes, list[str]]]
    held: dict[str, list[tuple[bytes | int, int]]]


_kv_encoder = msgspec.msgpack.Encoder()
_kv_decoder = msgspec.msgpack.Decoder(KvEvent)
_snapshot_decoder = msgspec.msgpack.Decoder(KvIndexSnapshot)


def encode_kv_event(event: KvEvent) -> bytes:
    return _kv_encoder.encode(event)


def decode_kv_event(raw: bytes) -> KvEvent:
    return _kv_decoder.decode(raw)


def encode_kv_index_snapshot(snapshot: KvIndexSnapshot) -> bytes:
    return _kv_encoder.encode(snapshot)


def decode_kv_index_snapshot(raw: bytes) -> KvIndexSnapshot:
    return _snapshot_decoder.decode(raw)


def prefill_to_task_arg(req: PrefillRequest) -> dict:
    return msgspec.to_builtins(req)


def prefill_from_task_arg(payload: dict) -> PrefillRequest:
    return _from_task_arg(payload, PrefillRequest)


def encode_prefill_done(msg: PrefillDone) -> bytes:
    return _encoder.encode(msg)


def decode_prefill_done(raw: bytes) -> PrefillDone:
    return msgspec.json.decode(raw, type=PrefillDone)


def encode_prefill_claimed(msg: PrefillClaimed) -> bytes:
    return _encoder.encode(msg)


def decode_prefill_claimed(raw: bytes) -> PrefillClaimed:
    return msgspec.json.decode(raw, type=PrefillClaimed)
