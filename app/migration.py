"""Migration: a request whose worker dies goes on on another worker, and its client sees no error.

The design
----------
Each sub-request (one prompt of a request) is a series of **attempts**. Attempt 0 carries the
sub-request's own id; attempt k the id ``<id>-m<k>``. Each attempt so has its own output stream,
cancel flag and claim, and one grep for the id still finds every line about the request. The
frontend reads only the current attempt's stream.

**Detection** (app/gateway.py, every ``POLL_INTERVAL_S``). An attempt's worker is lost when its
lease is gone or belongs to another process (a replacement under the same name): the launcher
drops a dead child's lease at once, and a worker nobody supervises lets it lapse after
``workers.lease_s``. A worker whose engine died says so (a Failed event of type
``engine_unavailable``). The frontend watches the worker that accepted the attempt; before that,
the worker the router chose (its Routed event); before that, the workers that may hold the
message (the routers, or in queue mode the decode workers, live when it was sent).

**Migration.** When the worker that accepted or was routed an attempt is lost, the frontend

1. sets the abandoned attempt's cancel flag: a worker that finds its message later (the dead
   worker's replacement reads the same own queue) drops it unrun, and a worker that was only
   thought dead stops it within half a second;
2. stops reading that attempt's stream, so what the client has is exactly the tokens read so far;
3. sends a new attempt whose prompt is the original prompt plus those tokens, with ``max_tokens``
   and ``min_tokens`` less what was received, the same deadline, and the lost worker in
   ``exclude_workers``, through the router when there is one.

No token repeats and none goes missing, since the resumed prompt holds exactly the tokens the
client got; usage counts the original prompt and every token the client got. A worker's lost
worker is excluded only while that same process may still look alive (its lease, or the router's
view of it, lags): a replacement with the same name is a new process and may take the request.

**Queued work.** An attempt the router sent to a worker that is lost before it accepts is
re-routed at once (a new attempt, counted as a migration), not left for the worker's replacement.
An attempt with no Accepted yet whose possible holders lost a worker (queue mode: a decode worker,
which may have prefetched it; router mode: a router, which may have died while routing it) is sent
again under the same id. That costs no migration: a worker accepts a request by claiming its id
atomically with its Accepted (workers/outputs.py), so whichever copy runs second is dropped.

**Waiting for a worker.** A request that must move but finds no live worker to take it (every
decode worker is lost or excluded, or no router lives) waits for one, at most
``frontend.first_token_timeout_s`` from the moment it had to move and never past
``frontend.request_timeout_s``; then the client gets a 503 naming why. Each new attempt in turn
has ``first_token_timeout_s`` to be accepted.

**Exactness.** Resuming from the tokens so far gives exactly what the dead worker would have
given when each token depends only on the text before it: temperature 0 (greedy), and at any
temperature top-p, top-k, min-p and the repetition penalty, which vLLM applies to prompt and
output tokens alike. Some features carry state that the tokens do not, and a request using one is
refused with a 503 once it has tokens, rather than given a silently different answer
(``unresumable``): a ``seed`` (the generator's state), presence and frequency penalties (vLLM
counts only the tokens the engine itself generated), stop strings (matched on the engine's own
output text, which holds back a string's possible start), and ``n`` > 1 (several choices cannot
continue as one request). With no token received yet, a request is always resubmitted whole.

"The very tokens" holds to the precision of the engine's arithmetic: the new attempt computes
the tokens so far in one prefill, where the old one computed them one decode step at a time. The
sums run in another order, so in bfloat16 a greedy choice between two nearly equal logits can go
the other way after the move (the random-weight test model has many); tests/test_migration.py
runs its engines in float32.

The text is the engine's own detokenization of each attempt. The decode worker's detokenizer
starts a resumed attempt where the last one stopped, even inside a character or a run of bytes
that is not valid UTF-8 (workers/detok.py), so the text is the same as without the move.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from tasks.messages import Delta, GenerateRequest, SamplingSpec
from tasks.registry import WorkerStatus

# Why a request moved, as logged and counted (llmq_frontend_migrations_total{reason}).
WORKER_LOST = "worker_lost"  # the worker that accepted it lost its lease
ENGINE_DIED = "engine_died"  # that worker reported its engine dead
ROUTED_TO_LOST = "routed_to_lost_worker"  # routed to a worker that was lost before it accepted
# Sentinel failed Redis over while the attempt ran: its stream, its queued message or its last
# entries may not have reached the new master (replication is asynchronous), so the attempt
# cannot be trusted to end. Its worker is fine and is not excluded.
REDIS_FAILOVER = "redis_failover"


class CannotMigrate(Exception):
    """The request must move but may not: over ``frontend.max_migrations``, or it cannot be
    resumed exactly. The message says which, for the client."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message = message
        self.reason = reason  # "limit" or "unresumable", for the metrics


