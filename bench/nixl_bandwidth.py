"""Raw NIXL bandwidth between two processes on this machine: `python -m bench.nixl_bandwidth --out DIR`.

One spawned process (the "prefill" side) registers a numpy buffer as DRAM and hands its NIXL
metadata to another (the "decode" side), which READs from it into its own registered buffer: the
direction of vLLM's pull connector (NixlConnector), where the decode engine pulls the prefilled
blocks (one case WRITEs instead, as the push connector does). Each case is one transfer of
`num_descs` descriptors of `desc_bytes` each, repeated; we time transfer() until
check_xfer_state() says DONE (the span vLLM's transfer_duration covers), so the handle's
creation is not counted.

Three setups: "deployment" is what our workers run (UCX's default transports, NIXL's progress
thread on but sleeping 1 ms between idle polls, kvtransfer/nixl_agents.py); "nixl-default" is how
vLLM's connector leaves it (the thread busy-polls); "direct" is the best direct use on 2 cores
(UCX_TLS=shm,self, progress thread off; FACTS.md). Each setup also reports the CPU one idle agent
burns, its progress thread included.
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
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    desc_bytes: int
    num_descs: int
    repeats: int
    op: str = "READ"  # READ: the sink pulls from the source (vLLM's pull); WRITE: it pushes to it
    # Each repeat to the next region of the source's buffer, not touched since the source filled
    # it, so out of the caches, as the blocks a decode engine registers for a push are; otherwise
    # every repeat moves the same (cache-warm) bytes.
    fresh_far: bool = False
    # With a notification to the far side, as the push's WRITE carries one (its request id): UCX
    # then sends it once the WRITE's bytes are there.
    notify: bool = False

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
    """vLLM-like block reads (one descriptor per layer and K/V half), 64 KiB descriptors, the
    push connector's WRITE of a prompt, and one large transfer for the peak rate.

    The push's shape: vLLM lays each layer's blocks out contiguously, so for a prompt in
    consecutive blocks NIXL merges vLLM's per-block, per-layer descriptors into one per layer
    (bench remote-prefill sees 4 in its telemetry for the tiny model)."""
    per_layer_half = block_bytes // (2 * num_layers)
    per_layer = prompt_blocks * block_bytes // num_layers
    return [
        Case(f"{prompt_blocks} blocks as {2 * num_layers}x{per_layer_half // KIB} KiB descs (vLLM-like)",
             per_layer_half, prompt_blocks * 2 * num_layers, 50),
        Case("16 x 64 KiB", 64 * KIB, 16, 100),
        Case(f"{prompt_blocks} x {block_bytes // KIB} KiB (whole blocks)", block_bytes, prompt_blocks, 50),
        # After the READs above, so the sink writes back the source's own bytes.
        Case(f"WRITE {num_layers} x {per_layer // KIB} KiB (the push's shape)", per_layer, num_layers, 50, "WRITE"),
        Case(f"WRITE {num_layers} x {per_layer // KIB} KiB, each into fresh memory", per_layer, num_layers,
             min(50, 256 * MIB // (per_layer * num_layers) - 1), "WRITE", fresh_far=True),
        Case(f"WRITE {num_layers} x {per_layer // KIB} KiB, each into fresh memory, notified", per_layer,
             num_layers, min(50, 256 * MIB // (per_layer * num_layers) - 1), "WRITE", fresh_far=True, notify=True),
        Case("1 x 256 MiB", 256 * MIB, 1, 5),
    ]


@dataclass(frozen=True)
class Setup:
    """How the two agents run: UCX's transports (None = UCX's defaults, as our workers have
    them), NIXL's progress thread (vLLM's connector leaves it on) and its sleep between idle
    polls (0: NIXL's busy polling)."""

    ucx_tls: str | None
    prog_thread: bool
    progress_delay_us: int = 0

    @property
    def label(self) -> str:
        thread = "off" if not self.prog_thread else (
            f"on, {self.progress_delay_us} us idle sleep" if self.progress_delay_us else "on, busy-polling")
        return f"UCX_TLS={self.ucx_tls or '(default)'}, progress thread {thread}"


SETUPS = {"deployment": Setup(None, True, 1000), "nixl-default": Setup(None, True),
          "direct": Setup("shm,self", False)}


def _agent(name: str, setup: Setup):
    import sys

    from nixl._api import nixl_agent, nixl_agent_config

    from placement import patch_progress_delay

    if setup.progress_delay_us:
        patch_progress_delay(sys.modules[nixl_agent.__module__].nixlBind, setup.progress_delay_us)
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=setup.prog_thread, backends=[]))
    # With UCX_TLS=shm,self UCX refuses the default error handling (FACTS.md).
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"} if setup.ucx_tls else {})
    return agent


