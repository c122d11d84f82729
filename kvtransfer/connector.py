"""vLLM's NIXL connector, configured per role.

The prefill engine is the KV producer and the decode engine the consumer (the decode engine still
prefills locally whenever the policy says so, or as a fallback). Each engine has its own NIXL side
channel: a host and a free port.

vLLM reads part of this configuration from the environment of the engine's processes. The
builders here set no process state: they return the variables (``env``), and the worker applies
them before its engine's processes spawn, which inherit them.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import placement

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig
    from vllm.config.kv_transfer import KVRole

CONNECTORS = {"pull": "NixlConnector", "push": "NixlPushConnector"}
ROLES: dict[str, KVRole] = {"prefill": "kv_producer", "decode": "kv_consumer"}

# Keys vLLM's decode side needs; a dict without them kills the EngineCore, so check first.
REQUIRED_PULL_PARAMS = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids", "remote_request_id")


class BadTransferParams(ValueError):
    """kv_transfer_params from a prefill worker that the decode engine must not be given."""


# For an engine's processes: PyTorch backs its CPU allocations of 2 MiB and more with transparent
# huge pages (it aligns them and madvises MADV_HUGEPAGE), the KV cache among them. UCX copies a
# WRITE between two processes' KV caches page by page in the kernel (CMA), so with 4 KiB pages a
# 4 MiB WRITE walks a thousand pages on each side; raw NIXL's numpy buffers get huge pages from
# numpy itself. Only the machine's THP setting "never" refuses them.
KV_HUGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}

# Side-channel ports come from below Linux's ephemeral range (32768-60999), where nothing takes a
# port implicitly. A port from bind(0) is in that range, and the engine binds it half a minute
# later: in between, another process's socket may take it implicitly (EADDRINUSE, and vLLM's engine
# then hangs at start).
SIDE_CHANNEL_PORTS = range(20000, 30000)


def free_port(host: str, rng: random.Random | None = None, attempts: int = 50) -> int:
    rng = rng or random.Random()
    for _ in range(attempts):
        port = rng.choice(SIDE_CHANNEL_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free NIXL side-channel port on {host} in {SIDE_CHANNEL_PORTS}")


class SideChannel(NamedTuple):
    """An engine's NIXL side channel, where peers reach it for the handshake."""

    host: str
    port: int

    @property
    def env(self) -> dict[str, str]:
        """What tells vLLM's engine processes to listen there."""
        return {"VLLM_NIXL_SIDE_CHANNEL_HOST": self.host, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(self.port)}


def side_channel(host: str) -> SideChannel:
    """Picks a free port on ``host`` for an engine's side channel. Nothing holds it: the engine
    binds it when it starts, so apply ``.env`` just before starting it."""
    return SideChannel(host, free_port(host))


def engine_id_for(worker_id: str, pid: int | None = None) -> str:
    """A NIXL engine id: the worker's name, plus its process id. A restarted worker keeps its
    name but must not keep its engine id: peers cache connections by engine id, and would keep
    talking to the dead incarnation (NIXL_ERR_REMOTE_DISCONNECT)."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker_id)
    return f"{name}-{os.getpid() if pid is None else pid}"


@dataclass(frozen=True)
class TransferSetup:
    """An engine's KV-transfer configuration: ``config`` for its engine arguments, and ``env`` for
    the environment of its processes."""

    config: KVTransferConfig
    env: dict[str, str] = field(default_factory=dict)


def transfer_config(role: str, engine_id: str, connector: str,
                    progress_delay_us: int = placement.DEFAULT_PROGRESS_DELAY_US,
                    push_registration_timeout_s: float = 10.0, kv_lease_s: int = 30,
                    huge_pages: bool = True) -> TransferSetup:
    from vllm.config import KVTransferConfig

    # Push always goes through our module: vLLM's own push connector leaves a decode request
    # whose push never came waiting for ever (kvtransfer/push.py).
    ours = progress_delay_us > 0 or connector == "push"
    config = KVTransferConfig(
        kv_connector=CONNECTORS[connector],
        # vLLM's connectors, loaded through our module, which tames NIXL's progress thread.
        kv_connector_module_path="kvtransfer.nixl_agents" if ours else None,
        kv_role=ROLES[role],
        kv_buffer_device="cpu",
        engine_id=engine_id,
        # If pulling the prefilled KV fails (say the prefill worker died after it answered), or
        # a push never comes, the decode engine recomputes the prompt itself instead of failing
        # the request.
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            # How long the prefill engine holds computed blocks for a decoder that has not
            # taken them yet (renewed by the decoder's heartbeats while it waits).
            "kv_lease_duration": kv_lease_s,
            # Push: how long the decode engine waits for the WRITE after registering its blocks.
            "push_registration_timeout": push_registration_timeout_s,
        },
    )
    # Our module reads the delay in the engine's processes (kvtransfer/nixl_agents.py).
    pages = KV_HUGE_PAGES_ENV if huge_pages else {}
    return TransferSetup(config, placement.nixl_agent_env(progress_delay_us) | pages)


