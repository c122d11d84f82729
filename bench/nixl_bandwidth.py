"""Raw NIXL bandwidth between two processes on this machine: `python -m bench.nixl_bandwidth --out DIR`.

A child process (the "prefill" side) registers a numpy buffer as DRAM and hands its NIXL metadata
to the parent (the "decode" side), which READs from it into its own registered buffer: the
direction of vLLM's pull connector (NixlConnector), where the decode engine pulls the prefilled
blocks. Each case is one transfer of `num_descs` descriptors of `desc_bytes` each, repeated; we
time transfer() until check_xfer_state() says DONE (what vLLM's transfer_duration measures), so
the handle's creation is not counted.

The agents run with NIXL's progress thread off by default (FACTS.md: on 2 cores it made latency
20-40 times worse); `--prog-thread` turns it on, as vLLM's connector leaves it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    desc_bytes: int
    num_descs: int
    repeats: int

    @property
    def total_bytes(self) -> int:
        return self.desc_bytes * self.num_descs


@dataclass(frozen=True)
class CaseResult:
    case: Case
    latency_ms_p50: float
    latency_ms_min: float
    latency_ms_max: float
    gbytes_per_s: float  # total bytes / median latency


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of one KV block over all layers, K and V: what a pulled block moves."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def default_cases(block_bytes: int, num_layers: int, prompt_blocks: int) -> list[Case]:
    """vLLM-like block reads (one descriptor per layer and K/V half), 64 KiB descriptors, and one
    large transfer for the peak rate."""
    per_layer_half = block_bytes // (2 * num_layers)
    return [
        Case(f"{prompt_blocks} blocks as {2 * num_layers}x{per_layer_half // KIB} KiB descs (vLLM-like)",
             per_layer_half, prompt_blocks * 2 * num_layers, 50),
        Case("16 x 64 KiB", 64 * KIB, 16, 100),
        Case(f"{prompt_blocks} x {block_bytes // KIB} KiB (whole blocks)", block_bytes, prompt_blocks, 50),
        Case("1 x 256 MiB", 256 * MIB, 1, 5),
    ]


def _agent(name: str, prog_thread: bool):
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=prog_thread, backends=[]))
    # With UCX_TLS=shm,self UCX refuses the default error handling (FACTS.md).
    params = {"ucx_error_handling_mode": "none"} if "shm" in os.environ.get("UCX_TLS", "") else {}
    agent.create_backend("UCX", params)
    return agent


def _source(conn, nbytes: int, prog_thread: bool) -> None:
    """The child: a registered buffer to be read, kept alive until the parent says stop."""
    import numpy as np

    agent = _agent("source", prog_thread)
    buf = np.full(nbytes, 7, dtype=np.uint8)
    reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    conn.recv()
    agent.deregister_memory(reg)


def _descs(base: int, case: Case) -> list[tuple[int, int, int]]:
    return [(base + i * case.desc_bytes, case.desc_bytes, 0) for i in range(case.num_descs)]


def _time_one(agent, handle) -> float:
    began = time.perf_counter()
    state = agent.transfer(handle)
    while state not in ("DONE", "ERR"):
        state = agent.check_xfer_state(handle)
    if state == "ERR":
        raise RuntimeError("NIXL transfer failed")
    return time.perf_counter() - began


def measure(cases: list[Case], prog_thread: bool = False) -> list[CaseResult]:
    """Runs every case between this process and a spawned child; returns one result per case."""
    import numpy as np

    size = max(c.total_bytes for c in cases)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_source, args=(child, size, prog_thread), daemon=True)
    proc.start()
    try:
        agent = _agent("sink", prog_thread)
        buf = np.zeros(size, dtype=np.uint8)
        reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
        meta, remote_base = parent.recv()
        remote = agent.add_remote_agent(meta)
        remote = remote.decode() if isinstance(remote, bytes) else remote
        results = []
        for case in cases:
            local = agent.get_xfer_descs(_descs(buf.ctypes.data, case), "DRAM")
            far = agent.get_xfer_descs(_descs(remote_base, case), "DRAM")
            handle = agent.initialize_xfer("READ", local, far, remote)
            _time_one(agent, handle)  # warm-up: connection set-up and first touch
            times = [_time_one(agent, handle) for _ in range(case.repeats)]
            agent.release_xfer_handle(handle)
            p50 = statistics.median(times)
            results.append(CaseResult(case, p50 * 1e3, min(times) * 1e3, max(times) * 1e3, case.total_bytes / p50 / 1e9))
        if buf[size - 1] != 7:
            raise RuntimeError("the READ did not bring the source's bytes")
        agent.remove_remote_agent(remote)
        agent.deregister_memory(reg)
        return results
    finally:
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def tiny_model_cases(prompt_tokens: int = 1024, block_size: int = 32) -> tuple[int, list[Case]]:
    from config import load_settings

    model_dir = Path(load_settings(Path("configs/disagg.yaml"), environ={}).model.resolved_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block = kv_block_bytes(layers, cfg["num_key_value_heads"], head_dim, block_size)
    return block, default_cases(block, layers, -(-prompt_tokens // block_size))


def to_json(results: list[CaseResult], prog_thread: bool) -> dict:
    return {"prog_thread": prog_thread, "ucx_tls": os.environ.get("UCX_TLS", "(UCX default)"),
            "cases": [{**asdict(r.case), "total_bytes": r.case.total_bytes, **{k: v for k, v in asdict(r).items()
                                                                               if k != "case"}} for r in results]}


def markdown(results: list[CaseResult], prog_thread: bool) -> list[str]:
    lines = [f"progress thread {'on' if prog_thread else 'off'}; UCX_TLS={os.environ.get('UCX_TLS', '(default)')}", "",
             "| case | bytes | latency p50 ms (min–max) | GB/s at p50 |", "| --- | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.case.name} | {r.case.total_bytes:,} | {r.latency_ms_p50:.3f} "
                     f"({r.latency_ms_min:.3f}–{r.latency_ms_max:.3f}) | {r.gbytes_per_s:.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nixl_bandwidth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write nixl_bandwidth.json and nixl_bandwidth.md here")
    parser.add_argument("--prog-thread", action="store_true", help="NIXL's progress thread on (as vLLM has it)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt whose blocks the vLLM-like case reads")
    args = parser.parse_args()
    block, cases = tiny_model_cases(args.prompt_tokens)
    results = measure(cases, args.prog_thread)
    text = "\n".join([f"KV block of the tiny model: {block:,} bytes (32 tokens, all layers, K and V)", ""]
                     + markdown(results, args.prog_thread))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nixl_bandwidth.json").write_text(json.dumps({"kv_block_bytes": block, **to_json(results, args.prog_thread)}, indent=1) + "\n")
        (args.out / "nixl_bandwidth.md").write_text(text)


if __name__ == "__main__":
    main()
