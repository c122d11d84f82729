"""One vLLM engine per worker process, shared by all of that worker's task threads.

Why this shape: vLLM's ``AsyncLLM`` batches every request it holds into each step (continuous
batching), but it must be driven from one asyncio event loop. A Celery worker runs its tasks on a
thread pool, so the engine lives on a dedicated event-loop thread. Each task thread submits a
coroutine there that streams its request's outputs to Redis, and waits for it to end. Sixty-four task threads
waiting on one engine means up to sixty-four sequences in its batch, which a prefork pool (one
engine per child, one request per child) could never give.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import placement
from config import Settings
from kvtransfer.stats import TransferStats
from tasks.messages import SamplingSpec, StructuredSpec
from workers import detok, orphans

if TYPE_CHECKING:
    from vllm.config.model import ModelDType
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    """Latest scheduler figures, written by vLLM's stat-logger hook on the engine loop thread."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    max_running_seen: int = 0
    num_batched_steps: int = 0  # steps that ran two or more requests together
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    transfers: TransferStats = field(default_factory=TransferStats)
    updated_unix: float = field(default_factory=time.time)


def engine_args(settings: Settings, **extra: Any):
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    e = settings.engine
    if e.structured_outputs_disable_any_whitespace:
        extra = {"structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
                 **extra}
    return AsyncEngineArgs(
        model=settings.model.resolved_path,
        served_model_name=[settings.model.name],
        block_size=e.block_size,
        kv_cache_memory_bytes=int(e.kv_cache_gib * 2**30),
        max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        enforce_eager=e.enforce_eager,
        # A str in config.py, so that vLLM, not the config, decides which dtypes it takes.
        dtype=cast("ModelDType", e.dtype),
        enable_prefix_caching=e.enable_prefix_caching,
        seed=e.seed,
        disable_log_stats=False,
        **extra,
    )


def structured_outputs(spec: StructuredSpec | None):
    """vLLM's form of the constraint; its engine picks the grammar backend (xgrammar first)."""
    from vllm.sampling_params import StructuredOutputsParams

    if spec is None:
        return None
    return StructuredOutputsParams(json=spec.json, json_object=spec.json_object, regex=spec.regex,
                                   choice=list(spec.choice) if spec.choice is not None else None,
                                   grammar=spec.grammar)


def sampling_params(spec: SamplingSpec, kv_transfer_params: dict | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=spec.n,
        max_tokens=spec.max_tokens,
        min_tokens=spec.min_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty,
        stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        seed=spec.seed,
        ignore_eos=spec.ignore_eos,
        logprobs=spec.logprobs,
        logit_bias=dict(spec.logit_bias) or None,
        structured_outputs=structured_outputs(spec.structured),
        prompt_logprobs=spec.prompt_logprobs,
        # Only what is new since the last output, which is exactly what we stream.
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )


def _make_stat_logger(load: EngineLoad):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is None:
                return
            load.num_running = scheduler_stats.num_running_reqs
            load.num_waiting = scheduler_stats.num_waiting_reqs
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            load.max_running_seen = max(load.max_running_seen, scheduler_stats.num_running_reqs)
            load.num_batched_steps += scheduler_stats.num_running_reqs >= 2
            load.prefix_cache_queries += scheduler_stats.prefix_cache_stats.queries
            load.prefix_cache_hits += scheduler_stats.prefix_cache_stats.hits
            load.transfers.add(scheduler_stats.kv_connector_stats)
            load.updated_unix = time.time()

        def log_engine_initialized(self):
            pass

    return LoadRecorder


