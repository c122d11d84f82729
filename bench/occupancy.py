"""How many of a run's requests were streaming at once, seen from the client:
`python -m bench.occupancy HARNESS/results.json`.

A request streams from its first token to its end. In a closed loop whose concurrency is above
the engine's max_num_seqs, the mean number streaming over the run's middle is close to the
engine's mean batch: a server that refills its engine's freed sequences late shows fewer than the
batch, and a larger share of the run with few streaming. Sampled every 5 ms over the middle 80%
of each target's run, so the warm-up ramp and the last requests' tail are left out.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

STEP_S = 0.005


@dataclass(frozen=True)
class Occupancy:
    target: str
    load: str
    mean_streaming: float
    share_under_half: float  # of the samples, those with fewer than half of the peak streaming
    peak: int


def occupancy(records: list[dict]) -> list[Occupancy]:
    """Per (target, load point), from the harness's records (ok ones only)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r.get("ok") and r.get("ttft_ms") is not None:
            groups.setdefault((r["target"], r["load"]), []).append(r)
    out = []
    for (target, load), rs in groups.items():
        intervals = [(r["start_s"] + r["ttft_ms"] / 1000, r["end_s"]) for r in rs]
        t0, t1 = min(r["start_s"] for r in rs), max(r["end_s"] for r in rs)
        n = max(1, int((t1 - t0) / STEP_S))
        samples = [t0 + i * STEP_S for i in range(n // 10, max(n // 10 + 1, n * 9 // 10))]
        counts = [sum(1 for a, b in intervals if a <= t < b) for t in samples]
        peak = max(counts)
        out.append(Occupancy(target, load, sum(counts) / len(counts),
                             sum(1 for c in counts if c < peak / 2) / len(counts), peak))
    return sorted(out, key=lambda o: (o.load, o.target))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.occupancy", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a harness folder's results.json")
    args = parser.parse_args(argv)
    records = json.loads(args.results.read_text())["records"]
    print("| load | target | mean streaming | share of the run under half the peak | peak |")
    print("| --- | --- | ---: | ---: | ---: |")
    for o in occupancy(records):
        print(f"| {o.load} | `{o.target}` | {o.mean_streaming:.1f} | {o.share_under_half:.0%} | {o.peak} |")


if __name__ == "__main__":
    main()
