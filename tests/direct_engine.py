"""Runs prompts through vLLM's own LLM class, with no Celery, Redis or HTTP in between.

Used by test_determinism.py as the reference. From the repository root,
``python -m tests.direct_engine CONFIG < prompts.json`` prints, per prompt, the greedy text,
token ids and logprobs as JSON.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from config import load_settings

    settings = load_settings(sys.argv[1], environ={})
    e = settings.engine
    llm = LLM(model=settings.model.resolved_path, block_size=e.block_size, enforce_eager=e.enforce_eager,
              max_model_len=e.max_model_len, dtype=e.dtype, seed=e.seed,
              kv_cache_memory_bytes=int(e.kv_cache_gib * 2**30))
    results = []
    # One prompt at a time, as the test sends them over HTTP: batched together, bf16 kernels on
    # some CPUs sum in another order, and logprobs differ in the third decimal.
    for job in json.load(sys.stdin):
        params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=0)
        [out] = llm.generate([{"prompt_token_ids": job["prompt_token_ids"]}], params)
        c = out.outputs[0]
        results.append({"text": c.text, "token_ids": list(c.token_ids),
                        "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