@dataclass(frozen=True)
class LostWorker:
    worker_id: str
    pid: int | None  # the process that was lost; None if the frontend never saw its lease


def is_lost(worker_id: str, pid: int | None, live: Mapping[str, WorkerStatus]) -> bool:
    """Whether that worker's process no longer holds a lease: none under its name, or the lease
    of another process (its replacement)."""
    status = live.get(worker_id)
    return status is None or (pid is not None and status.pid != pid)


def attempt_id(base_id: str, attempt: int) -> str:
    return base_id if attempt == 0 else f"{base_id}-m{attempt}"


def unresumable(spec: SamplingSpec, num_received: int) -> str | None:
    """Why a request that has received ``num_received`` tokens cannot continue exactly on
    another worker, or None if it can."""
    if num_received == 0:
        return None
    if spec.n > 1:
        return f"it asks for n={spec.n} choices, which cannot continue as one request"
    if spec.seed is not None and spec.temperature > 0:
        return "it sets a seed, and a seeded sample cannot be continued from its middle"
    if spec.presence_penalty or spec.frequency_penalty:
        return ("presence_penalty and frequency_penalty count only the tokens an engine generated "
                "itself, not those it is given back")
    if spec.stop:
        return "stop strings are matched on the engine's own output text, which a new engine would not have"
    if spec.structured is not None:
        return ("its output is constrained (response_format, structured_outputs or tool_choice), and a new "
                "engine's grammar would start again from the beginning of the output, not its middle")
    return None


def resumed(original: GenerateRequest, tokens: list[int], request_id: str, exclude: list[str]) -> GenerateRequest:
    """The request that continues ``original`` after the tokens already received: those tokens
    appended to the prompt, and the output budget less them."""
    spec = original.sampling
    if tokens:
        spec = msgspec.structs.replace(spec, max_tokens=spec.max_tokens - len(tokens),
                                       min_tokens=max(0, spec.min_tokens - len(tokens)))
    return msgspec.structs.replace(original, request_id=request_id,
                                   prompt_token_ids=original.prompt_token_ids + tokens,
                                   sampling=spec, prefix_hit_tokens=0, exclude_workers=exclude)


@dataclass
class Attempts:
    """One sub-request's attempts: what it has received, which workers it lost, and the message
    its next attempt sends. Pure: app/gateway.py does the I/O."""

    first: GenerateRequest
    max_migrations: int
    request: GenerateRequest = field(init=False)  # the current attempt's message
    attempt: int = 0
    migrations: int = 0
    lost: list[LostWorker] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)  # by choice index
    finished_choices: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.request = self.first

    @property
    def base_id(self) -> str:
        return self.first.request_id

    @property
    def num_received(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    @property
    def complete(self) -> bool:
        """Every choice has its last token: nothing is left to resume, even if the worker died
        before it wrote Finished."""
        n = self.first.sampling.n
        return len(self.finished_choices) >= n or (n == 1 and self.num_received >= self.first.sampling.max_tokens)

    def record(self, delta: Delta) -> None:
        self.tokens.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finished_choices.add(delta.index)

    def lose(self, worker_id: str, pid: int | None) -> None:
        """The current attempt's worker is lost. Raises CannotMigrate if the request may not move."""
        self.lost.append(LostWorker(worker_id, pid))
        self.move(f"worker {worker_id} was lost")

    def move(self, what: str) -> None:
        """The current attempt is abandoned because ``what`` happened; the next one resumes it.
        Raises CannotMigrate if the request may not move."""
        if self.migrations >= self.max_migrations:
            raise CannotMigrate(
                f"{what} while serving the request, which had already moved "
                f"{self.migrations} time(s), the limit (frontend.max_migrations); retry it", "limit")
        why = unresumable(self.first.sampling, self.num_received)
        if why is not None:
            raise CannotMigrate(
                f"{what} after {self.num_received} token(s), and the request could not "
                f"be resumed on another attempt: {why}; retry it", "unresumable")
        self.migrations += 1

    def exclusions(self, live: Mapping[str, WorkerStatus]) -> list[str]:
        """The lost workers that a router could still take for live: those whose name holds no
        lease of another process (a replacement) yet."""
        return sorted({w.worker_id for w in self.lost
                       if w.worker_id not in live or w.pid is None or live[w.worker_id].pid == w.pid})

    def has_candidate(self, live: Mapping[str, WorkerStatus]) -> bool:
        excluded = set(self.exclusions(live))
        return any(s.role == "decode" and w not in excluded for w, s in live.items())

    def next_attempt(self, live: Mapping[str, WorkerStatus]) -> GenerateRequest:
        """The message of a new attempt, which becomes the current one."""
        self.attempt += 1
        tokens = self.tokens.get(0, []) if self.num_received else []
        self.request = resumed(self.first, list(tokens), attempt_id(self.base_id, self.attempt), self.exclusions(live))
        return self.request
