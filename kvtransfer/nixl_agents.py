"""vLLM's NIXL connectors, with a NIXL progress thread that sleeps when it has nothing to do.

NIXL's Python agent hard-codes ``pthrDelay = 0`` for its progress thread, which then busy-polls
UCX: measured here, a whole core per idle agent (0.998 cores against 0.020 with a 1 ms delay, by
``python -m bench.nixl_idle``). On two cores that starved the very engines whose KV it should move: pulls
stalled until the prefill engine's hold on the blocks ran out. The thread cannot simply be turned
off: UCX's connection set-up and one-sided reads need the prefill side to make progress while its
engine is idle, which only that thread does (tried: the first pull's handshake then waited 30 s).

vLLM loads this module inside each engine process (``kv_connector_module_path``), so the patch
applies there whatever way vLLM starts that process. The classes keep vLLM's names, so every
``has_connector("NixlConnector")`` check in vLLM still sees them. The delay comes from the
environment, which the worker sets before its engine starts (``PROGRESS_DELAY_ENV``).
"""

from __future__ import annotations

import os
import sys

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _PullConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPushConnector as _PushConnector

from kvtransfer.connector import PROGRESS_DELAY_ENV, patch_progress_delay


if base_worker.NixlWrapper is not None:
    patch_progress_delay(sys.modules[base_worker.NixlWrapper.__module__].nixlBind,
                         int(os.environ.get(PROGRESS_DELAY_ENV, "1000")))


class NixlConnector(_PullConnector):
    """Decode pulls the KV that prefill computed (vLLM's NixlConnector)."""


class NixlPushConnector(_PushConnector):
    """Prefill writes the KV into the blocks decode allocated (vLLM's NixlPushConnector)."""