def _source(conn, nbytes: int, setup: Setup) -> None:
    """A registered buffer to be read, kept until told to stop. With UCX's default transports a
    READ completes only while this side makes progress too, so without NIXL's progress thread
    it polls (as the prefill engine's progress thread would)."""
    import numpy as np

    agent = _agent("source", setup)
    buf = np.full(nbytes, 7, dtype=np.uint8)
    reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    while not conn.poll(0.05 if setup.prog_thread or setup.ucx_tls else 0):
        agent.get_new_notifs()
    agent.deregister_memory(reg)


def _idle(conn, setup: Setup, seconds: float) -> None:
    """One agent with a registered buffer and nothing to do: the CPU it burns while idle."""
    import numpy as np

    agent = _agent("idle", setup)
    buf = np.zeros(1 << 20, dtype=np.uint8)
    agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    conn.send((time.process_time() - cpu) / (time.monotonic() - wall))


def idle_cores(setup: Setup, seconds: float = 5.0) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_idle, args=(child, setup, seconds), daemon=True)
    proc.start()
    try:
        if not parent.poll(120 + seconds):
            raise TimeoutError("the idle NIXL agent did not report")
        return parent.recv()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


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


def _sink(conn, source_conn_meta, cases: list[Case], setup: Setup) -> None:
    """READs (or WRITEs) every case between the source and its own buffer; sends back the times in seconds."""
    import numpy as np

    agent = _agent("sink", setup)
    size = max(c.total_bytes for c in cases)
    buf = np.zeros(size, dtype=np.uint8)
    reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    meta, remote_base = source_conn_meta
    remote = agent.add_remote_agent(meta)
    remote = remote.decode() if isinstance(remote, bytes) else remote
    timings = []
    for case in cases:
        local = agent.get_xfer_descs(_descs(buf.ctypes.data, case), "DRAM")
        far = agent.get_xfer_descs(_descs(remote_base, case), "DRAM")
        notif_msg = b"raw-write" if case.notify else b""
        if case.fresh_far:
            # Regions of the 256 MiB case's buffer past the few MiB the cases before touched.
            handles = [agent.initialize_xfer(case.op, local, agent.get_xfer_descs(
                _descs(remote_base + i * case.total_bytes, case), "DRAM"), remote, notif_msg)
                for i in range(case.repeats + 1)]
            _time_one(agent, handles[-1])  # warm-up
            timings.append([_time_one(agent, h) for h in handles[:-1]])
            for h in handles:
                agent.release_xfer_handle(h)
            continue
        handle = agent.initialize_xfer(case.op, local, far, remote, notif_msg)
        _time_one(agent, handle)  # warm-up: connection set-up and first touch
        timings.append([_time_one(agent, handle) for _ in range(case.repeats)])
        agent.release_xfer_handle(handle)
    if buf[size - 1] != 7:
        raise RuntimeError("the READ did not bring the source's bytes")
    agent.deregister_memory(reg)
    conn.send(timings)


