"""Prompt logprobs for echo, on the worker's side, without an engine: how vLLM's outputs become
Deltas, and that such a request never takes a remote prefill (its KV would come without logits)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from vllm.logprobs import Logprob

from config import load_settings
from kvtransfer.stats import DisaggCounters
from tasks.messages import GenerateRequest, SamplingSpec
from workers.disagg import RemotePrefill
from workers.outputs import DeltaMaker


def _lp(logprob: float, rank: int, token: str) -> Logprob:
    return Logprob(logprob=logprob, rank=rank, decoded_token=token)


def _completion(index: int, token_id: int, text: str):
    return SimpleNamespace(index=index, text=text, token_ids=[token_id], finish_reason=None,
                           logprobs=[{token_id: _lp(-0.5, 1, text)}])


def test_each_choices_first_delta_carries_the_prompt_logprobs():
    spec = SamplingSpec(max_tokens=4, n=2, logprobs=0, prompt_logprobs=1)
    make = DeltaMaker(spec)
    prompt = [None, {7: _lp(-3.0, 5, "b"), 9: _lp(-1.0, 1, "z")}, {8: _lp(-2.0, 1, "c")}]
    first = make(SimpleNamespace(prompt_token_ids=[6, 7, 8], prompt_logprobs=prompt,
                                 outputs=[_completion(0, 3, "x")]))
    # vLLM hands the prompt logprobs over once; choice 1 starts later and still gets them.
    later = make(SimpleNamespace(prompt_token_ids=[6, 7, 8], prompt_logprobs=None,
                                 outputs=[_completion(0, 4, "y"), _completion(1, 5, "w")]))
    got = first[0].prompt_logprobs
    assert [(t.token_id, t.token, t.logprob) for t in got] == [(7, "b", -3.0), (8, "c", -2.0)]
    assert [(t.token, t.logprob) for t in got[0].top] == [("z", -1.0)]  # the first token has none: left out
    assert later[0].prompt_logprobs is None and later[1].prompt_logprobs == got
    assert DeltaMaker(SamplingSpec(max_tokens=4))(SimpleNamespace(
        prompt_token_ids=[6], prompt_logprobs=None, outputs=[_completion(0, 3, "x")]))[0].prompt_logprobs is None


def test_prompt_logprobs_are_prefilled_locally():
    settings = load_settings("configs/disagg.yaml", environ={})
    remote = RemotePrefill(settings, "decode0@h", send_prefill=lambda preq: None, counters=DisaggCounters())
    req = GenerateRequest("r1", list(range(4000)), SamplingSpec(max_tokens=1, prompt_logprobs=0), deadline_unix=0)
    # Decided before any look at Redis (None here) or at the thresholds.
    assert asyncio.run(remote.decode_leg(None, req)) is None
