"""vLLM's NIXL connector, configured per role.

The prefill engine is the KV producer and the decode engine the consumer (the decode engine still
prefills locally whenever the policy says so, or as a fallback). Each engine has its own NIXL side
channel: a host and a free port, put into the environment before the engine's processes spawn.
"""

from __future__ import annotations

import os
import socket

CONNECTORS = {"pull": "NixlConnector", "push": "NixlPushConnector"}
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}

# Keys vLLM's decode side needs; a dict without them kills the EngineCore, so check first.
REQUIRED_PULL_PARAMS = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids", "remote_request_id")


class BadTransferParams(ValueError):
    """kv_transfer_params from a prefill worker that the decode engine must not be given."""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def side_channel(host: str) -> tuple[str, int]:
    """Claims this process's NIXL side channel; the engine processes it spawns inherit it."""
    port = free_port(host)
    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    return host, port


def engine_id_for(worker_id: str, pid: int | None = None) -> str:
    """A NIXL engine id: the worker's name, plus its process id. A restarted worker keeps its
    name but must not keep its engine id: peers cache connections by engine id, and would keep
    talking to the dead incarnation (NIXL_ERR_REMOTE_DISCONNECT)."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker_id)
    return f"{name}-{os.getpid() if pid is None else pid}"


def transfer_config(role: str, engine_id: str, connector: str):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector=CONNECTORS[connector],
        kv_role=ROLES[role],
        kv_buffer_device="cpu",
        engine_id=engine_id,
        # If pulling the prefilled KV fails (say the prefill worker died after it answered),
        # the decode engine recomputes the prompt itself instead of failing the request.
        kv_load_failure_policy="recompute",
    )


def prefill_leg_params() -> dict:
    """kv_transfer_params for the prefill engine's request: compute, keep the KV for a decoder."""
    return {"do_remote_decode": True}


def decode_leg_params(from_prefill: dict | None) -> dict:
    if not isinstance(from_prefill, dict):
        raise BadTransferParams("the prefill worker returned no kv_transfer_params")
    missing = [k for k in REQUIRED_PULL_PARAMS if k not in from_prefill]
    if missing:
        raise BadTransferParams(f"kv_transfer_params lack {missing}")
    return dict(from_prefill)
