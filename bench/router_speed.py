"""How fast the router decides and applies KV events: `python -m bench router-speed`.

Pure Python against router.index.RadixIndex and router.policy, no servers. A synthetic cache
state shaped like a multi-tenant chat service: many system prompts ("trunks") shared by many
conversations ("branches"), each conversation cached on one or two of the workers, reported as
vLLM reports it (a BlockStored of the whole sequence the first time a worker sees a trunk, and of
the new blocks only, chained to the trunk's last block, after that). Then:

- decision time, p50/p99, for prompts of realistic length: hashing the prompt's blocks and
  walking the tree (index.overlaps), then building the candidates and choosing (policy.choose);
- KV events per second: index.store and index.remove, and KvEvents.apply fed with events
  decoded from their wire bytes (tasks.messages), as the router reads them from Redis;
- optionally (--redis-db 1-5), RouterService.decide end to end against a real Redis: the lease
  read (cached), the XREAD catch-up and the hit counters cost round trips.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.flags import help_text
from bench.scenario import MachineState, fmt, table, write_json
from bench.stats import Distribution
from router.index import RadixIndex, block_keys
from router.policy import Candidate, choose, cost
from tasks.messages import KvEvent, decode_kv_event, encode_kv_event

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class RouterSpeedSpec:
    """The scenario's knobs; `python -m bench router-speed`'s flags are generated from these."""

    num_blocks: int = field(default=100_000, metadata=help_text("distinct blocks in the index (tree nodes)"))
    num_workers: int = field(default=8, metadata=help_text("workers the blocks are spread over"))
    block_size: int = field(default=32, metadata=help_text("tokens per block"))
    num_trunks: int = field(default=200, metadata=help_text("shared system prompts"))
    trunk_blocks: int = field(default=24, metadata=help_text("blocks per system prompt (24 x 32 = 768 tokens)"))
    branch_blocks_max: int = field(default=40, metadata=help_text("a conversation adds 4..this many blocks"))
    replicas_max: int = field(default=2, metadata=help_text("each conversation is cached on 1..this many workers"))
    prompt_tokens: str = field(default="1024,2048", metadata=help_text("prompt lengths to time decisions for"))
    num_decisions: int = field(default=3000, metadata=help_text("decisions timed per prompt length"))
    overlap_weight: float = field(default=4.0, metadata=help_text("policy weight (configs/agg_router.yaml)"))
    vocab: int = field(default=32000, metadata=help_text("token ids are below this"))
    seed: int = field(default=0, metadata=help_text("seed for the cache state and the prompts"))
    redis_db: int = field(default=0,
                          metadata=help_text("1-5: also time the router's decision on this Redis db; 0: skip"))


# -- the synthetic cache state ---------------------------------------------------------------------


@dataclass
class Conversation:
    trunk: int
    token_ids: list[int]


@dataclass
class CacheModel:
    """Events that build the index, and the conversations behind them (to draw prompts from)."""

    trunks: list[list[int]]
    conversations: list[Conversation]
    events: list[KvEvent]


def _hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Stand-in engine hashes: the router's own chained keys (any unique, chained id will do)."""
    return [key for key, _ in block_keys(token_ids, block_size)]


def build_cache_model(spec: RouterSpeedSpec) -> CacheModel:
    """Adds conversations until the tree has spec.num_blocks distinct blocks."""
    rng = random.Random(f"router-speed:{spec.seed}")
    bs = spec.block_size
    tokens = lambda n: [rng.randrange(spec.vocab) for _ in range(n)]  # noqa: E731
    trunks = [tokens(spec.trunk_blocks * bs) for _ in range(spec.num_trunks)]
    workers = [f"decode{i}@bench" for i in range(spec.num_workers)]
    held: set[tuple[str, int]] = set()  # (worker, trunk) pairs already cached
    seen_trunks: set[int] = set()
    conversations, events, num_blocks = [], [], 0
    while num_blocks < spec.num_blocks:
        t = rng.randrange(spec.num_trunks)
        branch = tokens(rng.randint(4, spec.branch_blocks_max) * bs)
        full = trunks[t] + branch
        hashes = _hashes(full, bs)
        num_blocks += len(branch) // bs + (0 if t in seen_trunks else spec.trunk_blocks)
        seen_trunks.add(t)
        conversations.append(Conversation(t, full))
        for w in rng.sample(workers, rng.randint(1, spec.replicas_max)):
            if (w, t) in held:
                events.append(KvEvent(w, "stored", hashes[spec.trunk_blocks:], hashes[spec.trunk_blocks - 1],
                                      branch, bs))
            else:
                events.append(KvEvent(w, "stored", hashes, None, full, bs))
                held.add((w, t))
    return CacheModel(trunks, conversations, events)


