"""Percentiles, per-load-point summaries and target-vs-baseline comparisons. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.records import LoadPoint, RequestRecord, Slo

QUANTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are there; None when none is."""
    return percentile([v for v in values if v is not None], 50)


@dataclass(frozen=True)
class Distribution:
    """Percentiles and mean of one latency, in ms; all `None` when nothing was measured."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        mean = sum(values) / len(values) if values else None
        p50, p90, p99 = (percentile(values, q) for q in QUANTILES)
        return cls(len(values), mean, p50, p90, p99)


@dataclass(frozen=True)
class Summary:
    """One target at one load point."""

    target: str
    load: str
    load_value: float
    num_requests: int
    num_ok: int
    num_errors: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    output_tok_per_s: float
    req_per_s: float
    num_good: int | None
    goodput_req_per_s: float | None
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """Succeeded, first token within slo.ttft_ms, and mean inter-token time within slo.itl_ms."""
    if not record.ok or record.ttft_ms is None or record.ttft_ms > slo.ttft_ms:
        return False
    return record.tpot_ms is None or record.tpot_ms <= slo.itl_ms


def duration_s(records: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last one finished."""
    starts = [r.start_s for r in records if r.start_s is not None]
    ends = [r.end_s for r in records if r.end_s is not None]
    if not starts or not ends:
        return 0.0
    return max(ends) - min(starts)


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def summarize(target: str, point: LoadPoint, records: Sequence[RequestRecord], slo: Slo | None) -> Summary:
    ok = [r for r in records if r.ok]
    seconds = duration_s(records)
    output_tokens = sum(r.output_tokens for r in ok)
    num_good = sum(meets_slo(r, slo) for r in ok) if slo else None
    return Summary(
        target=target, load=point.label, load_value=point.value,
        num_requests=len(records), num_ok=len(ok), num_errors=len(records) - len(ok),
        duration_s=seconds,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        output_tokens=output_tokens,
        cached_tokens=sum(r.cached_tokens for r in ok),
        output_tok_per_s=_rate(output_tokens, seconds),
        req_per_s=_rate(len(ok), seconds),
        num_good=num_good,
        goodput_req_per_s=None if num_good is None else _rate(num_good, seconds),
        ttft_ms=Distribution.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        itl_ms=Distribution.of([gap for r in ok for gap in r.itl_ms]),
        tpot_ms=Distribution.of([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        e2e_ms=Distribution.of([r.e2e_ms for r in ok if r.e2e_ms is not None]),
    )


# -- comparisons against a baseline ----------------------------------------------------------


def ratio(ours: float | None, base: float | None) -> float | None:
    if ours is None or base is None or base == 0:
        return None
    return ours / base


def difference(ours: float | None, base: float | None) -> float | None:
    if ours is None or base is None:
        return None
    return ours - base


@dataclass(frozen=True)
class PointComparison:
    """One target against the baseline at one load point."""

    target: str
    baseline: str
    load: str
    tok_per_s_ratio: float | None
    ttft_p50_diff_ms: float | None
    itl_p50_ratio: float | None
    tpot_p50_ratio: float | None


@dataclass(frozen=True)
class Headline:
    """The headline numbers: throughput at saturation (best output tok/s over the load points), and
    TTFT p50, ITL p50 and TPOT p50 at the lowest load point both targets ran."""

    target: str
    baseline: str
    saturation_tok_per_s: float
    baseline_saturation_tok_per_s: float
    throughput_ratio: float | None
    low_load: str
    ttft_p50_diff_ms: float | None
    itl_p50_ratio: float | None
    tpot_p50_ratio: float | None
    saturation_load: str = ""  # the load point of our best tok/s


def _by_target(summaries: Sequence[Summary], target: str) -> list[Summary]:
    return sorted((s for s in summaries if s.target == target), key=lambda s: s.load_value)


def compare_points(summaries: Sequence[Summary], target: str, baseline: str) -> list[PointComparison]:
    base = {s.load: s for s in summaries if s.target == baseline}
    return [PointComparison(target, baseline, s.load,
                            ratio(s.output_tok_per_s, base[s.load].output_tok_per_s),
                            difference(s.ttft_ms.p50, base[s.load].ttft_ms.p50),
                            ratio(s.itl_ms.p50, base[s.load].itl_ms.p50),
                            ratio(s.tpot_ms.p50, base[s.load].tpot_ms.p50))
            for s in _by_target(summaries, target) if s.load in base]


def headline(summaries: Sequence[Summary], target: str, baseline: str) -> Headline | None:
    ours, base = _by_target(summaries, target), _by_target(summaries, baseline)
    if not ours or not base:
        return None
    best = max(ours, key=lambda s: s.output_tok_per_s)
    ours_sat, base_sat = best.output_tok_per_s, max(s.output_tok_per_s for s in base)
    points = compare_points(summaries, target, baseline)
    if not points:
        return Headline(target, baseline, ours_sat, base_sat, ratio(ours_sat, base_sat), "", None, None, None,
                        best.load)
    low = points[0]
    return Headline(target, baseline, ours_sat, base_sat, ratio(ours_sat, base_sat), low.load,
                    low.ttft_p50_diff_ms, low.itl_p50_ratio, low.tpot_p50_ratio, best.load)
