"""Probe for issue 4: the push connector (vLLM 0.32's NixlPushConnector, loaded through
kvtransfer/nixl_agents.py) between two engines, P and D, in one process. From the repository root:

    .venv/bin/python -m scripts.push_probe            # ours; about 2 min; no Redis, no Celery
    .venv/bin/python -m scripts.push_probe --stock    # vLLM's own push connector, for comparison

Each case prints one line that starts with "case". D's request carries {"do_remote_prefill":
True, "remote_engine_id", "remote_host", "remote_port", "tp_size", "remote_request_id"}; P's
carries {"do_remote_decode": True}. D allocates its blocks and registers them with P, and P
WRITEs the KV into them. "blocks used" is D's KV cache use, read off a short unrelated request.

What ours prints:
- case 1 (P first, then D) and case 2 (D registers, then P prefills; the order of our claim
  flow): tokens equal True, the whole prompt (300 tokens) cached, outcome received;
- case 3 (D registered, P never prefills, D aborts): D's blocks go back once the registration
  times out;
- case 4 (P killed after D registered): D's request finishes within the registration timeout,
  tokens equal True, outcome recomputed, and D's blocks go back.
vLLM's own connector (--stock) keeps D's blocks for good in case 3, and in case 4 never ends D's
request: it logs that the registration "timed out ... without a push completion", and neither
fails the receive nor frees the blocks.
"""
import argparse
import asyncio
import os
import time
from pathlib import Path

from config import load_settings
from kvtransfer.connector import side_channel, transfer_config
from kvtransfer.push import outcome_of
from tasks.messages import SamplingSpec
from workers.engine import EngineHost

REGISTRATION_TIMEOUT_S = 8
settings = load_settings(str(Path(__file__).resolve().parent.parent / "configs" / "disagg.yaml"), environ={})


def host(name, role, stock):
    channel = side_channel("127.0.0.1")
    h, port = channel
    eid = f"{name}-{os.getpid()}"
    transfer = transfer_config(role, eid, "push", push_registration_timeout_s=REGISTRATION_TIMEOUT_S, kv_lease_s=12)
    cfg = transfer.config
    if stock:
        cfg.kv_connector_module_path = None
    e = EngineHost(settings, {"kv_transfer_config": cfg})
    os.environ.update(channel.env | transfer.env)  # this engine's processes inherit them
    e.start()
    return e, eid, h, port


def main():
    import psutil
    args = argparse.ArgumentParser()
    args.add_argument("--stock", action="store_true", help="vLLM's own NixlPushConnector")
    stock = args.parse_args().stock
    P, p_id, p_host, p_port = host("P", "prefill", stock)
    p_procs = psutil.Process().children(recursive=True)  # P's engine processes, before D has any
    D, d_id, d_host, d_port = host("D", "decode", stock)
    print("started", "stock" if stock else "ours", p_id, p_port, d_id, d_port, flush=True)
    greedy = SamplingSpec(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = {k: [5 + (i * (31 + k)) % 1400 for i in range(300)] for k in range(1, 5)}

    def dparams(rid):
        return {"do_remote_prefill": True, "remote_engine_id": p_id, "remote_host": p_host, "remote_port": p_port,
                "tp_size": 1, "remote_request_id": rid}

    async def collect(engine, rid, prompt, spec, params):
        last = None
        toks = []
        async for out in engine.generate(rid, prompt, spec, kv_transfer_params=params):
            last = out
            toks += list(out.outputs[0].token_ids)
        return toks, last

    def run(engine, coro, timeout=120):
        return engine.run(coro).result(timeout=timeout)

    def prefill_on_p(rid, prompt):
        return run(P, collect(P, rid, prompt, SamplingSpec(max_tokens=1, temperature=0.0), {"do_remote_decode": True}))

    refs = {k: run(D, collect(D, f"ref-{k}", p, greedy, None))[0] for k, p in prompts.items()}
    other = list(range(900, 940))

    async def poke(tag):
        # A short unrelated request: its last step reports usage with only itself running.
        async for _ in D.generate("poke-" + tag, other, SamplingSpec(max_tokens=1, temperature=0.0)):
            pass
        await asyncio.sleep(0.5)
        return round(D.load.kv_cache_usage * D.num_kv_blocks)

    def blocks_back_to(baseline, tag, timeout_s):
        started = time.time()
        while time.time() - started < timeout_s:
            used = run(D, poke(f"{tag}-{time.time():.0f}"))
            if used <= baseline:
                return "back to %d after %.0fs" % (used, time.time() - started)
            time.sleep(2)
        return "still %d used after %.0fs (baseline %d)" % (used, timeout_s, baseline)

    baseline = run(D, poke("a"))
    print("blocks used baseline:", baseline, "of", D.num_kv_blocks, flush=True)

    # 1. P prefills first, then D registers.
    prefill_on_p("req-1", prompts[1])
    toks, last = run(D, collect(D, "req-1", prompts[1], greedy, dparams("req-1")))
    print("case 1 (P first, then D): tokens equal %s, cached %s, outcome %s" % (
        toks == refs[1], last.num_cached_tokens, outcome_of(last.kv_transfer_params)), flush=True)

    # 2. D registers first (our claim order: P claims, then computes), then P prefills.
    future = D.run(collect(D, "req-2", prompts[2], greedy, dparams("req-2")))
    time.sleep(1)
    prefill_on_p("req-2", prompts[2])
    toks, last = future.result(timeout=120)
    print("case 2 (D registers, then P prefills): tokens equal %s, cached %s, outcome %s" % (
        toks == refs[2], last.num_cached_tokens, outcome_of(last.kv_transfer_params)), flush=True)
    print("blocks used after cases 1-2:", run(D, poke("b")), flush=True)

    # 3. D registers for a P that never prefills, and the request is aborted after 3 s.
    async def abandoned():
        gen = D.generate("req-3", prompts[3], greedy, kv_transfer_params=dparams("req-3"))
        try:
            async with asyncio.timeout(3):
                async for _ in gen:
                    return "got output"
        except TimeoutError:
            await gen.aclose()
            return "aborted"
    print("case 3 (D registered, P never prefills, D aborts):", run(D, abandoned()), "; blocks",
          blocks_back_to(baseline, "c", 3 * REGISTRATION_TIMEOUT_S), flush=True)

    # 4. D registers for P, then P's engine processes are killed.
    async def orphaned():
        started = time.time()
        try:
            async with asyncio.timeout(60):
                toks, last = await collect(D, "req-4", prompts[4], greedy, dparams("req-4"))
                return "finished in %.1fs, tokens equal %s, outcome %s" % (
                    time.time() - started, toks == refs[4], outcome_of(last.kv_transfer_params))
        except TimeoutError:
            return "no answer within 60 s"
    future = D.run(orphaned())
    time.sleep(2)
    for proc in p_procs:
        proc.kill()
    print("case 4 (P killed after D registered):", future.result(timeout=120), "; blocks",
          blocks_back_to(baseline, "d", 3 * REGISTRATION_TIMEOUT_S), flush=True)
    D.shutdown()
    print("END", flush=True)
    os._exit(0)


if __name__ == '__main__':
    main()