def measure(cases: list[Case], setup: Setup, timeout_s: float = 300.0) -> list[CaseResult]:
    """Runs every case between two spawned processes (so this one holds no NIXL state)."""
    ctx = mp.get_context("spawn")
    saved = os.environ.get("UCX_TLS")
    if setup.ucx_tls:
        os.environ["UCX_TLS"] = setup.ucx_tls
    else:
        os.environ.pop("UCX_TLS", None)
    src_parent, src_child = ctx.Pipe()
    sink_parent, sink_child = ctx.Pipe()
    source = ctx.Process(target=_source, args=(src_child, max(c.total_bytes for c in cases), setup), daemon=True)
    sink = None
    try:
        source.start()
        if not src_parent.poll(120):
            raise TimeoutError("the NIXL source process did not start")
        sink = ctx.Process(target=_sink, args=(sink_child, src_parent.recv(), cases, setup), daemon=True)
        sink.start()
        if not sink_parent.poll(timeout_s):
            raise TimeoutError(f"no NIXL results within {timeout_s:.0f} s")
        timings = sink_parent.recv()
    finally:
        if saved is None:
            os.environ.pop("UCX_TLS", None)
        else:
            os.environ["UCX_TLS"] = saved
        src_parent.send("stop")
        for proc in (sink, source):
            if proc is not None:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return [summarize(case, times) for case, times in zip(cases, timings)]


def summarize(case: Case, seconds: list[float]) -> CaseResult:
    p50 = statistics.median(seconds)
    return CaseResult(case, p50 * 1e3, min(seconds) * 1e3, max(seconds) * 1e3, case.total_bytes / p50 / 1e9)


def tiny_model_cases(prompt_tokens: int = 1024, block_size: int = 32, dtype_bytes: int = 2) -> tuple[int, list[Case]]:
    from config import load_settings

    model_dir = Path(load_settings(ROOT / "configs/disagg.yaml", environ={}).model.resolved_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block = kv_block_bytes(layers, cfg["num_key_value_heads"], head_dim, block_size, dtype_bytes)
    return block, default_cases(block, layers, -(-prompt_tokens // block_size))


def to_json(results: list[CaseResult], setup: Setup, idle: float) -> dict:
    return {"setup": asdict(setup), "label": setup.label, "idle_cores": idle,
            "cases": [{**asdict(r.case), "total_bytes": r.case.total_bytes,
                       **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results]}


def markdown(results: list[CaseResult], setup: Setup, idle: float) -> list[str]:
    lines = [f"{setup.label}. One idle agent burns {idle:.2f} cores.", "",
             "| case | bytes | latency p50 ms (min–max) | GB/s at p50 |",
             "| --- | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.case.name} | {r.case.total_bytes:,} | {r.latency_ms_p50:.3f} "
                     f"({r.latency_ms_min:.3f}–{r.latency_ms_max:.3f}) | {r.gbytes_per_s:.2f} |")
    return lines + [""]


def run(out: Path | None, setups: list[str], prompt_tokens: int = 1024, dtype_bytes: int = 2) -> dict:
    """Every setup in turn; writes nixl_bandwidth.json and .md to `out` if given. `dtype_bytes`:
    the KV cache's element size (2 for bf16, 4 for float32 engines)."""
    block, cases = tiny_model_cases(prompt_tokens, dtype_bytes=dtype_bytes)
    body = {"kv_block_bytes": block, "uptime_before": _uptime(), "setups": {}}
    lines = ["# Raw NIXL, process to process", "",
             f"KV block of the tiny model: {block:,} bytes (32 tokens, all layers, K and V). "
             "Latency: transfer() until DONE, median of the repeats; GB/s = bytes / that median.", ""]
    for name in setups:
        results = measure(cases, SETUPS[name])
        idle = idle_cores(SETUPS[name])
        body["setups"][name] = to_json(results, SETUPS[name], idle)
        lines += [f"## {name}", ""] + markdown(results, SETUPS[name], idle)
    body["uptime_after"] = _uptime()
    lines += [f"uptime before: {body['uptime_before']}", "", f"uptime after: {body['uptime_after']}", ""]
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "nixl_bandwidth.json").write_text(json.dumps(body, indent=1) + "\n")
        (out / "nixl_bandwidth.md").write_text("\n".join(lines))
    body["markdown"] = "\n".join(lines)
    return body


def _uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nixl_bandwidth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write nixl_bandwidth.json and nixl_bandwidth.md here")
    parser.add_argument("--setups", default="deployment,nixl-default,direct",
                        help=f"comma-separated, of {sorted(SETUPS)}")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt whose blocks the vLLM-like case reads")
    args = parser.parse_args()
    print(run(args.out, args.setups.split(","), args.prompt_tokens)["markdown"])


if __name__ == "__main__":
    main()
