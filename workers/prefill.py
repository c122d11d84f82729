"""A prefill worker: computes decode workers' prompts and keeps their KV for the transfer."""

from __future__ import annotations

from config import Settings
from tasks.messages import PrefillRequest
from workers.disagg import PrefillServer
from workers.runtime import WorkerRuntime


class PrefillRuntime(WorkerRuntime):
    role = "prefill"

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        super().__init__(settings, worker_id, queues)
        self.prefill_server = PrefillServer(settings, worker_id, self.engine, self.redis, self.nixl, self.disagg)

    def serve_prefill(self, preq: PrefillRequest) -> None:
        """A prefill worker's task: compute the KV for the waiting decode worker."""
        self.prefill_server.serve(preq)