def make_prompts(model: CacheModel, spec: RouterSpeedSpec, length: int, n: int) -> list[list[int]]:
    """Half continue a cached conversation, a quarter start a new one on a cached system prompt,
    a quarter share nothing; each is cut or padded with fresh tokens to `length`."""
    rng = random.Random(f"prompts:{spec.seed}:{length}")
    prompts = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 1):
            base = rng.choice(model.conversations).token_ids
        elif kind == 2:
            base = rng.choice(model.trunks)
        else:
            base = []
        prefix = base[:length]
        prompts.append(prefix + [rng.randrange(spec.vocab) for _ in range(length - len(prefix))])
    rng.shuffle(prompts)
    return prompts


# -- timing ----------------------------------------------------------------------------------------


def timed_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, this thread's CPU ms) of one call. On a shared machine the CPU time is the
    steadier figure: it leaves out the time the thread waited for a core."""
    wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return (time.perf_counter_ns() - wall) / 1e6, (time.thread_time_ns() - cpu) / 1e6


def _distributions(samples: list[tuple[float, float]]) -> dict:
    return {"wall": asdict(Distribution.of([w for w, _ in samples])),
            "cpu": asdict(Distribution.of([c for _, c in samples]))}


@dataclass(frozen=True)
class Rate:
    """Events applied in `seconds` of wall time, of which `cpu_seconds` on this thread."""

    num_events: int
    num_blocks: int
    seconds: float
    cpu_seconds: float

    @property
    def events_per_s(self) -> float:
        return self.num_events / self.seconds if self.seconds else 0.0

    @property
    def blocks_per_s(self) -> float:
        return self.num_blocks / self.seconds if self.seconds else 0.0

    @property
    def events_per_cpu_s(self) -> float:
        return self.num_events / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def blocks_per_cpu_s(self) -> float:
        return self.num_blocks / self.cpu_seconds if self.cpu_seconds else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "events_per_s": self.events_per_s, "blocks_per_s": self.blocks_per_s,
                "events_per_cpu_s": self.events_per_cpu_s, "blocks_per_cpu_s": self.blocks_per_cpu_s}


class _Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def rate(self, num_events: int, num_blocks: int) -> Rate:
        return Rate(num_events, num_blocks, time.perf_counter() - self.wall, time.thread_time() - self.cpu)


def one_block_each(events: list[KvEvent]) -> list[KvEvent]:
    """The same blocks as one BlockStored per block, chained, as decoding reports them (a block
    fills every block_size tokens)."""
    split = []
    for e in events:
        parent = e.parent_hash
        for i, engine_hash in enumerate(e.block_hashes):
            tokens = e.token_ids[i * e.block_size:(i + 1) * e.block_size]
            split.append(KvEvent(e.worker_id, "stored", [engine_hash], parent, tokens, e.block_size))
            parent = engine_hash
    return split


def apply_store(index: RadixIndex, events: list[KvEvent]) -> Rate:
    clock = _Clock()
    blocks = sum(index.store(e.worker_id, e.block_hashes, e.parent_hash, e.token_ids) for e in events)
    return clock.rate(len(events), blocks)


def removal_events(index: RadixIndex, rng: random.Random, n: int, max_blocks: int = 4) -> list[KvEvent]:
    """n evictions of 1..max_blocks blocks each, taken from the workers in turn. The stand-in
    engine hashes are the index's own keys, so blocks_of() gives them."""
    pools = {w: sorted(index.blocks_of(w)) for w in sorted(index.workers())}
    for pool in pools.values():
        rng.shuffle(pool)
    events: list[KvEvent] = []
    while len(events) < n and any(pools.values()):
        for worker, pool in pools.items():
            if pool and len(events) < n:
                k = rng.randint(1, max_blocks)
                events.append(KvEvent(worker, "removed", pool[:k]))
                del pool[:k]
    return events