def _unserved_prometheus_logger():
    """A stand-in for vLLM's PrometheusStatLogger, which records nothing.

    AsyncLLM adds vLLM's own Prometheus logger unless one of the given loggers is one (vllm/v1/
    metrics/loggers.py, StatLoggerManager). It would fill prometheus_client's default registry on
    every engine step, for nobody: a worker serves its own registry (workers/metrics.py), and its
    engine's figures through LoadRecorder. At one stream those updates were about a tenth of the
    decode worker's CPU (py-spy --gil; docs/benchmarks.md, "Against vllm serve")."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class Unserved(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None):  # registers no metric
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args, **kwargs):
            pass

        def record_sleep_state(self, *args, **kwargs):
            pass

        def record_admission_rejection(self, *args, **kwargs):
            pass

        def log_engine_initialized(self):
            pass

        def log(self):
            pass

    return Unserved


class EngineHost:
    """Owns the AsyncLLM and the event-loop thread it runs on."""

    def __init__(self, settings: Settings, extra_engine_args: dict[str, Any] | None = None):
        self.settings = settings
        self.load = EngineLoad()
        self._extra = extra_engine_args or {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._engine: AsyncLLM | None = None
        # Pinned under load, free at a stream or so; nothing to move until the engine is placed.
        self.scheduler = placement.AdaptiveScheduler([], set(), set(), 0)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        # Before the engine's processes spawn: they inherit the binding.
        os.environ.update(placement.engine_bind_env(self.settings.engine.omp_threads_bind,
                                                    moves_kv=self.settings.disagg.enabled))
        # Before the engine's processes fork: they die with this worker, however it dies.
        orphans.install()
        # This process detokenizes (the engine's output processor runs here): a resumed request's
        # text picks up where its last attempt's stopped, even inside a character.
        detok.install()
        started = time.monotonic()
        self._thread.start()
        timeout_s = self.settings.workers.engine_start_timeout_s
        try:
            self._engine = self.run(self._create()).result(timeout=timeout_s)
        except FuturesTimeout:
            raise RuntimeError(f"the engine did not start within {timeout_s:.0f}s "
                               "(workers.engine_start_timeout_s)") from None
        e = self.settings.engine
        if e.scheduler_nice or e.scheduler_on_runner_cores:
            free = os.sched_getaffinity(0)  # what the scheduler had: it inherited this process's
            placed = placement.place_scheduler(e.scheduler_nice, e.scheduler_on_runner_cores)
            if e.scheduler_on_runner_cores and placed and e.scheduler_free_max_requests:
                self._adapt_scheduler(placed, free)
        logger.info(
            "engine ready: model=%s kv_blocks=%d block_size=%d in %.1fs",
            self.settings.model.resolved_path, self.num_kv_blocks,
            self.settings.engine.block_size, time.monotonic() - started,
        )

    def _adapt_scheduler(self, placed: list[int], free: set[int]) -> None:
        e = self.settings.engine
        pinned = set.union(*(os.sched_getaffinity(pid) for pid in placed))
        pinned_nice = os.getpriority(os.PRIO_PROCESS, placed[0])
        free_nice = max(e.scheduler_nice, pinned_nice)
        if free.isdisjoint(pinned):
            # The launcher keeps this engine's cores for it (disagg.isolate_decode_cores): freed, the
            # scheduler would wait at its niceness behind a prefill engine's compute.
            logger.info("the vLLM scheduler stays pinned at every load: this worker runs off its runner's cores %s",
                        ",".join(map(str, sorted(pinned))))
            return
        if free_nice > pinned_nice and not placement.may_renice_up_to(pinned_nice):
            logger.info("the vLLM scheduler stays pinned at every load: freed at niceness %d, it could not be "
                        "brought back to %d without CAP_SYS_NICE", free_nice, pinned_nice)
            return
        self.scheduler = placement.AdaptiveScheduler(placed, pinned, free, e.scheduler_free_max_requests,
                                                     nice=(pinned_nice, free_nice))
        self._loop.call_soon_threadsafe(self._settle_later)  # idle from the start

    async def _create(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.settings, **self._extra)
        loggers = [_make_stat_logger(self.load), _unserved_prometheus_logger()]
        return AsyncLLM.from_engine_args(args, stat_loggers=loggers)

    def shutdown(self) -> None:
        if self._engine is not None:
            # Stop vLLM's output handler first: left running, it sees the engine process go away
            # and logs an EngineDeadError traceback on every clean shutdown.
            with contextlib.suppress(Exception):
                self.run(self._stop_output_handler()).result(timeout=5)
            self._engine.shutdown()
            self._engine = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _stop_output_handler(self) -> None:
        handler = getattr(self._engine, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler

    @property
    def _started(self) -> AsyncLLM:
        if self._engine is None:
            raise RuntimeError("the engine is not started")
        return self._engine

    @property
    def num_kv_blocks(self) -> int:
        return self._started.vllm_config.cache_config.num_gpu_blocks or 0

    # -- requests --------------------------------------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec,
                 kv_transfer_params: dict | None = None) -> AsyncGenerator[Any, None]:
        """vLLM RequestOutputs (deltas) for one request. Iterate it on the engine's loop (inside a
        coroutine given to ``run``); closing it early aborts the request in the engine."""
        prompt: TokensPrompt = {"prompt_token_ids": prompt_token_ids}
        return self._started.generate(prompt, sampling_params(spec, kv_transfer_params), request_id)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Around one request's life in the engine, on the engine's loop: the scheduler's
        placement follows the number held (placement.AdaptiveScheduler)."""
        self.scheduler.enter()
        try:
            yield
        finally:
            if self.scheduler.leave():
                self._settle_later()

    def _settle_later(self) -> None:
        self._loop.call_later(self.scheduler.settle_s, self.scheduler.settle)

    def run(self, coro) -> Future:
        """Runs a coroutine on the engine's event loop; the caller's thread waits on the future.

        Per-token work belongs on the loop, not on the caller's thread: handing each output to
        another thread means winning the GIL back from a busy event loop once per token, and
        CPython's GIL lets a loop that keeps doing I/O hold it for the whole request, so tokens
        would reach the client in one burst at the end.
        """
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

