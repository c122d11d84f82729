"""vLLM's NIXL connector, with a NIXL progress thread that sleeps when it has nothing to do.

NIXL's Python agent hard-codes ``pthrDelay = 0`` for its progress thread, which then busy-polls
UCX: a whole core per idle agent, against 0.02 cores with a 1 ms sleep (``python -m
bench.nixl_bandwidth`` measures both). Two engines' threads were most of a 2-core machine. The
thread stays on rather than off: UCX transports without one-sided reads (TCP, across hosts) need
the side that holds the KV to make progress while its engine is idle, and only that thread would.
(Untested here without it since the pinning fix in workers/engine.py.)

vLLM loads this module inside each engine process (``kv_connector_module_path``), so the patch
applies there whatever way vLLM starts that process. The class keeps vLLM's name, so every
``has_connector("NixlConnector")`` check in vLLM still sees it. The delay comes from the
environment, which the worker sets before its engine starts (``PROGRESS_DELAY_ENV``).
"""

from __future__ import annotations

import os
import sys

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _PullConnector

from kvtransfer.connector import PROGRESS_DELAY_ENV, patch_progress_delay


if base_worker.NixlWrapper is not None:
    patch_progress_delay(sys.modules[base_worker.NixlWrapper.__module__].nixlBind,
                         int(os.environ.get(PROGRESS_DELAY_ENV, "1000")))


class NixlConnector(_PullConnector):
    """Decode pulls the KV that prefill computed (vLLM's NixlConnector)."""
