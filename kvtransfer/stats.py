"""KV transfer statistics, summed from vLLM's connector stats as the engine reports them, and the
worker's counts of how its remote prefills went."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransferStats:
    num_transfers: int = 0
    bytes_transferred: int = 0
    transfer_seconds: float = 0.0
    num_failed: int = 0

    def add(self, connector_stats: dict | None) -> None:
        """Folds in one report: NIXL's lists of per-transfer figures, however they are nested."""
        for data in _stat_dicts(connector_stats):
            self.num_transfers += len(data.get("bytes_transferred", []))
            self.bytes_transferred += int(sum(data.get("bytes_transferred", [])))
            # NIXL reports durations in seconds (vllm's NixlKVConnectorStats divides by 1e6).
            self.transfer_seconds += float(sum(data.get("transfer_duration", [])))
            self.num_failed += len(data.get("num_failed_transfers", [])) + len(data.get("num_failed_handshakes", []))

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes_transferred / self.transfer_seconds / 1e9 if self.transfer_seconds else 0.0


def _stat_dicts(node) -> list[dict]:
    if not isinstance(node, dict):
        return [vars(node)["data"]] if hasattr(node, "data") and isinstance(node.data, dict) else []
    if "bytes_transferred" in node or "transfer_duration" in node:
        return [node]
    return [d for value in node.values() for d in _stat_dicts(value)]


@dataclass
class DisaggCounters:
    """A worker's remote-prefill outcomes, reported in its heartbeat and metrics."""

    num_remote_prefills: int = 0
    num_local_fallbacks: int = 0
    # Long prompts prefilled locally because max_prefill_queue_size remote prefills were waiting.
    num_local_by_backlog: int = 0
    num_prefills_served: int = 0
    num_prefills_dropped: int = 0
    num_prefill_done_notices: int = 0
