"""What one engine step costs on one core, offline: `python -m bench.step_cost [--dtype float32]`.

vLLM's `LLM` class, bound to core 0, no prefix caching: fresh prompts of 2,048-3,072 tokens with
one token out (a prefill), then 65 tokens out at batch 1, 4, 8 and 16 (ms per step). It is how
docs/benchmarks.md ("Disaggregation") found bfloat16 emulated, 3-4.5x slower than float32, on a
CPU with AVX2 only. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="~/.cache/llmq/models/bench-llama")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM(model=str(Path(args.model_path).expanduser()), block_size=32, max_model_len=4096, enforce_eager=True,
              dtype=args.dtype, kv_cache_memory_bytes=2**28, enable_prefix_caching=False, **extra)
    rng = random.Random(0)

    def prompt(length: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(10, 1500) for _ in range(length)])

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for length in (2048, 2048, 2700, 3072):  # the first one warms up
        began = time.perf_counter()
        llm.generate([prompt(length)], one, use_tqdm=False)
        print(f"{args.dtype}: prefill of {length} tokens: {(time.perf_counter() - began) * 1e3:.1f} ms")
    steps = SamplingParams(max_tokens=65, ignore_eos=True)
    for batch in (1, 4, 8, 16):
        began = time.perf_counter()
        llm.generate([prompt(32) for _ in range(batch)], steps, use_tqdm=False)
        print(f"{args.dtype}: decode at batch {batch}: {(time.perf_counter() - began) * 1e3 / 65:.2f} ms per step")


if __name__ == "__main__":
    main()