def apply_remove(index: RadixIndex, events: list[KvEvent]) -> Rate:
    clock = _Clock()
    blocks = sum(index.remove(e.worker_id, e.block_hashes) for e in events)
    return clock.rate(len(events), blocks)


def apply_wire(events: list[KvEvent], block_size: int) -> Rate:
    """decode_kv_event + KvEvents.apply, from the bytes the router reads from Redis."""
    service = _service(block_size, client=None)
    raw = [encode_kv_event(e) for e in events]
    clock = _Clock()
    for body in raw:
        service.events.apply(decode_kv_event(body))
    return clock.rate(len(raw), sum(len(e.block_hashes) for e in events))


def _service(block_size: int, client, overlap_weight: float = 4.0):
    from config import load_settings
    from router.service import RouterService

    settings = load_settings(Path(__file__).resolve().parent.parent / "configs" / "agg_router.yaml",
                             [f"engine.block_size={block_size}", f"router.overlap_weight={overlap_weight}"],
                             environ={})
    return RouterService(settings, client, rng=random.Random(0))


@dataclass(frozen=True)
class FakeLoad:
    kv_blocks_used: int
    num_requests: int


def decide_once(index: RadixIndex, prompt: list[int], loads: dict[str, FakeLoad], weight: float,
                rng: random.Random) -> Candidate:
    """What RouterService.decide does between its Redis round trips, for the kv mode."""
    overlaps = index.overlaps(prompt)
    prompt_blocks = index.num_prompt_blocks(prompt)
    candidates = []
    for worker, load in loads.items():
        overlap = overlaps.get(worker, 0)
        prefill = prompt_blocks - overlap
        candidates.append(Candidate(worker, overlap, prefill, load.kv_blocks_used, load.num_requests,
                                    cost(prefill, load.kv_blocks_used, weight)))
    return choose(candidates, 0.0, rng)


def time_decisions(index: RadixIndex, prompts: list[list[int]], spec: RouterSpeedSpec) -> dict:
    rng = random.Random(spec.seed)
    loads = {w: FakeLoad(rng.randrange(0, 2000), rng.randrange(0, 32)) for w in sorted(index.workers())}
    hashing = [timed_ms(lambda p=p: list(block_keys(p, spec.block_size))) for p in prompts]
    walks = [timed_ms(lambda p=p: index.overlaps(p)) for p in prompts]
    decisions = [timed_ms(lambda p=p: decide_once(index, p, loads, spec.overlap_weight, rng)) for p in prompts]
    hits = [max(index.overlaps(p).values(), default=0) for p in prompts]
    return {"hash_blocks_ms": _distributions(hashing), "overlaps_ms": _distributions(walks),
            "decide_ms": _distributions(decisions), "num_prompts": len(prompts),
            "mean_best_overlap_blocks": sum(hits) / len(hits) if hits else 0.0}


def time_service_decide(index: RadixIndex, prompts: list[list[int]], spec: RouterSpeedSpec) -> dict:
    """RouterService.decide against a real Redis database, with fake leases for the workers."""
    import redis

    from bench.deploy import redis_url_for
    from tasks.registry import WorkerStatus, renew_lease

    client = redis.Redis.from_url(redis_url_for(spec.redis_db))
    client.flushdb()

    def heartbeat() -> None:  # as workers renew their leases, which settles the router's bookings
        now = time.time()
        for w in sorted(index.workers()):
            renew_lease(client, WorkerStatus(w, "decode", ["decode"], "bench", 0, now, now), lease_s=600)

    try:
        heartbeat()
        service = _service(spec.block_size, client, spec.overlap_weight)
        service.shared.index = index
        service.members.refresh()
        times = []
        for i, p in enumerate(prompts):
            if i % 100 == 0:
                heartbeat()  # not timed
            times.append(timed_ms(lambda p=p: service.decide(p)))
        return {"redis_db": spec.redis_db, "decide_ms": _distributions(times), "num_prompts": len(prompts)}
    finally:
        client.flushdb()


# -- the scenario ----------------------------------------------------------------------------------


