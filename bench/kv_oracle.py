"""What prefix-cache hit rate a router could get on a multiturn workload, by simulation: the
oracle that `bench kv-routing` holds the kv router to, and the working set that sizes the caches.

Blocks are named by what they hold, not hashed. A system prompt's first `shared_tokens //
block_size` blocks belong to the prompt, the same in every conversation over it; every later full
block of a prompt belongs to its conversation, the same at every later turn, because each turn's
rendered prompt is a token prefix of the next one (the chat template renders the earlier turns
alike). Answers' own blocks are not counted: the server retokenizes an answer's text, which need
not give back the tokens the engine generated and cached.

Each worker is an LRU of `capacity_blocks` blocks. A request hits the leading blocks its worker
holds, in a row, at most (prompt_tokens - 1) // block_size of them (vLLM computes at least the
prompt's last token); then all its full blocks become the most recent. The real engines hold fewer
blocks than that for reuse: the requests running on them pin theirs. So the oracle is a bound a
router can approach, not a rate it must reach.

Policies (which worker each request goes to):
- `pinned`, the oracle: a conversation goes to the worker that first saw its system prompt; a
  system prompt not seen before goes to the worker with the fewest system prompts so far;
- `round-robin`: request i, in the order sent, to worker i mod n, as the router's round-robin does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One turn, as sent: its conversation, its system prompt, and its prompt's length."""

    conversation: int
    prefix: int
    prompt_tokens: int


@dataclass(frozen=True)
class Blocks:
    """How a workload's prompts split into named blocks."""

    block_size: int
    shared_tokens: dict[int, int]  # per system prompt: the tokens every conversation over it shares

    def of(self, r: Request) -> list[Hashable]:
        """The request's full prompt blocks, in order."""
        shared = min(self.shared_tokens[r.prefix], r.prompt_tokens) // self.block_size
        full = r.prompt_tokens // self.block_size
        return [("p", r.prefix, i) for i in range(shared)] + [("c", r.conversation, i) for i in range(shared, full)]

    def max_hit(self, r: Request) -> int:
        return (r.prompt_tokens - 1) // self.block_size


class Lru:
    """One worker's cache: block names, least recently used first."""

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[Hashable, None] = OrderedDict()

    def hits(self, blocks: Sequence[Hashable], limit: int) -> int:
        n = 0
        for b in blocks[:limit]:
            if b not in self._blocks:
                break
            n += 1
        return n

    def touch(self, blocks: Sequence[Hashable]) -> None:
        for b in blocks:
            self._blocks[b] = None
            self._blocks.move_to_end(b)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)


Policy = Callable[[int, Request], int]  # (request's position, request) -> worker


def pinned(num_workers: int) -> Policy:
    """The oracle's placement: a system prompt stays on the worker that first saw it."""
    owner: dict[int, int] = {}
    count = [0] * num_workers

    def place(_: int, r: Request) -> int:
        if r.prefix not in owner:
            owner[r.prefix] = min(range(num_workers), key=lambda w: (count[w], w))
            count[owner[r.prefix]] += 1
        return owner[r.prefix]

    return place


def round_robin(num_workers: int) -> Policy:
    return lambda i, _: i % num_workers


@dataclass
class Outcome:
    """A simulation's totals, in tokens as vLLM counts them (hit blocks x block size)."""

    prompt_tokens: int = 0
    hit_tokens: int = 0
    requests_per_worker: list[int] = field(default_factory=list)
    prefill_tokens_per_worker: list[int] = field(default_factory=list)  # prompt tokens not hit

    @property
    def hit_rate(self) -> float | None:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else None


def simulate(requests: Sequence[Request], blocks: Blocks, num_workers: int, capacity_blocks: int,
             policy: Policy) -> Outcome:
    caches = [Lru(capacity_blocks) for _ in range(num_workers)]
    out = Outcome(requests_per_worker=[0] * num_workers, prefill_tokens_per_worker=[0] * num_workers)
    for i, r in enumerate(requests):
        worker = policy(i, r)
        names = blocks.of(r)
        hit = caches[worker].hits(names, blocks.max_hit(r)) * blocks.block_size
        caches[worker].touch(names)
        out.prompt_tokens += r.prompt_tokens
        out.hit_tokens += hit
        out.requests_per_worker[worker] += 1
        out.prefill_tokens_per_worker[worker] += r.prompt_tokens - hit
    return out


@dataclass(frozen=True)
class WorkingSet:
    """Blocks that were used and will be used again (by any worker), after each request in turn:
    what a cache must hold for every reuse to hit."""

    mean_blocks: float
    peak_blocks: int
    shared_blocks: int  # of which system prompts' blocks, all of them

    @classmethod
    def of(cls, requests: Sequence[Request], blocks: Blocks) -> WorkingSet:
        names = [blocks.of(r) for r in requests]
        last_use: dict[Hashable, int] = {}
        for i, ns in enumerate(names):
            for b in ns:
                last_use[b] = i
        live: set[Hashable] = set()
        sizes = []
        for i, ns in enumerate(names):
            live.update(b for b in ns if last_use[b] > i)
            live.difference_update([b for b in ns if last_use[b] == i])
            sizes.append(len(live))
        shared = sum(tokens // blocks.block_size for tokens in blocks.shared_tokens.values())
        return cls(sum(sizes) / len(sizes) if sizes else 0.0, max(sizes, default=0), shared)
