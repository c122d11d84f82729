"""The "processor" role of Dynamo's examples: chat template, tokenization, and the limits a prompt must meet.

It turns a validated OpenAI body into token ids and a SamplingSpec; the engine never sees text.
"""

from __future__ import annotations

import contextlib
import logging
from typing import cast

from app.errors import BadRequest
from app.schemas import ChatCompletionRequest, CompletionRequest
from config import Settings
from tasks.messages import SamplingSpec

logger = logging.getLogger(__name__)


class Processor:
    def __init__(self, settings: Settings):
        from transformers import AutoTokenizer

        self.model_name = settings.model.name
        self.max_model_len = settings.engine.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model.resolved_path)
        self.vocab_size = len(self.tokenizer)
        if not self.tokenizer.chat_template:
            logger.warning("model %s has no chat template; /v1/chat/completions will refuse requests",
                           settings.model.resolved_path)

    def prepare(self) -> None:
        """Compiles the chat template (transformers caches the compiled form) and runs the
        tokenizer once, in gunicorn's master, so no request pays for either (app/gateway.py,
        *warm-up*)."""
        if self.tokenizer.chat_template:
            with contextlib.suppress(Exception):  # a template that rejects this is reported per request
                self.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                   add_generation_prompt=True)
        self.tokenizer.encode("warm up", add_special_tokens=False)

    # -- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not self.tokenizer.chat_template:
            raise BadRequest("this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  template errors (e.g. role order) are the caller's
            raise BadRequest(f"the chat template rejected these messages: {e}", param="messages") from e
        # The template already wrote the special tokens it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if all(isinstance(p, int) for p in prompt):
            return [self._check_ids(cast(list[int], prompt))]
        if all(isinstance(p, str) for p in prompt):
            return [self._encode(cast(str, p)) for p in prompt]
        return [self._check_ids(cast(list[int], p)) for p in prompt]

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range; the vocabulary has {self.vocab_size} tokens",
                             param="prompt")
        return list(ids)

    # -- limits and sampling ---------------------------------------------------------------

    def max_tokens_for(self, prompt_ids: list[int], requested: int | None) -> int:
        """The output budget; refuses prompts that leave no room in the context."""
        prompt_len, limit = len(prompt_ids), self.max_model_len
        if prompt_len >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; your prompt has "
                f"{prompt_len} tokens. Shorten the prompt.", param="messages", code="context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; you asked for {prompt_len} "
                f"prompt tokens plus {requested} completion tokens. Lower max_tokens or shorten the prompt.",
                param="max_tokens", code="context_length_exceeded")
        return requested

    @staticmethod
    def sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingSpec:
        top_k = req.top_k if req.top_k not in (None, -1) else 0
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_tokens=min(req.min_tokens, max_tokens),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop_list,
            stop_token_ids=list(req.stop_token_ids or []),
            seed=req.seed,
            n=req.n,
            ignore_eos=req.ignore_eos,
            logprobs=req.num_logprobs,
        )