def run(spec: RouterSpeedSpec, out: Path) -> Path:
    machine = MachineState.now()
    began = time.perf_counter()
    model = build_cache_model(spec)
    index = RadixIndex(spec.block_size)
    store = apply_store(index, model.events)
    state = {"num_nodes": index.num_blocks, "num_worker_blocks": sum(index.blocks_per_worker().values()),
             "num_store_events": len(model.events), "num_conversations": len(model.conversations),
             "blocks_per_worker": index.blocks_per_worker()}
    logger.info("index: %d blocks, %d (worker, block) pairs, from %d events in %.2f s", state["num_nodes"],
                state["num_worker_blocks"], store.num_events, store.seconds)
    decisions = {}
    for length in (int(x) for x in spec.prompt_tokens.split(",")):
        prompts = make_prompts(model, spec, length, spec.num_decisions)
        decisions[str(length)] = time_decisions(index, prompts, spec)
        if spec.redis_db:
            decisions[str(length)]["service"] = time_service_decide(index, prompts, spec)
    single = apply_store(RadixIndex(spec.block_size), one_block_each(model.events))
    wire = apply_wire(model.events, spec.block_size)
    removals = removal_events(index, random.Random(spec.seed), n=20_000)
    remove = apply_remove(index, removals)
    body = {"scenario": "router-speed", "spec": asdict(spec), "machine": asdict(machine), "index": state,
            "decisions": decisions, "store": store.to_json(), "store_one_block_each": single.to_json(),
            "wire_apply": wire.to_json(),
            "remove": remove.to_json(), "wall_s": time.perf_counter() - began}
    write_json(out / "results.json", body)
    path = out / "report.md"
    path.write_text(markdown(body))
    return path


def markdown(body: dict) -> str:
    spec, state, m = body["spec"], body["index"], body["machine"]
    lines = ["# Router speed: decisions and KV events, no servers", "",
             f"- ran {m['at']}; load average (1/5/15 min) {m['load_1m']:.2f} / {m['load_5m']:.2f} / "
             f"{m['load_15m']:.2f}; one Python thread; took {body['wall_s']:.0f} s",
             f"- index: {state['num_nodes']:,} distinct blocks of {spec['block_size']} tokens "
             f"({state['num_worker_blocks']:,} (worker, block) pairs) over {spec['num_workers']} workers, "
             f"from {state['num_conversations']:,} conversations on {spec['num_trunks']} system prompts of "
             f"{spec['trunk_blocks']} blocks, each cached on 1-{spec['replicas_max']} workers",
             "- prompts: half continue a cached conversation, a quarter start on a cached system prompt, a quarter "
             "share nothing",
             "- wall = elapsed time; CPU = this thread's CPU time (leaves out waiting for a core on a shared "
             "machine, so it is the steadier figure)", "",
             "## Decision time (ms)", ""]
    rows = []
    for length, d in body["decisions"].items():
        steps = [("hash the prompt's blocks", d["hash_blocks_ms"]), ("index.overlaps (hash + walk)", d["overlaps_ms"]),
                 ("overlaps + candidates + choose", d["decide_ms"])]
        if "service" in d:
            steps.append((f"RouterService.decide, Redis db {d['service']['redis_db']}", d["service"]["decide_ms"]))
        for name, dist in steps:
            w, c = dist["wall"], dist["cpu"]
            rows.append([length, name, fmt(c["p50"], 3), fmt(c["p99"], 3), fmt(w["p50"], 3), fmt(w["p99"], 3)])
    lines += table(["prompt tokens", "step", "CPU p50", "CPU p99", "wall p50", "wall p99"], rows, align="llrrrr")
    lines += ["Mean best overlap: " + ", ".join(f"{k} tokens: {d['mean_best_overlap_blocks']:.1f} blocks"
                                                for k, d in body["decisions"].items()), "",
              "## KV events applied per second", ""]
    rows = [[name, f"{r['num_events']:,}", f"{r['num_blocks']:,}", fmt(r["events_per_cpu_s"], 0),
             fmt(r["blocks_per_cpu_s"], 0), fmt(r["events_per_s"], 0), fmt(r["blocks_per_s"], 0)]
            for name, r in (("index.store (BlockStored of a whole prefill)", body["store"]),
                            ("index.store (one block per event, as in decoding)", body["store_one_block_each"]),
                            ("decode_kv_event + KvEvents.apply (stored)", body["wire_apply"]),
                            ("index.remove (BlockRemoved, 1-4 blocks)", body["remove"]))]
    lines += table(["path", "events", "blocks", "events per CPU s", "blocks per CPU s", "events per wall s",
                    "blocks per wall s"], rows)
    return "\n".join(lines)
