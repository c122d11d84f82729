"""vLLM's NIXL connectors, with a NIXL progress thread that sleeps when it has nothing to do, and
a push connector whose decode side recomputes a prompt whose push never came.

vLLM loads this module inside each engine process (``kv_connector_module_path``), so what it
patches applies there whatever way vLLM starts that process: NIXL's agents get the progress delay
the worker put in the environment (placement.py, ``patch_progress_delay``), and an engine that runs
unbound stays unbound when vLLM's NIXL worker half pins it (placement.py, ``unpinned_from_kv_core``).
The classes keep vLLM's names, so every ``has_connector("NixlConnector")`` check in vLLM still
sees them.

vLLM builds a connector twice per engine, through the same factory and so from this module:
once with role SCHEDULER in the engine core's scheduler, once with role WORKER in the model
runner (vllm/distributed/kv_transfer/kv_transfer_state.py). Our push connector builds our halves
for both roles; they meet only through the connector metadata the scheduler half hands the
worker half each step, and the transfer results going back (kvtransfer/push.py says what for).
"""

from __future__ import annotations

import logging
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable

from vllm.distributed.device_communicators import shm_broadcast
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _PullConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPushConnector as _PushConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_scheduler import NixlPushConnectorScheduler
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker

import placement
from kvtransfer import push

# Under vLLM's logger: the engine processes configure its handler, and nothing else.
logger = logging.getLogger(f"vllm.{__name__}")

if not placement.no_amx_when_unbound(logger):
    placement.amx_allowed(logger)
placement.spin_less_when_unbound(shm_broadcast, logger, moves_kv=True)

if base_worker.NixlWrapper is not None:
    placement.patch_progress_delay(sys.modules[base_worker.NixlWrapper.__module__].nixlBind,
                                   placement.progress_delay_us())


class NixlConnector(_PullConnector):
    """Decode pulls the KV that prefill computed (vLLM's NixlConnector)."""

    def __init__(self, vllm_config, role, kv_cache_config):
        with placement.unpinned_from_kv_core(logger):
            super().__init__(vllm_config, role, kv_cache_config)


class PushScheduler(NixlPushConnectorScheduler):
    """vLLM's push scheduler half, whose registration watchdog fails the receive it gives up on.

    vLLM drops a request's watchdog entry when the request ends. We keep our own, and keep it
    when a request ends while still waiting for its push: the scheduler holds such a request's
    blocks until its receive finishes, and only a failed receive then gives them back.
    """

    def __init__(self, vllm_config, engine_id, kv_cache_config):
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self._push_waits: dict[str, float] = {}     # D requests registered with P -> deadline
        self._push_live: set[str] = set()           # ... of which not yet finished
        self._push_outcomes: dict[str, str] = {}    # receive results, until the request ends
        self._received_unscheduled: set[str] = set()  # for the trace: received, not yet scheduled
        # The engine loop's nap after a step that reported a receive is skipped (push.py).
        self._loop_clock = push.engine_loop_clock(sys.modules.get("vllm.v1.engine.core"))

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        # vLLM takes D's whole prompt as pushed; a prompt that ends with the first token P sampled
        # has one token more than P computed (push.pushed_tokens).
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        params = request.kv_transfer_params or {}
        if count and push.PREFILLED_KEY in params:
            count = push.pushed_tokens(count, num_computed_tokens, params[push.PREFILLED_KEY])
            load_async = load_async and count > 0
        return count, load_async

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        rid = request.request_id
        registration = self._push_pending_registrations.get(rid)
        if registration is not None and rid not in self._push_waits:
            self._push_waits[rid] = self._push_registration_deadlines[rid]
            self._push_live.add(rid)
            registration[push.WRITE_BY_KEY] = push.write_by(time.time(), self._push_registration_timeout)

    def build_connector_meta(self, scheduler_output):
        if self._received_unscheduled:
            for new in scheduler_output.scheduled_new_reqs:
                if new.req_id in self._received_unscheduled:
                    self._received_unscheduled.discard(new.req_id)
                    logger.debug("[%s] scheduled after its push (%s tokens)", new.req_id,
                                 scheduler_output.num_scheduled_tokens.get(new.req_id))
        expired = push.expired(self._push_waits, time.perf_counter())
        for rid in expired:
            # Out of vLLM's own tables first, so it neither sends the registration late nor
            # logs its "timed out" line and stops there.
            del self._push_waits[rid]
            self._push_registration_deadlines.pop(rid, None)
            self._push_pending_registrations.pop(rid, None)
            logger.warning("[%s] no push arrived within %.1fs of registering; failing the receive (the "
                           "prompt is recomputed locally, or an ended request's blocks are freed)", rid,
                           self._push_registration_timeout)
        meta = super().build_connector_meta(scheduler_output)
        setattr(meta, push.EXPIRED_ATTR, expired)
        return meta

    def update_connector_output(self, connector_output):
        super().update_connector_output(connector_output)
        for rid, outcome in push.outcomes(connector_output.finished_recving,
                                          getattr(connector_output, "failed_recving", None)).items():
            self._push_waits.pop(rid, None)
            if rid in self._push_live:
                self._push_outcomes[rid] = outcome
                if outcome == push.RECEIVED:
                    self._received_unscheduled.add(rid)
                if self._loop_clock is not None:
                    self._loop_clock.skip_next_nap = True
                logger.info("[%s] push %s", rid, outcome)

    def request_finished(self, request, block_ids):
        rid = request.request_id
        delay_free, params = super().request_finished(request, block_ids)
        if rid not in self._push_live:
            logger.debug("[%s] finished in the scheduler", rid)  # on P: the prefill is computed
            return delay_free, params
        self._push_live.discard(rid)
        outcome = self._push_outcomes.pop(rid, None)
        if rid in self._push_waits:
            logger.info("[%s] ended while waiting for its push; its blocks return when the push lands "
                        "or the registration times out", rid)
        # A D request has no params of its own here; the decode worker reads the outcome.
        return delay_free, {**(params or {}), push.OUTCOME_KEY: outcome} if outcome else params


