"""Where a run writes its results when no `--out` is given: a fresh folder under `bench/out/`,
which git ignores. Curated figures belong in docs/benchmarks.md, not in the repository's tree."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

OUT_ROOT = Path(__file__).resolve().parent / "out"


def default_out(name: str, now: datetime | None = None) -> Path:
    """bench/out/NAME-YYYYMMDDTHHMMSSZ (UTC): one folder per run, so no run overwrites another."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return OUT_ROOT / f"{name}-{stamp}"
