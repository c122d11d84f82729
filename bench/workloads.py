"""Seeded, reproducible workloads: pure functions from (parameters, size, seed) to sessions.

A session is a list of requests sent one after another: turn t goes out once turn t-1 has
completed. Synthetic and mixed workloads are one-turn sessions of token-id prompts for
/v1/completions, so prompt lengths are exact. The multiturn workload is chat conversations whose
system prompts are shared, so later requests reuse cached prefixes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum

from bench.flags import help_text


class WorkloadKind(str, Enum):
    SYNTHETIC = "synthetic"
    MULTITURN = "multiturn"
    MIXED = "mixed"


class LengthDist(str, Enum):
    NORMAL = "normal"
    UNIFORM = "uniform"  # over mean +- std*sqrt(3), which has that std



@dataclass(frozen=True)
class WorkloadParams:
    """Every workload knob, with small defaults; the CLI's flags are generated from these fields."""

    input_len_mean: int = field(default=128, metadata=help_text("synthetic: mean prompt length, tokens"))
    input_len_std: float = field(default=32.0, metadata=help_text("synthetic: prompt length std, tokens"))
    output_len_mean: int = field(default=64, metadata=help_text("synthetic, multiturn: mean max_tokens"))
    output_len_std: float = field(default=0.0, metadata=help_text("synthetic, multiturn: max_tokens std"))
    length_dist: LengthDist = field(default=LengthDist.NORMAL, metadata=help_text("length distribution"))
    vocab_min: int = field(default=10, metadata=help_text("smallest prompt token id"))
    vocab_max: int = field(default=1500, metadata=help_text("prompt token ids are below this"))
    turns_per_session: int = field(default=3, metadata=help_text("multiturn: turns per conversation"))
    num_system_prompts: int = field(default=2, metadata=help_text("multiturn: distinct shared system prompts"))
    system_prompt_words: int = field(default=128, metadata=help_text("multiturn: system prompt length, words"))
    user_turn_words: int = field(default=16, metadata=help_text("multiturn: user message length, words"))
    hot_prefix_share: float = field(default=0.0, metadata=help_text(
        "multiturn: share of the conversations over system prompt 0 (0: every prompt in turn)"))
    long_input_len: int = field(default=1024, metadata=help_text("mixed: long-prompt length, tokens"))
    long_output_len: int = field(default=16, metadata=help_text("mixed: long-prompt max_tokens"))
    short_input_len: int = field(default=32, metadata=help_text("mixed: short-prompt length, tokens"))
    short_output_len: int = field(default=256, metadata=help_text("mixed: short-prompt max_tokens"))


@dataclass(frozen=True)
class Turn:
    """One request: token ids for /v1/completions, or the user's text for a chat turn."""

    max_tokens: int
    prompt_ids: tuple[int, ...] = ()
    user_text: str = ""


@dataclass(frozen=True)
class Session:
    session_id: int
    turns: tuple[Turn, ...]
    system_text: str = ""

    @property
    def is_chat(self) -> bool:
        return any(t.user_text for t in self.turns)

    @property
    def num_requests(self) -> int:
        return len(self.turns)


# Plain English words; the tiny model's tokenizer makes about two tokens of each.
WORDS = tuple("""
the of and to in is was that for on with as by at from it be this an are or not have had
which one all were when we there can been has more will if no out so said what up its about
into than them only other new some could time these two may first then do any like my now over
such our man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three
river stone light water village morning evening shore queue worker model token server request
""".split())


def build_workload(kind: WorkloadKind, params: WorkloadParams, num_requests: int, seed: int,
                   variant: int = 0) -> list[Session]:
    """The sessions of one workload; equal arguments give equal sessions. Each load point uses its
    own `variant`, so a point never hits prefixes that an earlier point left in the cache."""
    rng = random.Random(f"{kind.value}:{seed}:{variant}")
    if kind is WorkloadKind.SYNTHETIC:
        return synthetic(rng, params, num_requests)
    if kind is WorkloadKind.MULTITURN:
        return multiturn(rng, params, num_requests)
    return mixed(rng, params, num_requests)