class _PollWhilePending(threading.Event):
    """The decode engine's wake event for vLLM's writer thread, whose untimed wait() times out
    every ``push.RECV_POLL_S`` while a receive is pending.

    The writer thread is the only one that reads NIXL's notifications, and vLLM wakes it only from
    the engine's steps, so a WRITE's notification waited for the decode engine's next step before
    its thread could take it at the step after. vLLM's loop parks on ``wait()`` with no timeout
    when it has nothing of its own to poll for; with this event it polls while a push is awaited.
    """

    def __init__(self, pending: Callable[[], bool]):
        super().__init__()
        self._pending = pending

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None and self._pending():
            timeout = push.RECV_POLL_S
        return super().wait(timeout)


class _TracedNotifs(queue.Queue):
    """The queue vLLM's writer thread puts the completion notifications it drained in; logs each
    (at DEBUG, for bench remote-prefill's trace) as it is put."""

    def put(self, item, block=True, timeout=None):
        if not item.startswith(b"HB:") and logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%s] notification drained", item[:80].decode(errors="replace"))
        super().put(item, block, timeout)


class PushWorker(NixlPushConnectorWorker):
    """vLLM's push worker half: fails the receives the scheduler half gave up on, and (on P)
    starts no WRITE after the registration's write-by time."""

    # For the trace (bench remote-prefill, at DEBUG): the engine's steps after a receive.
    TRACED_STEPS = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Before register_kv_caches starts the writer thread, which reads both.
        self._push_writer_wake = _PollWhilePending(lambda: bool(self._recving_metadata))
        self._pending_completion_notifs = _TracedNotifs()
        self._traced: tuple[str, int] | None = None  # request received, steps left to log
        # The writer's last transfer(): seconds, state, and the minor page faults its thread took
        # meanwhile (a copy into pages of the peer that were never touched faults them in, counted
        # to the thread that copies).
        self._last_post: tuple[float, str, int] = (0.0, "", 0)
        if logger.isEnabledFor(logging.DEBUG):
            self.nixl_wrapper.transfer = self._timed(self.nixl_wrapper.transfer)
        self._step_bound = self._step_forwarded = self._step_ended = 0.0
        # On P, the writer thread's WRITE (its descriptors, NIXL's post and UCX's copy inside it)
        # at real-time priority: it shares its core with the engine's own threads and, on a small
        # machine, the frontends, Celery and Redis, which otherwise preempt the copy. Bounded
        # work: the handshake it may need runs on vLLM's executor, and the WRITE's completion is
        # checked by the engine's main thread, so the section never waits in a loop.
        self._write_at_rt = placement.RealtimeSection(log=logger, what="KV WRITE")

    def get_transfer_results(self):
        results = super().get_transfer_results()
        now = time.perf_counter()
        if self._traced is not None and logger.isEnabledFor(logging.DEBUG):
            rid, left = self._traced
            # Between the previous step's end and this one's metadata lies the engine's own work
            # (its scheduling, the sampling, the queues between its two processes).
            logger.debug("[%s] step after the push: %.2f ms before it, forward %.2f ms, connector %.2f ms", rid,
                         (self._step_bound - self._step_ended) * 1000,
                         (self._step_forwarded - self._step_bound) * 1000, (now - self._step_forwarded) * 1000)
            self._traced = (rid, left - 1) if left > 1 else None
        self._step_ended = now
        for rid in results.finished_recving or ():
            logger.debug("[%s] receive reported by the worker", rid)
            self._traced = (rid, self.TRACED_STEPS)
        if results.finished_sending and logger.isEnabledFor(logging.DEBUG):
            data = self.xfer_stats.data
            for rid in results.finished_sending:
                # NIXL's telemetry of the last WRITE (the time vLLM's stats report, and the
                # descriptors after NIXL merged contiguous ones).
                logger.debug("[%s] WRITE reported done: NIXL %s ms (post %s ms), %s descriptors", rid,
                             data["transfer_duration"][-1] * 1000 if data["transfer_duration"] else None,
                             data["post_duration"][-1] * 1000 if data["post_duration"] else None,
                             data["num_descriptors"][-1] if data["num_descriptors"] else None)
        return results

    def _timed(self, transfer):
        """NIXL's transfer() (in push mode only the writer thread calls it), timed for the trace."""
        def timed(handle, *args, **kwargs):
            faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            began = time.perf_counter()
            state = transfer(handle, *args, **kwargs)
            self._last_post = (time.perf_counter() - began, state,
                               resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults)
            return state
        return timed

    def _xfer_blocks(self, read_spec, dst_engine_id, request_id, remote_request_id, local_xfer_side_handle,
                     remote_xfer_side_handle):
        began = time.perf_counter()
        handle = super()._xfer_blocks(read_spec, dst_engine_id, request_id, remote_request_id,
                                      local_xfer_side_handle, remote_xfer_side_handle)
        if handle is not None and logger.isEnabledFor(logging.DEBUG):
            # The transfer itself, on the thread that posts it: UCX may copy inside transfer()
            # (then it returns DONE), or finish later, which only the engine's next step sees.
            posted, state, faults = self._last_post
            logger.debug("[%s] WRITE posted: transfer() %.3f ms, returned %s, %d minor faults; with its "
                         "preparation %.3f ms", request_id, posted * 1000, state, faults,
                         (time.perf_counter() - began) * 1000)
        return handle

    def start_load_kv(self, metadata):
        self._step_forwarded = time.perf_counter()  # vLLM starts async loads after the forward
        super().start_load_kv(metadata)
        for rid in getattr(metadata, push.EXPIRED_ATTR, ()):
            if rid in self._recving_metadata:
                # The same path vLLM takes when it cannot send a registration: reported as a
                # failed receive in the next transfer results.
                self._failed_recv_reqs.put(rid)

    def _do_start_push_kv(self, request_id, local_block_ids, registration_data):
        if not push.may_write(registration_data, time.time()):
            logger.warning("[%s] not pushing to %s: its registration is past its write-by time, so the "
                           "decode engine may already have given those blocks back", request_id,
                           registration_data.get("decode_engine_id"))
            return
        logger.info("[%s] writing the KV to %s", request_id, registration_data.get("decode_engine_id"))
        with self._write_at_rt.section():
            super()._do_start_push_kv(request_id, local_block_ids, registration_data)


class NixlPushConnector(_PushConnector):
    """Decode allocates, prefill writes (vLLM's NixlPushConnector), with our halves."""

    def bind_connector_metadata(self, connector_metadata):
        if self.connector_worker is not None:  # before the forward: for the trace
            self.connector_worker._step_bound = time.perf_counter()
        super().bind_connector_metadata(connector_metadata)

    def __init__(self, vllm_config, role, kv_cache_config):
        # vLLM's own __init__ would build its halves, and a worker half opens a NIXL agent and
        # a scheduler half binds the side channel: so run only the shared base, then build ours.
        # Mirrors NixlPushConnector.__init__ in vllm 0.32 (nixl/connector.py).
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            raise ValueError("NixlPushConnector does not support decode_context_parallel_size > 1.")
        self.connector_scheduler = None
        self.connector_worker = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = PushScheduler(vllm_config, self.engine_id, kv_cache_config)
        elif role == KVConnectorRole.WORKER:
            with placement.unpinned_from_kv_core(logger):
                self.connector_worker = PushWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"Unsupported KVConnectorRole: {role}")
