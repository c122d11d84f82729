"""The harness's typed records, one home for each: targets, load points, per-request results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class LoadMode(str, Enum):
    CLOSED = "closed"  # a fixed number of sessions in flight; the next starts when one finishes
    OPEN = "open"  # sessions start at Poisson arrival times, whatever is in flight


@dataclass(frozen=True)
class Target:
    """One OpenAI-compatible endpoint under test."""

    label: str
    base_url: str
    model: str


@dataclass(frozen=True)
class LoadPoint:
    """One level of offered load: a concurrency (closed loop) or an arrival rate (open loop)."""

    mode: LoadMode
    value: float

    @property
    def label(self) -> str:
        if self.mode is LoadMode.CLOSED:
            return f"c={self.concurrency}"
        return f"rate={self.value:g}/s"

    @property
    def concurrency(self) -> int:
        return int(self.value)


@dataclass(frozen=True)
class Slo:
    """Service-level objective for goodput: both must hold for a request to count."""

    ttft_ms: float
    itl_ms: float  # compared with the request's mean inter-token time (TPOT)


@dataclass
class RequestRecord:
    """What one request did. Times are seconds since its load point started; `None` = never seen."""

    target: str
    load: str
    session_id: int
    turn: int
    max_tokens: int
    ok: bool
    error: str = ""
    start_s: float | None = None
    end_s: float | None = None
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    num_chunks: int = 0
    usage_reported: bool = False

    @property
    def e2e_ms(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return (self.end_s - self.start_s) * 1000

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        if self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        """A JSON body with times rounded to a microsecond."""
        body = {**asdict(self), "e2e_ms": self.e2e_ms, "tpot_ms": self.tpot_ms}
        for key in ("start_s", "end_s"):
            body[key] = _round(body[key], 6)
        for key in ("ttft_ms", "e2e_ms", "tpot_ms"):
            body[key] = _round(body[key], 3)
        body["itl_ms"] = [round(gap, 3) for gap in self.itl_ms]
        return body

    @classmethod
    def from_json(cls, body: dict) -> RequestRecord:
        derived = ("e2e_ms", "tpot_ms")
        return cls(**{k: v for k, v in body.items() if k not in derived})


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
