"""What one engine step costs on one core, offline: `python -m bench.step_cost [--dtype float32]`.

vLLM's `LLM` class, bound to core 0, no prefix caching: fresh prompts of 2,048-3,072 tokens with
one token out (a prefill), then 65 tokens out at batch 1, 4, 8 and 16 (ms per step). It is how
docs/benchmarks.md ("Disaggregation") compares bfloat16 with float32 on a CPU. With
`--beside-prefill`, a second engine bound to core 1 prefills fresh 2,048-token prompts without
pause while the decode steps are timed: what a disaggregated decode engine's step costs while
the prefill engine works on the other core. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _llm(args, core: int):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(core))
    from vllm import LLM

    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    return LLM(model=str(Path(args.model_path).expanduser()), block_size=32, max_model_len=4096, enforce_eager=True,
               dtype=args.dtype, kv_cache_memory_bytes=2**28, enable_prefix_caching=False, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="~/.cache/llmq/models/bench-llama")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--beside-prefill", action="store_true",
                        help="time the decode steps while another engine prefills on core 1")
    parser.add_argument("--prefill-loop", action="store_true", help=argparse.SUPPRESS)  # the other engine
    args = parser.parse_args()
    rng = random.Random(0)

    def prompt(length: int):
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=[rng.randrange(10, 1500) for _ in range(length)])

    if args.prefill_loop:
        from vllm import SamplingParams

        llm = _llm(args, 1)
        print("ready", flush=True)
        while True:
            llm.generate([prompt(2048)], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    other = None
    if args.beside_prefill:
        other = subprocess.Popen([sys.executable, "-m", "bench.step_cost", "--prefill-loop", "--dtype", args.dtype,
                                  "--model-path", args.model_path], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)  # its own group: its engine's processes end with it
        assert other.stdout is not None
        while other.stdout.readline().strip() != "ready":
            if other.poll() is not None:
                raise RuntimeError("the prefill engine did not start")
    try:
        from vllm import SamplingParams

        llm = _llm(args, 0)
        label = args.dtype + (" beside a prefilling engine" if other else "")
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        for length in (2048, 2048, 2700, 3072):  # the first one warms up
            began = time.perf_counter()
            llm.generate([prompt(length)], one, use_tqdm=False)
            print(f"{label}: prefill of {length} tokens: {(time.perf_counter() - began) * 1e3:.1f} ms", flush=True)
        steps = SamplingParams(max_tokens=65, ignore_eos=True)
        for batch in (1, 4, 8, 16):
            began = time.perf_counter()
            llm.generate([prompt(32) for _ in range(batch)], steps, use_tqdm=False)
            print(f"{label}: decode at batch {batch}: {(time.perf_counter() - began) * 1e3 / 65:.2f} ms per step",
                  flush=True)
    finally:
        if other is not None:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait(timeout=30)


if __name__ == "__main__":
    main()