def sample_lengths(rng: random.Random, mean: float, std: float, dist: LengthDist, n: int) -> list[int]:
    """n lengths of at least 1 token."""
    if dist is LengthDist.UNIFORM:
        half = std * math.sqrt(3)
        draws = [rng.uniform(mean - half, mean + half) for _ in range(n)]
    else:
        draws = [rng.gauss(mean, std) for _ in range(n)]
    return [max(1, round(x)) for x in draws]


def token_ids(rng: random.Random, length: int, params: WorkloadParams) -> tuple[int, ...]:
    return tuple(rng.randrange(params.vocab_min, params.vocab_max) for _ in range(length))


def words(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def synthetic(rng: random.Random, params: WorkloadParams, num_requests: int) -> list[Session]:
    p = params
    inputs = sample_lengths(rng, p.input_len_mean, p.input_len_std, p.length_dist, num_requests)
    outputs = sample_lengths(rng, p.output_len_mean, p.output_len_std, p.length_dist, num_requests)
    return [Session(i, (Turn(max_tokens=out, prompt_ids=token_ids(rng, inp, p)),))
            for i, (inp, out) in enumerate(zip(inputs, outputs))]


def mixed(rng: random.Random, params: WorkloadParams, num_requests: int) -> list[Session]:
    """Half long prompts with short answers, half short prompts with long answers, shuffled."""
    p = params
    shapes = ([(p.long_input_len, p.long_output_len)] * (num_requests // 2)
              + [(p.short_input_len, p.short_output_len)] * (num_requests - num_requests // 2))
    rng.shuffle(shapes)
    return [Session(i, (Turn(max_tokens=out, prompt_ids=token_ids(rng, inp, p)),))
            for i, (inp, out) in enumerate(shapes)]


def multiturn(rng: random.Random, params: WorkloadParams, num_requests: int) -> list[Session]:
    """Conversations over K shared system prompts; the last one is cut so there are exactly
    num_requests turns in all."""
    p = params
    systems = [words(rng, p.system_prompt_words) for _ in range(p.num_system_prompts)]
    outputs = sample_lengths(rng, p.output_len_mean, p.output_len_std, p.length_dist, num_requests)
    sizes = _session_sizes(num_requests, p.turns_per_session)
    prefixes = _prefix_of_sessions(rng, len(sizes), p)
    sessions, used = [], 0
    for i, size in enumerate(sizes):
        turns = tuple(Turn(max_tokens=outputs[used + t], user_text=words(rng, p.user_turn_words))
                      for t in range(size))
        sessions.append(Session(i, turns, system_text=systems[prefixes[i]]))
        used += size
    return sessions


def _prefix_of_sessions(rng: random.Random, num_sessions: int, p: WorkloadParams) -> list[int]:
    """Which system prompt each conversation uses: each in turn; or, with a hot share, prompt 0 for
    that share of the conversations, at random places, and the others in turn for the rest."""
    k = p.num_system_prompts
    if p.hot_prefix_share <= 0 or k < 2:
        return [i % k for i in range(num_sessions)]
    num_hot = round(p.hot_prefix_share * num_sessions)
    order = [0] * num_hot + [1 + j % (k - 1) for j in range(num_sessions - num_hot)]
    rng.shuffle(order)
    return order


def _session_sizes(num_requests: int, turns_per_session: int) -> list[int]:
    full, rest = divmod(num_requests, turns_per_session)
    return [turns_per_session] * full + ([rest] if rest else [])


def poisson_arrivals(rate_per_s: float, n: int, seed: int) -> list[float]:
    """n arrival times in seconds from 0, with exponential gaps of mean 1/rate; the first is 0."""
    rng = random.Random(f"arrivals:{seed}:{rate_per_s}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times
