"""When a decode worker prefills remotely, and the knobs that can change while it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

from config import DisaggConfig
from tasks import keys

# A field set in the keys.DISAGG_THRESHOLDS hash changes that threshold for every decode worker
# within THRESHOLDS_CACHE_S, with no restart.
THRESHOLDS_CACHE_S = 1.0


@dataclass(frozen=True)
class Thresholds:
    max_local_prefill_length: int
    max_prefill_queue_size: int


def should_prefill_remotely(prompt_len: int, prefix_hit_len: int, backlog: int, t: Thresholds) -> bool:
    """Remote when the uncached part of the prompt is long and the prefill backlog (remote
    prefills waiting: RemotePrefill.decode_leg) has room."""
    return prompt_len - prefix_hit_len > t.max_local_prefill_length and backlog < t.max_prefill_queue_size


class ThresholdSource:
    """Config defaults, overridden field by field by the Redis hash, re-read at most once a second."""

    def __init__(self, config: DisaggConfig):
        self._defaults = Thresholds(config.max_local_prefill_length, config.max_prefill_queue_size)
        self._cached = self._defaults
        self._read_at = float("-inf")

    async def current(self, client) -> Thresholds:
        """``client`` is a redis.asyncio.Redis: this runs on the engine's event loop."""
        if time.monotonic() - self._read_at > THRESHOLDS_CACHE_S:
            self._cached = self.parse(await client.hgetall(keys.DISAGG_THRESHOLDS))
            self._read_at = time.monotonic()
        return self._cached

    def parse(self, raw: dict) -> Thresholds:
        values = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        fields = {}
        for name in ("max_local_prefill_length", "max_prefill_queue_size"):
            try:
                fields[name] = int(values[name]) if name in values else getattr(self._defaults, name)
            except ValueError:
                fields[name] = getattr(self._defaults, name)  # a bad override is ignored
        return Thresholds(**fields)
